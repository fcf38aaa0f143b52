"""Dry run (internevo/train/dryrun.py): the real step of one rank on fake tensors.

Every layout runs on the fake accelerator (the GPU code path: a buffer left on the CPU raises),
and the per-rank bytes equal the formulas of docs/parallel.md "Dry run", worked out here from the
model's shapes (built once on the meta device), not read back from the optimizer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internevo.config import config_from_dict
from internevo.models.build import build_model
from internevo.parallel import zero
from internevo.train.dryrun import BYTE_KEYS, dry_run

# name -> (world, parallel section, hybrid_zero_optimizer overrides); the last rank is built
LAYOUTS = {
    "dp2": (2, dict(zero1=1), {}),
    "dp4_zero1=-1": (4, dict(zero1=-1), {}),
    "dp4_zero1=2_overlap": (4, dict(zero1=2), dict(overlap_sync_grad=True,
                                                   reduce_bucket_size=3000)),
    "dp2_fsdp": (2, dict(zero1=dict(size=-1, fsdp=True)), {}),
    "dp4_hsdp_zero1=2": (4, dict(zero1=dict(size=2, fsdp=True)), {}),
    "mtp2": (2, dict(zero1=1, tensor=dict(size=2, mode="mtp")), {}),
    "msp2": (2, dict(zero1=1, tensor=dict(size=2, mode="msp")), {}),
    "fsp2": (2, dict(zero1=1, tensor=dict(size=2, mode="fsp")), {}),
    "dp4_zero1=2_x_fsp2": (8, dict(zero1=2, tensor=dict(size=2, mode="fsp")), {}),
    "dp2_fsdp_x_mtp2": (4, dict(zero1=dict(size=-1, fsdp=True), tensor=dict(size=2, mode="mtp")),
                        {}),
    "dp2_fsdp_x_msp2": (4, dict(zero1=dict(size=-1, fsdp=True), tensor=dict(size=2, mode="msp")),
                        {}),
}


def tiny(parallel: dict, hz: dict, **model) -> object:
    """A 2-layer bf16 InternLM2 on dummy data."""
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC",
        data=dict(seq_len=32, micro_bsz=1, micro_num=2, total_steps=4, num_worker=0),
        model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
                   vocab_size=256, multiple_of=16, dtype="torch.bfloat16", **model),
        hybrid_zero_optimizer=dict(clip_grad_norm=1.0, **hz), parallel=parallel,
        ckpt=dict(enable_save_ckpt=False), enable_tb=False))


def expected_bytes(cfg, world: int) -> dict[str, int]:
    """docs/parallel.md: N_local = elements this tensor rank holds (norm weights whole, every
    other weight cut by tp); bf16 params and gradients (2·N_local; FSDP: the fp32 shards are
    the params), masters 4·N_local/zero1, AdamW moments 8·N_local/zero1 — rounded up per
    parameter's dim 0 under FSDP (of its tensor-parallel shard), per bucket under ZeRO."""
    p = cfg.parallel
    tp = p.tensor.size
    zero1 = world // tp if p.zero1.size == -1 else p.zero1.size
    shapes = {n: t.shape for n, t in build_model(cfg, device="meta").named_parameters()}
    n_local = sum(s.numel() // (1 if "norm" in n else tp) for n, s in shapes.items())
    if p.zero1.fsdp:  # FSDP cuts dim 0 of each tensor-parallel shard
        shard = sum(math.ceil(s[0] / zero1) * math.prod(s[1:]) for s in shapes.values())
        if tp > 1:  # every tensor-parallel shard of this tiny model splits evenly over zero1
            shard = n_local // zero1
        return {"params": 4 * shard, "grads": 4 * shard, "master": 4 * shard,
                "optimizer_states": 8 * shard}
    return {"params": 2 * n_local, "grads": 2 * n_local, "master": 4 * math.ceil(n_local / zero1),
            "optimizer_states": 8 * math.ceil(n_local / zero1)}


def isolated(call: str) -> object:
    """``call`` (an expression over this module, JSON-serialisable) in a fresh interpreter: the
    stand-in accelerator must exist before the autograd engine starts, which other tests of this
    pytest process may already have done."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_dryrun as t; print('RESULT', json.dumps({call}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def all_results() -> dict:
    """Every dry run of this module, in one interpreter: each layout's last rank on the fake
    accelerator, recomputation's saved-activation peaks, the long rows, the run with a CPU
    bucket."""
    layouts = {name: dry_run(tiny(par, hz), world, rank=world - 1, device="cuda")
               for name, (world, par, hz) in LAYOUTS.items()}
    long_rows = long_row_reports()  # before cpu_buffer_error, which patches ZeRO for good
    return {"layouts": layouts, "recompute": recomputation_peaks(), "long_rows": long_rows,
            "cpu_error": cpu_buffer_error()}


def cpu_buffer_error() -> str:
    """The error of a dry run with ZeRO's old bucket allocation (no device)."""
    def cpu_flat(self, b, tensors, dtype, out=None):
        flat = torch.empty(b.shard * self.layout.zero1, dtype=dtype) if out is None else out
        torch.cat([tensors[i].reshape(-1).to(dtype) for i in b.indices], out=flat[: b.numel])
        return flat

    zero.HybridZeroOptimizer._bucket_flat = cpu_flat
    try:
        dry_run(tiny(dict(zero1=-1), {}), 2, device="cuda")
    except RuntimeError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def recomputation_peaks() -> list[int]:
    """Saved-activation peaks without and with activation checkpointing."""
    return [dry_run(tiny(dict(zero1=1), {}, checkpoint=ckpt), 2,
                    device="cuda")["bytes"]["activations_peak"] for ckpt in (False, True)]


LONG = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, head_dim=16)
"""One-layer model of the long-row runs (head_dim = hidden / heads)."""


