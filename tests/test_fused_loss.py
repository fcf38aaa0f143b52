"""The chunked head + cross entropy equals the plain logits path (values, gradients, metrics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internevo.models.loss import (
    IGNORE_INDEX,
    fused_linear_cross_entropy,
    fused_lm_loss,
    lm_loss,
    token_stats,
)


def _inputs(n: int = 37, h: int = 16, v: int = 101, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) / 2).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[::5] = IGNORE_INDEX
    return x, w, y


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 1000])  # 8 and 36 do not divide 37
def test_matches_cross_entropy(smoothing: float, chunk: int) -> None:
    x, w, y = _inputs()
    logits = x @ w.t()
    ref = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX,
                          label_smoothing=smoothing, reduction="sum")
    ref_gx, ref_gw = torch.autograd.grad(ref * 0.37, (x, w))
    total, nll, correct = fused_linear_cross_entropy(x, w, y, smoothing, chunk=chunk)
    gx, gw = torch.autograd.grad(total * 0.37, (x, w))
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    valid = y != IGNORE_INDEX
    ref_nll = F.cross_entropy(logits.detach(), y, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-5)
    assert torch.equal(correct, valid & (logits.argmax(-1) == y))


def test_all_ignored_and_no_grad() -> None:
    x, w, y = _inputs()
    y[:] = IGNORE_INDEX
    total, nll, correct = fused_linear_cross_entropy(x, w, y, chunk=8)
    gx, gw = torch.autograd.grad(total, (x, w))
    assert total.item() == 0 and not correct.any() and not nll.any()
    assert not gx.any() and not gw.any()
    with torch.no_grad():
        x2, w2, y2 = _inputs()
        total2, _, _ = fused_linear_cross_entropy(x2, w2, y2, chunk=8)
    ref = F.cross_entropy((x2 @ w2.t()).detach(), y2, reduction="sum")
    torch.testing.assert_close(total2, ref, rtol=1e-6, atol=1e-5)


def test_bf16_matches_plain_path() -> None:
    """bf16 logits cast to fp32 as lm_loss does; gradients agree to bf16 rounding."""
    x, w, y = _inputs(dtype=torch.bfloat16, n=24, v=64)
    ref = lm_loss((x @ w.t()).unsqueeze(0), y.unsqueeze(0))
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, w))
    loss, _ = fused_lm_loss(x.unsqueeze(0), w, y.unsqueeze(0), torch.zeros(1, 24, dtype=torch.long),
                            1, chunk=7)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)


def test_fused_lm_loss_equals_lm_loss_and_token_stats() -> None:
    x, w, y = _inputs(n=40)
    hidden, labels = x.view(1, 40, -1), y.view(1, 40)
    types = torch.arange(40).remainder(3).view(1, 40)
    logits = hidden @ w.t()
    ref = lm_loss(logits, labels, 0.1)
    ref_stats = token_stats(logits.detach(), labels, types, 3)
    ref_g = torch.autograd.grad(ref, (x, w))
    loss, stats = fused_lm_loss(hidden, w, labels, types, 3, 0.1, chunk=9)
    g = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], ref_stats[k])


def _tiny_trainer(run_dir, smoothing: float, micro_num: int = 2):
    from internevo.config import config_from_dict
    from internevo.launch import seed_everything
    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.trainer import Trainer

    cfg = config_from_dict({
        "JOB_NAME": "fused", "model_type": "INTERNLM2_PUBLIC",
        "model": dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                      num_kv_attention_heads=2, vocab_size=211, multiple_of=16,
                      dtype="torch.float32"),
        "data": dict(seq_len=16, micro_bsz=2, micro_num=micro_num, total_steps=4,
                     train_folder=None, num_worker=0),
        "adam": dict(lr=1e-2),
        "loss": dict(label_smoothing=smoothing),
        "hybrid_zero_optimizer": dict(clip_grad_norm=1.0),
        "enable_tb": False, "ckpt": dict(enable_save_ckpt=False),
    })
    seed_everything(1024)
    layout = ParallelLayout.from_config(cfg, 1, 0)
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_trainer_losses_unchanged(tmp_path, smoothing: float) -> None:
    """Four steps with the fused head equal four steps through logits + lm_loss + token_stats."""
    runs = {}
    for fused in (True, False):
        trainer = _tiny_trainer(tmp_path / str(fused), smoothing)
        assert trainer.fused_head
        trainer.fused_head = fused
        batches = iter(trainer.loader)
        runs[fused] = [trainer.train_step(next(batches)) for _ in range(4)]
        runs[fused].append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for a, b in zip(runs[True][:4], runs[False][:4]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["acc"] == b["acc"]
    for k, v in runs[True][4].items():  # Adam magnifies ~1e-7 gradient differences
        torch.testing.assert_close(v, runs[False][4][k], rtol=1e-4, atol=1e-4)
