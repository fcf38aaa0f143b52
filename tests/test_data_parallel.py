"""Data parallel, ZeRO-1.5 and FSDP trainers on real gloo processes equal one process.

Every rank runs several modes one after the other in the same processes (one spawn per world
size), each for ``STEPS`` steps of ``Trainer.train_step`` on hand-built batches: rank ``r`` of
``dp`` gets rows ``r*M .. (r+1)*M`` of a global batch of ``GLOBAL_ROWS`` rows, and the
single-process reference trains on all of them (the loss of a row is its token mean / rows, and
data parallel averages, so both see the same objective).  Step ``POISON_STEP`` has a non-finite
loss on the last rank only (on every row of the reference): every rank must skip that update.

Checkpoints across layouts ride on the same spawns: the 4-rank ZeRO-1.5 run (dp=4, zero1=2) saves
after ``SAVE_AT`` batches; the 2-rank FSDP run resumes it, trains to ``RESAVE_AT`` and saves; one
process resumes each of them and trains to the end.  Every resumed run must continue exactly as the
uninterrupted single process.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from oracles import analytic_step_bytes
from torch.utils._python_dispatch import TorchDispatchMode

from internevo.config import TrainConfig, config_from_dict
from internevo.data.loader import build_train_loader
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.zero import plan_buckets
from internevo.train.trainer import Trainer

STEPS, GLOBAL_ROWS, POISON_STEP, CLIP = 10, 4, 4, 0.5
SAVE_AT, RESAVE_AT = 3, 7

# mode name -> (parallel section, hybrid_zero_optimizer overrides), per world size
MODES = {
    2: {
        "dp2": (dict(zero1=1), {}),
        "dp2_zero1=-1": (dict(zero1=-1), {}),
        "dp2_zero1=-1_overlap": (dict(zero1=-1), dict(overlap_sync_grad=True,
                                                      reduce_bucket_size=3000)),
        "dp2_fsdp": (dict(zero1=dict(size=-1, fsdp=True)), {}),
    },
    4: {
        "dp4_zero1=-1": (dict(zero1=-1), {}),
        "dp4_zero1=2": (dict(zero1=2), {}),
        "dp4_zero1=2_overlap": (dict(zero1=2), dict(overlap_sync_grad=True,
                                                    reduce_bucket_size=3000)),
        "dp4_fsdp_zero1=2": (dict(zero1=dict(size=2, fsdp=True)), {}),
    },
}


def tiny_config(parallel: dict, hz: dict, dtype: str = "torch.float32", **top) -> TrainConfig:
    """A 2-layer InternLM2 on dummy data, clipping active; ``top``: more top-level sections."""
    return config_from_dict(dict(
        model_type="INTERNLM2_PUBLIC",
        data=dict(seq_len=32, micro_bsz=1, micro_num=GLOBAL_ROWS, total_steps=STEPS,
                  num_worker=0),
        model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
                   vocab_size=256, multiple_of=16, dtype=dtype),
        adam=dict(lr=2e-3), lr_scheduler=dict(warmup_ratio=0.2),
        hybrid_zero_optimizer=dict(clip_grad_norm=CLIP, **hz),
        parallel=parallel, **{"ckpt": dict(enable_save_ckpt=False), "enable_tb": False, **top}))


@functools.cache
def global_batches() -> list[dict]:
    """``STEPS`` batches of ``GLOBAL_ROWS`` rows from the single-process loader (any mode's)."""
    loader = iter(build_train_loader(tiny_config(dict(zero1=1), {}), 0, 1))
    return [next(loader) for _ in range(STEPS)]


def rows_of(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of a batch (cu_seqlens is a per-row list)."""
    return {k: v[start:stop] for k, v in batch.items()}


def make_trainer(cfg: TrainConfig, rank: int, world: int, run_dir: Path) -> Trainer:
    """A trainer of ``cfg`` on this rank, with its layout's groups built."""
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def run_steps(trainer: Trainer, steps: int = STEPS, poison_step: int = POISON_STEP,
              first: int = 0) -> list[dict]:
    """Train on global batches ``first .. first+steps`` (this rank's rows); the last data rank's
    loss is non-finite at ``poison_step`` (every row's in a single process)."""
    layout = trainer.layout
    per_rank = GLOBAL_ROWS // layout.data
    records = []
    for step, batch in enumerate(global_batches()[first: first + steps], start=first):
        if step == poison_step and layout.dp_rank == layout.data - 1:
            _poison_rows(trainer, per_rank if layout.data == 1 else 1)
        start = layout.dp_rank * per_rank
        records.append(trainer.train_step(rows_of(batch, start, start + per_rank)))
        trainer.state.batch_count += 1  # as Trainer.fit does: the next batch's index
    return records


def summary(trainer: Trainer) -> dict:
    """Optimizer state (per parameter, full), state bytes, shapes and the analytic comm bytes."""
    layout = trainer.layout
    shapes = {n: tuple(p.shape) for n, p in trainer.model.named_parameters()}
    expected = analytic_step_bytes(trainer.cfg, layout, shapes, _block_names(trainer),
                                   micro_num=GLOBAL_ROWS // layout.data)
    return {"state": trainer.optimizer.state_dict(), "shapes": shapes, "expected": expected,
            "state_bytes": trainer.optimizer.state_bytes(), "zero1": layout.zero1}


class C10dOps(TorchDispatchMode):
    """Counts the c10d collective ops dispatched while active (what CommDebugMode counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = str(func._overloadpacket)
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def train(cfg: TrainConfig, rank: int, world: int) -> dict:
    """Run ``STEPS`` steps on this rank's rows; return the records and the :func:`summary`.

    The last step runs under :class:`C10dOps`, which counts the c10d ops themselves: an
    independent check that every collective went through (or was seen by) Comm.
    """
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(cfg, rank, world, Path(run_dir))
        records = run_steps(trainer, STEPS - 1)
        with C10dOps() as seen:
            records += run_steps(trainer, 1, first=STEPS - 1)
        return {"records": records, "c10d_calls": seen.calls, **summary(trainer)}


def _poison_rows(trainer: Trainer, rows: int) -> None:
    """Make the model's output (logits, or hidden states for the fused head + loss) infinite for
    the next ``rows`` forward calls: the loss and every gradient of this rank become non-finite."""
    left = [rows]

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        left[0] -= 1
        if left[0] == 0:
            handle.remove()
        return output * math.inf

    handle = trainer.model.register_forward_hook(hook)


def _block_names(trainer: Trainer) -> list[str]:
    """Parameter-name prefixes of the transformer blocks (FSDP's per-block units)."""
    blocks = trainer.model.transformer_blocks()
    names = {id(m): n for n, m in trainer.model.named_modules()}
    return [names[id(b)] for b in blocks]


# world size -> (mode, checkpoint to resume or None, batches to reach before saving)
CHECKPOINT_LEGS = {4: ("dp4_zero1=2", None, SAVE_AT), 2: ("dp2_fsdp", "dp4_zero1=2", RESAVE_AT),
                   1: ("dp1", None, STEPS)}


def checkpoint_leg(rank: int, world: int, root: Path, source: str | None = None) -> list[dict]:
    """Resume ``source`` (a run folder under ``root``) in this world's leg layout, train up to
    the leg's end and save into ``root/<mode>[_from_<source>]``; returns the trained records."""
    mode, default_source, until = CHECKPOINT_LEGS[world]
    save_as = mode if source is None else f"{mode}_from_{source}"
    source = source or default_source
    parallel, hz = MODES.get(world, {}).get(mode, (dict(zero1=1), {}))
    ckpt = dict(enable_save_ckpt=True, save_ckpt_folder=str(root / save_as), auto_resume=False,
                load_ckpt_info=dict(path=str(root / source), content=("all",)) if source else None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(tiny_config(parallel, hz, ckpt=ckpt), rank, world, Path(run_dir))
        trainer.ckpt.maybe_resume()
        first = trainer.state.batch_count
        records = run_steps(trainer, until - first, first=first)
        trainer.ckpt.save()
        trainer.ckpt.wait()
        return records


def run_modes(rank: int, world: int, root: Path) -> dict:
    """Every mode of ``world`` ranks, one after the other in the same processes, then the
    checkpoint leg of this world size."""
    results = {name: train(tiny_config(*spec), rank, world)
               for name, spec in MODES[world].items()}
    source = CHECKPOINT_LEGS[world][1]
    ready = source is None or (root / source).is_dir()  # -k may have deselected the 4-rank run
    results["checkpoint_leg"] = checkpoint_leg(rank, world, root) if ready else None
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single process with the whole global batch."""
    return train(tiny_config(dict(zero1=1), {}), 0, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Where the checkpoint legs save (one folder per leg)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module", params=[4, 2])  # 4 first: the 2-rank leg resumes its checkpoint
def distributed(request, checkpoints) -> tuple[int, list[dict]]:
    """Per-rank results of every mode of one world size (one spawn)."""
    return request.param, spawn_ranks(run_modes, request.param, checkpoints, timeout=600)


def test_losses_norms_and_weights_match_single_process(reference, distributed):
    world, ranks = distributed
    for mode in MODES[world]:
        for rank, res in enumerate(ranks):
            where = f"{mode} rank {rank}"
            for step, (got, ref) in enumerate(zip(res[mode]["records"], reference["records"])):
                assert got["success"] == ref["success"] == (step != POISON_STEP), where
                if step == POISON_STEP:
                    assert not math.isfinite(got["grad_norm"]), where
                    continue
                assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"{where} step {step}"
                assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), where
            assert res[mode]["state"]["step"] == reference["state"]["step"] == STEPS - 1
            for name, ref_state in reference["state"]["params"].items():
                for key, ref_t in ref_state.items():
                    torch.testing.assert_close(res[mode]["state"]["params"][name][key], ref_t,
                                               rtol=1e-5, atol=1e-6, msg=f"{where} {name} {key}")


def test_clipping_was_active(reference):
    norms = [r["grad_norm"] for r in reference["records"] if r["success"]]
    assert max(norms) > CLIP  # so the clipped path is what the equality above covers


def test_state_bytes_are_total_over_zero1(distributed):
    """fp32 master + 2 moments = 12 bytes per element, of 1/zero1 of the elements per rank."""
    world, ranks = distributed
    for mode, (parallel, hz) in MODES[world].items():
        res = ranks[0][mode]
        numels = [math.prod(s) for s in res["shapes"].values()]
        per_rank = [r[mode]["state_bytes"] for r in ranks]
        zo = res["zero1"]
        assert all(b == per_rank[i % zo] for i, b in enumerate(per_rank)), mode  # replicas
        if isinstance(parallel["zero1"], dict) and parallel["zero1"].get("fsdp"):
            assert sum(per_rank[:zo]) == 12 * sum(numels), mode  # FSDP keeps unpadded chunks
            continue
        size = hz.get("reduce_bucket_size", 512 * 1024 * 1024)
        buckets = plan_buckets(numels, size, zo)
        shard = sum(math.ceil(b.numel / zo) for b in buckets)
        assert per_rank == [12 * shard] * world, mode  # total / zo, padded per bucket
        assert shard * zo - sum(numels) < zo * len(buckets), mode


C10D_OPS = {"all_gather": "c10d._allgather_base_", "reduce_scatter": "c10d._reduce_scatter_base_",
            "all_reduce": "c10d.allreduce_"}


def test_every_collective_goes_through_comm(distributed):
    world, ranks = distributed
    for mode in MODES[world]:
        for res in (r[mode] for r in ranks):
            calls: dict[str, int] = {}
            for key, n in res["records"][-1].items():
                if key.startswith("comm/") and key.endswith("/calls"):
                    op = C10D_OPS[key.split("/")[1]]
                    calls[op] = calls.get(op, 0) + n
            assert calls == res["c10d_calls"], mode


def test_counted_bytes_equal_formula(distributed):
    world, ranks = distributed
    for mode in MODES[world]:
        for res in (r[mode] for r in ranks):
            for step, record in enumerate(res["records"]):
                if step == POISON_STEP:
                    continue
                counted = {k: v for k, v in record.items()
                           if k.startswith("comm/") and k.endswith("/bytes")}
                assert counted == res["expected"], f"{mode} step {step}"


def test_overlap_launches_every_bucket_in_the_last_backward(tmp_path):
    """overlap_sync_grad: buckets start from gradient hooks of the last micro-batch, not in step."""
    cfg = tiny_config(dict(zero1=1), dict(overlap_sync_grad=True, reduce_bucket_size=3000))
    trainer = make_trainer(cfg, 0, 1, tmp_path)
    opt, forwards, launches = trainer.optimizer, [0], []
    trainer.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    launch, reduce = opt._launch, opt.reduce_gradients
    opt._launch = lambda b: (launches.append(("launch", forwards[0])), launch(b))[1]
    opt.reduce_gradients = lambda: (launches.append(("step", forwards[0])), reduce())[1]
    trainer.train_step(global_batches()[0])
    assert len(opt.buckets) > 2
    assert launches == [("launch", GLOBAL_ROWS)] * len(opt.buckets) + [("step", GLOBAL_ROWS)]


def _assert_continues(records: list[dict], reference: dict, first: int, where: str) -> None:
    """``records`` are steps ``first..`` of a resumed run: they equal the uninterrupted run's."""
    assert len(records) > 0, where
    for step, (got, ref) in enumerate(zip(records, reference["records"][first:]), start=first):
        assert got["success"] == ref["success"], f"{where} step {step}"
        if ref["success"]:
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"{where} step {step}"
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), where


def test_checkpoints_resume_across_layouts(reference, distributed, checkpoints):
    """dp=4 zero1=2 (ZeRO) -> dp=2 FSDP -> 1 process, and dp=4 zero1=2 -> 1 process."""
    world, ranks = distributed
    if ranks[0]["checkpoint_leg"] is None:
        pytest.skip("the 2-rank leg resumes the 4-rank leg's checkpoint: run both")
    leg_first = {4: 0, 2: SAVE_AT}[world]
    for rank, res in enumerate(ranks):
        _assert_continues(res["checkpoint_leg"], reference, leg_first, f"leg {world} rank {rank}")
    if world != 2:  # the single-process legs need both saved checkpoints
        return
    for source, first in (("dp2_fsdp", RESAVE_AT), ("dp4_zero1=2", SAVE_AT)):
        records = checkpoint_leg(0, 1, checkpoints, source=source)
        _assert_continues(records, reference, first, f"1 process from {source}")