def long_row(seq_len: int) -> object:
    """A one-layer bf16 InternLM2 on one packed row of ``seq_len`` tokens."""
    m = {k: v for k, v in LONG.items() if k != "head_dim"}
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC",
        data=dict(seq_len=seq_len, micro_bsz=1, micro_num=1, total_steps=4, num_worker=0),
        model=dict(num_layers=1, vocab_size=256, multiple_of=16, dtype="torch.bfloat16",
                   **m),
        hybrid_zero_optimizer=dict(clip_grad_norm=1.0), parallel=dict(zero1=1),
        ckpt=dict(enable_save_ckpt=False), enable_tb=False))


def long_row_reports() -> dict:
    """Dry runs of rows of 2048 and 4096 tokens."""
    return {str(s): dry_run(long_row(s), 1, device="cuda") for s in (2048, 4096)}


@pytest.fixture(scope="module")
def results() -> dict:
    return isolated("t.all_results()")


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_runs_on_the_fake_accelerator(name, results):
    world, parallel, hz = LAYOUTS[name]
    cfg = tiny(parallel, hz)
    report = results["layouts"][name]
    assert set(report) == {"world", "rank", "layout", "attention", "bytes", "comm"}
    assert set(report["bytes"]) == set(BYTE_KEYS)
    got, want = report["bytes"], expected_bytes(cfg, world)
    if hz.get("overlap_sync_grad"):  # several buckets: fewer than zero1 padding elements each
        n_buckets = 16
        for key, per in (("master", 4), ("optimizer_states", 8)):
            assert want[key] <= got[key] < want[key] + per * n_buckets * 2, key
        want = {k: v for k, v in want.items() if k in ("params", "grads")}
    for key, value in want.items():
        assert got[key] == value, (key, got[key], value)
    assert 0 < report["bytes"]["activations_peak"] < report["bytes"]["total_peak"]
    comm = report["comm"]
    if world > parallel.get("tensor", {}).get("size", 1):  # data parallel: gradients travel
        assert any(k.startswith(("reduce_scatter/", "all_reduce/zero1_replica")) for k in comm)


def test_a_buffer_left_on_the_cpu_fails_the_dry_run(results):
    """The old ZeRO bucket allocation (no device) is what NCCL runs would die on: caught here."""
    error = results["cpu_error"]
    assert "cpu" in error and "gpu" in error, error


def test_recomputation_shrinks_the_saved_activations(results):
    plain, recomputed = results["recompute"]
    assert recomputed < plain / 2


def test_command_line_writes_the_report(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text("model_type = 'INTERNLM2_PUBLIC'\n"
                      "data = dict(seq_len=32, micro_bsz=1, micro_num=2, total_steps=4)\n"
                      "model = dict(num_layers=2, hidden_size=32, num_attention_heads=4, "
                      "num_kv_attention_heads=2, vocab_size=256, multiple_of=16, "
                      "dtype='torch.bfloat16')\n"
                      "parallel = dict(zero1=4, tensor=dict(size=2, mode='msp'))\n")
    out = subprocess.run([sys.executable, "train.py", "--config", str(config), "--dry-run",
                          "--world", "8", "--rank", "3", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "dryrun.json").read_text())
    assert (report["world"], report["rank"]) == (8, 3)
    assert report["layout"]["zero1"] == 4 and report["layout"]["tensor"] == 2
    assert set(report["bytes"]) == set(BYTE_KEYS)
    assert "optimizer_states" in out.stdout


def flash_residual_bytes(s: int) -> int:
    """What the varlen flash kernel saves for backward on a row of ``s`` tokens: q and k (after
    RoPE), the qkv projection (v is a view of it), the output (bf16) and the fp32 logsumexp."""
    hq, hkv, d = LONG["num_attention_heads"], LONG["num_kv_attention_heads"], LONG["head_dim"]
    q, k, qkv, out = hq * d * 2, hkv * d * 2, (hq + 2 * hkv) * d * 2, hq * d * 2
    return s * (q + k + qkv + out + hq * 4)


def test_dry_run_attention_is_the_gpu_kernel(results):
    """The stand-in accelerator picks the flash kernel a real GPU picks: saved activations grow
    linearly with the row and hold the flash residuals but no [heads, S, S] score tensor (SDPA's
    math kernel, the old choice, saves one per segment: 46.7 MB here, quadratic in S)."""
    runs = results["long_rows"]
    assert runs["2048"]["attention"] == "torch_varlen"
    peak = {k: r["bytes"]["activations_peak"] for k, r in runs.items()}
    scores = LONG["num_attention_heads"] * 2048 * 2048 * 2  # one bf16 score tensor
    assert flash_residual_bytes(2048) <= peak["2048"] < scores
    assert abs(peak["4096"] - 2 * peak["2048"]) < flash_residual_bytes(2048) / 8
