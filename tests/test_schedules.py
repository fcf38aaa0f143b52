"""LR / beta2 schedules vs their formulas, and the loss scaler's state machine."""

import math

import pytest

from internevo.parallel.scaler import LossScaler
from internevo.train.schedules import beta2_at, warmup_cosine_lr


def test_warmup_matches_spec_example():
    # lr 1e-4, total 50000, ratio 0.01 -> Wm = 500: updates use 2e-7, 4e-7, 6e-7 ...
    lrs = [warmup_cosine_lr(e, 1e-4, 50000, 0.01, 0, 1e-5) for e in range(3)]
    assert lrs == pytest.approx([2e-7, 4e-7, 6e-7], rel=1e-12)
    assert warmup_cosine_lr(499, 1e-4, 50000, 0.01) == pytest.approx(1e-4)


def test_cosine_part_matches_closed_form():
    base, total, eta = 1e-3, 100, 1e-5
    wm = int(total * 0.1)
    for e in (10, 37, 60, 99):
        expect = eta + (base - eta) * (1 + math.cos(math.pi * (e - wm) / (total - wm))) / 2
        assert warmup_cosine_lr(e, base, total, 0.1, 0, eta) == pytest.approx(expect, rel=1e-12)
    assert warmup_cosine_lr(10, base, total, 0.1, 0, eta) == pytest.approx(base)


def test_init_steps_hold_lr_at_zero():
    assert warmup_cosine_lr(2, 1.0, 100, 0.1, init_steps=3) == 0.0
    assert warmup_cosine_lr(3, 1.0, 100, 0.1, init_steps=3) == pytest.approx(1 / 10)


def test_beta2_schedule():
    assert beta2_at(0, 0.95, 0.0) == 0.95 and beta2_at(50, 0.95, 0.0) == 0.95
    assert beta2_at(1, 0.9, 0.8) == 0.9  # 1 - 1 = 0 < floor
    assert beta2_at(10_000, 0.9, 0.8) == pytest.approx(1 - 10_000 ** -0.8)


def test_scaler_hysteresis_backoff_and_growth():
    s = LossScaler(scale=1024.0, growth_interval=3, hysteresis=2, min_scale=256.0)
    s.update(overflow=True)
    assert s.scale == 1024.0  # first overflow tolerated
    s.update(overflow=True)
    assert s.scale == 512.0
    s.update(overflow=True)
    assert s.scale == 256.0  # hysteresis is not reset until growth
    s.update(overflow=True)
    assert s.scale == 256.0  # floored at min_scale
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 512.0 and s.hysteresis_step == 0


def test_disabled_scaler_stays_at_one():
    s = LossScaler(scale=1.0, enabled=False)
    s.update(overflow=True)
    assert s.scale == 1.0


def test_scaler_state_round_trip():
    s = LossScaler(scale=64.0, growth_interval=5)
    s.update(False)
    s.update(True)
    t = LossScaler(growth_interval=5)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
