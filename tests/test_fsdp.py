"""FSDP2 specifics on 2 real gloo ranks: fp16 overflow and loss scale, mixed precision, fp32 norms,
and optimizer checkpoints moving between FSDP and ZeRO-1.5 in memory.

(fp32 equivalence with one process, state bytes and byte formulas: tests/test_data_parallel.py.)
One spawn runs every scenario; the tests read its per-rank results.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from test_data_parallel import make_trainer, run_steps, summary, tiny_config

from internevo.parallel.spawn import spawn_ranks

ZERO = dict(zero1=-1)
FSDP = dict(zero1=dict(size=-1, fsdp=True))
FP16 = dict(dtype="torch.float16", grad_scaler=dict(fp16=dict(initial_scale=2**16), hysteresis=1))


def _run(parallel: dict, rank: int, world: int, steps: int, poison_step: int = -1,
         **config) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(tiny_config(parallel, {}, **config), rank, world, Path(run_dir))
        records = run_steps(trainer, steps, poison_step)
        dtypes = {p.dtype for p in trainer.model.parameters()}
        return {"records": records, "param_dtypes": dtypes, **summary(trainer)}


def _round_trip(rank: int, world: int) -> dict:
    """FSDP trains 3 steps; ZeRO loads its optimizer state; FSDP loads ZeRO's; all go on."""
    cfg_f, cfg_z = tiny_config(FSDP, {}), tiny_config(ZERO, {})
    with tempfile.TemporaryDirectory() as run_dir:
        fsdp = make_trainer(cfg_f, rank, world, Path(run_dir) / "a")
        run_steps(fsdp, 3, poison_step=-1)
        saved = fsdp.optimizer.state_dict()
        zero = make_trainer(cfg_z, rank, world, Path(run_dir) / "b")
        _load(zero, fsdp, saved)
        loaded_zero = zero.optimizer.state_dict()
        fresh = make_trainer(cfg_f, rank, world, Path(run_dir) / "c")
        _load(fresh, zero, loaded_zero)
        loaded_fsdp = fresh.optimizer.state_dict()
        losses = [[r["loss"] for r in run_steps(t, 2, poison_step=-1, first=3)]
                  for t in (fsdp, zero, fresh)]
    return {"saved": saved, "loaded_zero": loaded_zero, "loaded_fsdp": loaded_fsdp,
            "losses": losses}


def _load(target, source, state: dict) -> None:
    """What a resume does: optimizer state, weights from the masters, schedules and counters."""
    target.optimizer.load_state_dict(state)
    target.optimizer.after_update()  # ZeRO: masters -> parameters (FSDP: they are the same)
    target.schedules.load_state_dict(source.schedules.state_dict())


def scenarios(rank: int, world: int) -> dict:
    """Every scenario of this module on this rank."""
    return {
        "fp16_zero": _run(ZERO, rank, world, 4, poison_step=1, **FP16),
        "fp16_fsdp": _run(FSDP, rank, world, 4, poison_step=1, **FP16),
        "bf16_zero": _run(ZERO, rank, world, 4, dtype="torch.bfloat16"),
        "bf16_fsdp": _run(FSDP, rank, world, 4, dtype="torch.bfloat16"),
        "fp32norm_zero": _run(ZERO, rank, world, 2, dtype="torch.bfloat16", use_fp32_norm=True),
        "fp32norm_fsdp": _run(FSDP, rank, world, 2, dtype="torch.bfloat16", use_fp32_norm=True),
        "round_trip": _round_trip(rank, world),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Per-rank results of :func:`scenarios` on 2 processes."""
    return spawn_ranks(scenarios, 2, timeout=600)


@pytest.mark.parametrize("mode", ["fp16_zero", "fp16_fsdp"])
def test_fp16_overflow_skips_on_every_rank(ranks, mode):
    runs = [[(r["success"], r["loss_scale"], r["grad_norm"]) for r in res[mode]["records"]]
            for res in ranks]
    assert all(repr(run) == repr(runs[0]) for run in runs)  # same decisions, scale, norm (nan)
    success, scale, norm = zip(*runs[0])
    assert success[1] is False and not math.isfinite(norm[1])  # one rank overflowed: all skip
    assert scale[2] == scale[1] / 2  # hysteresis=1: the scale backs off at once
    assert success[0] or success[2] or success[3]


def test_fsdp_mixed_precision_matches_zero(ranks):
    zero, fsdp = ranks[0]["bf16_zero"], ranks[0]["bf16_fsdp"]
    assert fsdp["param_dtypes"] == {torch.float32}  # fp32 shards are the masters
    assert zero["param_dtypes"] == {torch.bfloat16}
    for z, f in zip(zero["records"], fsdp["records"]):
        assert f["loss"] == pytest.approx(z["loss"], rel=2e-2)
    # bf16 all-gathers (2 bytes) and fp32 reduce-scatters (4 bytes), as the formula says
    for res in (r["bf16_fsdp"] for r in ranks):
        for record in res["records"]:
            counted = {k: v for k, v in record.items() if k.startswith("comm/")
                       and k.endswith("/bytes")}
            assert counted == res["expected"]


def test_fsdp_keeps_norms_in_fp32(ranks):
    zero, fsdp = ranks[0]["fp32norm_zero"], ranks[0]["fp32norm_fsdp"]
    assert zero["param_dtypes"] == {torch.bfloat16, torch.float32}
    for z, f in zip(zero["records"], fsdp["records"]):
        assert f["loss"] == pytest.approx(z["loss"], rel=2e-2)


def test_optimizer_state_moves_between_fsdp_and_zero(ranks):
    for res in (r["round_trip"] for r in ranks):
        for loaded in (res["loaded_zero"], res["loaded_fsdp"]):
            assert loaded["step"] == res["saved"]["step"] == 3
            for name, state in res["saved"]["params"].items():
                for key, tensor in state.items():
                    torch.testing.assert_close(loaded["params"][name][key], tensor, rtol=0,
                                               atol=0)
        reference, *resumed = res["losses"]
        for losses in resumed:
            assert losses == pytest.approx(reference, rel=1e-5)
