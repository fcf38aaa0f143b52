"""HybridZeroOptimizer in one process vs torch's AdamW + clip_grad_norm_ as the reference."""

import copy

import pytest
import torch

from internevo.config import config_from_dict
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.scaler import LossScaler
from internevo.parallel.zero import HybridZeroOptimizer


def setup(clip=0.0, dtype="torch.float32", wd=0.1):
    cfg = config_from_dict({"hybrid_zero_optimizer": dict(clip_grad_norm=clip),
                            "adam": dict(lr=1e-2, weight_decay=wd), "model": dict(dtype=dtype)})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False))
    layout = ParallelLayout()
    scaler = LossScaler.from_config(cfg)
    opt = HybridZeroOptimizer(list(model.named_parameters()), cfg, layout, Comm(layout), scaler)
    return cfg, model, opt


def grads_from(model, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, 5)
    model(x).square().sum().backward()


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_matches_torch_adamw(clip):
    cfg, model, opt = setup(clip=clip)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1)
    for step in range(3):
        grads_from(model, step)
        grads_from(ref, step)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else 1e9)
        ref_opt.step()
        ref_opt.zero_grad()
        out = opt.step(lr=1e-2, beta2=0.95)
        assert out.success and out.grad_norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_overflow_skips_update_and_backs_off():
    cfg, model, opt = setup(dtype="torch.float16")
    before = [p.detach().clone() for p in model.parameters()]
    scale = opt.scaler.scale
    for _ in range(2):
        grads_from(model, 0)
        next(model.parameters()).grad[0, 0] = float("inf")
        out = opt.step(lr=1e-2, beta2=0.95)
        assert not out.success
    assert opt.scaler.scale == scale * 0.5  # hysteresis 2: backs off on the second overflow
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert all(p.grad is None for p in model.parameters())


def test_loss_scale_is_removed_before_update():
    _, model, opt = setup(dtype="torch.float16")
    ref = copy.deepcopy(model)
    grads_from(model, 1)
    for p in model.parameters():
        p.grad.mul_(opt.scaler.scale)
    grads_from(ref, 1)
    out = opt.step(lr=1e-2, beta2=0.95)
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters()))
    assert out.grad_norm == pytest.approx(ref_norm.item(), rel=1e-5)


def test_state_dict_round_trip_is_exact():
    _, model, opt = setup()
    grads_from(model, 0)
    opt.step(lr=1e-2, beta2=0.95)
    sd = copy.deepcopy(opt.state_dict())
    _, model2, opt2 = setup()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (model2, opt2)):
        grads_from(m, 5)
        o.step(lr=1e-2, beta2=0.95)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert set(sd["params"]) == {n for n, _ in model.named_parameters()}
    assert opt.state_bytes() == 3 * 4 * sum(p.numel() for p in model.parameters())
