"""Training on a CUDA device equals training on the CPU (run by ``benchmarks/gpu_check.py``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_train import tiny_cfg

from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def losses_on(device: str, cfg, tmp_path, steps: int = 3) -> list[float]:
    """Per-step losses of ``steps`` steps of one process on ``device`` (same data, same init)."""
    layout = ParallelLayout.from_config(cfg, 1, 0)
    trainer = Trainer(cfg, layout, Comm(layout), torch.device(device), tmp_path / device)
    return [trainer.train_step(b)["loss"] for b in itertools.islice(trainer.loader, steps)]


@pytest.mark.parametrize("use_flash,tol", [(False, 1e-4), (True, 2e-2)])
def test_cuda_losses_match_cpu(tmp_path, monkeypatch, use_flash, tol):
    """fp32 with SDPA: equal up to kernel rounding; with a varlen kernel attention runs in bf16."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = tiny_cfg(**{"model.use_flash_attn": use_flash})
    cpu = losses_on("cpu", cfg, tmp_path)
    cuda = losses_on("cuda", cfg, tmp_path)
    torch.testing.assert_close(torch.tensor(cuda), torch.tensor(cpu), rtol=tol, atol=tol)
