"""FSDP x tensor parallel (FSDP2 over DTensor tensor-parallel parameters) on 4 gloo processes.

One spawn of 4 ranks runs, on the data of tests/test_tensor_parallel.py (fp32, clipping):

* FSDP x mtp (InternLM2, dp=2 x tp=2): 10 steps, a checkpoint after step 5;
* ZeRO-1.5 (InternLM v1, dp=4, zero1=2): 5 steps, a checkpoint;
* FSDP x msp (InternLM v1, dp=2 x tp=2): 10 steps, and 5 more from the ZeRO-1.5 checkpoint.

The tests compare every per-step loss with one process (relative error <= 1e-5), resume the
FSDP x mtp checkpoint in one process, check that each rank holds a quarter of the weights, and
that FSDP's counted bytes follow docs/parallel.md's formula on the tensor-parallel shards.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from oracles import analytic_step_bytes
from test_tensor_parallel import GLOBAL_ROWS, STEPS, global_batches, train_config

from internevo.checkpoint.manager import parse_load_info
from internevo.models.build import build_model
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.trainer import Trainer

V1, V2 = "INTERNLM", "INTERNLM2_PUBLIC"
FSDP = dict(size=-1, fsdp=True)
HALF = STEPS // 2


def make_trainer(cfg, rank: int, world: int, run_dir: Path) -> Trainer:
    """A trainer of ``cfg`` on this rank (process groups built when ``world > 1``)."""
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def train(trainer: Trainer, batches: list[dict]) -> list[float]:
    """One step per global batch on this data rank's rows; the losses."""
    per_rank = GLOBAL_ROWS // trainer.layout.data
    start = trainer.layout.dp_rank * per_rank
    trainer.history = [trainer.train_step({k: v[start:start + per_rank] for k, v in b.items()})
                       for b in batches]
    return [r["loss"] for r in trainer.history]


def resume(trainer: Trainer, folder: Path) -> Trainer:
    """Load everything (weights, optimizer, schedules, counters) from checkpoint ``folder``."""
    trainer.ckpt.load(parse_load_info({"path": f"local:{folder}", "content": ("all",)}))
    return trainer


def sharding(model: torch.nn.Module) -> dict:
    """Mesh dimension names of every parameter and the elements this rank holds."""
    return {"meshes": {n: p.device_mesh.mesh_dim_names for n, p in model.named_parameters()},
            "local": sum(p.to_local().numel() for p in model.parameters())}


def fsdp_tp_main(rank: int, world: int, root: str) -> dict:
    """The three runs of the module docstring on this rank."""
    root, batches, out = Path(root), global_batches(), {}
    mtp = make_trainer(train_config(V2, 2, "mtp", str(root / "fsdp_mtp"), FSDP), rank, world,
                       root / "run_mtp")
    out["mtp"] = train(mtp, batches[:HALF])
    mtp.ckpt.save()
    mtp.ckpt.wait()
    out["mtp"] += train(mtp, batches[HALF:])
    out["sharding"] = sharding(mtp.model)
    out["zero1_bytes"] = {k: v for k, v in mtp.history[-1].items() if k.endswith("/zero1/bytes")}
    zero = make_trainer(train_config(V1, 1, "mtp", str(root / "zero"), 2), rank, world,
                        root / "run_zero")
    train(zero, batches[:HALF])
    zero.ckpt.save()
    zero.ckpt.wait()
    msp_cfg = train_config(V1, 2, "msp", zero1=FSDP)
    out["msp"] = train(make_trainer(msp_cfg, rank, world, root / "run_msp"), batches)
    resumed = resume(make_trainer(msp_cfg, rank, world, root / "run_msp2"),
                     root / "zero" / str(HALF))
    out["msp_resumed"] = train(resumed, batches[HALF:])
    return out


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> tuple[list, Path]:
    root = tmp_path_factory.mktemp("fsdp_tp")
    return spawn_ranks(fsdp_tp_main, 4, str(root), timeout=600), root


@functools.cache
def reference(model_type: str) -> list[float]:
    """Per-step losses of one process."""
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(train_config(model_type, 1, "mtp"), 0, 1, Path(run_dir))
        return train(trainer, global_batches())


@pytest.mark.parametrize("key, model_type", [("mtp", V2), ("msp", V1)])
def test_fsdp_tp_training_equals_single_process(four_rank, key, model_type) -> None:
    for rank_results in four_rank[0]:
        assert rank_results[key] == pytest.approx(reference(model_type), rel=1e-5)


def test_zero_checkpoint_resumes_in_fsdp_msp(four_rank) -> None:
    """dp=4 ZeRO-1.5 (zero1=2) -> FSDP x msp (dp=2 x tp=2): steps 6-10 as one process's."""
    for rank_results in four_rank[0]:
        assert rank_results["msp_resumed"] == pytest.approx(reference(V1)[HALF:], rel=1e-5)


def test_fsdp_tp_checkpoint_resumes_in_one_process(four_rank, tmp_path) -> None:
    """FSDP x mtp (dp=2 x tp=2) -> one process: steps 6-10 as one process's."""
    trainer = resume(make_trainer(train_config(V2, 1, "mtp"), 0, 1, tmp_path),
                     four_rank[1] / "fsdp_mtp" / str(HALF))
    assert train(trainer, global_batches()[HALF:]) == pytest.approx(reference(V2)[HALF:],
                                                                    rel=1e-5)


def test_fsdp_tp_shards_weights_over_data_and_tensor(four_rank) -> None:
    """Every parameter is sharded over zero1, every matrix also over tensor, and a rank holds a
    quarter of the matrices (plus at most one row each for FSDP's padding) and half of the
    replicated vectors: either mode alone would leave about half of everything on each rank."""
    full = dict(build_model(train_config(V2, 1, "mtp")).named_parameters())
    bound = sum(p.numel() / 4 + math.prod(p.shape[1:]) if p.dim() > 1 else p.numel() / 2
                for p in full.values())
    for rank_results in four_rank[0]:
        meshes = rank_results["sharding"]["meshes"]
        assert meshes.keys() == full.keys()
        for name, dims in meshes.items():
            assert "zero1" in dims and ("tensor" in dims) == (full[name].dim() > 1), name
        assert rank_results["sharding"]["local"] <= bound


# dims InternLM2's tensor-parallel plan splits (docs/parallel.md, "Tensor parallel: Parameters")
TP_DIMS = {"tok_embeddings.weight": 0, "wqkv.weight": 0, "w1.weight": 0, "w3.weight": 0,
           "output.weight": 0, "wo.weight": 1, "w2.weight": 1}


def test_fsdp_tp_bytes_follow_the_formula_on_tensor_shards(four_rank) -> None:
    """FSDP gathers and reduce-scatters the tensor-parallel shards (tp=2) over zero1: the bytes of
    the last step are the FSDP formula with every split dimension halved."""
    cfg = train_config(V2, 2, "mtp", zero1=FSDP)
    model = build_model(train_config(V2, 1, "mtp"))
    shapes = {}
    for name, p in model.named_parameters():
        shape = list(p.shape)
        dim = next((d for suffix, d in TP_DIMS.items() if name.endswith(suffix)), None)
        if dim is not None:
            shape[dim] //= 2
        shapes[name] = tuple(shape)
    blocks = [n for n, m in model.named_modules() if m in model.transformer_blocks()]
    expected = analytic_step_bytes(cfg, ParallelLayout.from_config(cfg, 4, 0), shapes, blocks,
                                   micro_num=GLOBAL_ROWS // 2)
    expected = {k: v for k, v in expected.items() if k.endswith("/zero1/bytes")}
    assert len(expected) == 3  # all-gather, reduce-scatter, the gradient norm
    for rank_results in four_rank[0]:
        assert rank_results["zero1_bytes"] == expected
