"""Intern sequence parallel + weight parallel on real gloo processes equals one process.

One spawn per world size runs every case.  Each case builds the model with the reference's seed,
runs one packed row forward and backward on every rank (the same row on every data rank), and
returns the full logits (gathered over the sequence), the loss, every gradient as the ZeRO
optimizer reduces it (gathered to full shape) and its global norm; they must match the
single-process reference within 1e-5 (fp32).  The same spawn counts one block's collectives
and compares them with numbers worked out here from the shapes.  Training cases run the trainer
for 10 steps and compare per-step losses with one process; the first saves a checkpoint that one
process loads, and the spawn loads a single-process checkpoint into an isp layout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from oracles import expected_isp_block_collectives
from test_tensor_parallel import (
    CU,
    SEED,
    SEQ,
    assert_equal,
    block_collectives,
    full,
    reference,
    row,
    tiny_config,
    train_config,
    train_losses,
)

from internevo.config import ConfigError, TrainConfig
from internevo.parallel.apply import build_loss, build_optimizer, parallelize
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout, enumerate_groups
from internevo.parallel.scaler import LossScaler
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.tensor import gather_dim

STEPS = 10
WIDE = dict(num_attention_heads=8, num_kv_attention_heads=4)  # GQA that sp=4 can split


def isp_config(model_type: str, sp: int, wp: int, overlap: bool = False, **kw) -> TrainConfig:
    """The tensor-parallel tests' tiny model under ``tensor.mode="isp"`` and ``weight.size=wp``."""
    cfg = tiny_config(model_type, sp, "isp", **kw)
    cfg.parallel.weight.size, cfg.parallel.weight.overlap = wp, overlap
    return cfg


def run_case(cfg: TrainConfig, layout: ParallelLayout, comm: Comm) -> dict:
    """Forward + backward of one row; full logits, loss, and the gradients as the ZeRO step
    reduces them (gathered to full shape), with their global norm."""
    model = parallelize(cfg, layout, comm, torch.device("cpu"), SEED)
    ids, labels, pos = row()
    comm.reset()
    logits = model(ids, cu_seqlens=torch.tensor(CU, dtype=torch.int32), indexes=pos)
    loss = build_loss(cfg, layout, comm)(logits, labels)
    loss.backward()
    model_comm = {k: (comm.calls[k], comm.bytes[k]) for k in comm.bytes}
    optimizer = build_optimizer(model, cfg, layout, comm, LossScaler.from_config(cfg))
    shards = optimizer.reduce_gradients()
    grads = dict(zip(optimizer.names, map(full, optimizer.gather_full(shards))))
    logits = gather_dim(comm, logits.detach(), 1)
    return {"logits": logits, "loss": loss.item(), "grads": grads,
            "grad_norm": optimizer.global_grad_norm(shards), "model_comm": model_comm,
            "block_comm": block_collectives(model, comm)}


CASES = {  # world -> [(model_type, sp, wp, overlap, model overrides)]
    2: [("INTERNLM2_PUBLIC", 2, 1, False, {}), ("INTERNLM2_PUBLIC", 2, 2, True, {}),
        ("INTERNLM", 2, 2, False, {}), ("INTERNLM", 1, 2, True, {}), ("LLAMA2", 2, 2, False, {}),
        ("INTERNLM2_PUBLIC", 2, 2, True, dict(checkpoint=True))],
    4: [("INTERNLM2_PUBLIC", 2, 2, True, {}), ("INTERNLM", 2, 1, False, {}),
        ("INTERNLM2_PUBLIC", 4, 4, True, WIDE), ("INTERNLM", 4, 2, False, {})],
}
TRAIN = {  # world -> [(model_type, sp, wp, overlap, activation checkpointing, zero1)]
    2: [("INTERNLM2_PUBLIC", 2, 2, True, False, -1), ("LLAMA2", 2, 2, True, False, -1)],
    4: [("INTERNLM2_PUBLIC", 2, 2, True, False, -1),  # wdp 2 = zero1 2
        ("INTERNLM", 4, 2, True, True, 1)],  # dp 1 != wdp 2; zero1 1 < wdp: replica all-reduce
}


def train_isp(case: tuple, rank: int, world: int, save: str) -> tuple[list, dict]:
    """``STEPS`` trainer steps of ``case``; the losses and the final full weights."""
    model_type, sp, wp, overlap, ckpt, zero1 = case
    cfg = train_config(model_type, sp, "isp", save)
    cfg.parallel.weight.size, cfg.parallel.weight.overlap = wp, overlap
    cfg.model.checkpoint, cfg.parallel.zero1.size = ckpt, zero1
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, losses = train_losses(cfg, rank, world, Path(run_dir))
        if save:
            trainer.ckpt.save()
            trainer.ckpt.wait()
    return losses, {n: full(p) for n, p in trainer.model.named_parameters()}


def load_into_isp(case: tuple, rank: int, world: int, folder: str) -> dict:
    """Full weights of an isp trainer after loading the model from ``folder``."""
    from internevo.checkpoint.manager import parse_load_info
    from internevo.train.trainer import Trainer

    model_type, sp, wp, overlap, *_ = case
    cfg = train_config(model_type, sp, "isp")
    cfg.parallel.weight.size, cfg.parallel.weight.overlap = wp, overlap
    layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), Path(run_dir))
        trainer.ckpt.load(parse_load_info({"path": f"local:{folder}", "content": ("model",)}))
    return {n: full(p) for n, p in trainer.model.named_parameters()}


def isp_rank_main(rank: int, world: int, save_root: str) -> dict:
    """Every equality case, then the training cases (the first saves a checkpoint), then a
    single-process checkpoint loaded into the first training case's layout."""
    out: dict = {"cases": [], "train": []}
    for model_type, sp, wp, overlap, kw in CASES[world]:
        cfg = isp_config(model_type, sp, wp, overlap, **kw)
        layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
        out["cases"].append(run_case(cfg, layout, Comm(layout)))
    for i, case in enumerate(TRAIN[world]):
        out["train"].append(train_isp(case, rank, world, save_root if i == 0 else ""))
    out["loaded"] = load_into_isp(TRAIN[world][0], rank, world,
                                  str(Path(save_root) / "one" / str(STEPS)))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def spawned(request, tmp_path_factory) -> tuple[int, list, Path, tuple]:
    """The spawn's results, its save folder and the single-process run of the first training
    case (losses, final weights; saved under ``one/``) that the spawn loads."""
    world = request.param
    save_root = tmp_path_factory.mktemp(f"isp_ckpt{world}")
    cfg = train_config(TRAIN[world][0][0], 1, "mtp", str(save_root / "one"))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, losses = train_losses(cfg, 0, 1, Path(run_dir))
        trainer.ckpt.save()
        trainer.ckpt.wait()
    one = (losses, {n: full(p) for n, p in trainer.model.named_parameters()})
    return world, spawn_ranks(isp_rank_main, world, str(save_root), timeout=600), save_root, one


def test_isp_equals_single_process(spawned) -> None:
    world, results, *_ = spawned
    for index, (model_type, *_, kw) in enumerate(CASES[world]):
        ref = reference(model_type, 0.0, **kw)
        ref_norm = sum(g.double().square().sum() for g in ref["grads"].values()).sqrt().item()
        for rank_results in results:
            assert_equal(rank_results["cases"][index], ref)
            assert rank_results["cases"][index]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)


def test_isp_block_collectives_match_shapes(spawned) -> None:
    world, results, *_ = spawned
    for index, (model_type, sp, wp, _, kw) in enumerate(CASES[world]):
        expected = expected_isp_block_collectives(isp_config(model_type, sp, wp, **kw), SEQ,
                                                  sp, wp)
        for rank_results in results:
            assert rank_results["cases"][index]["block_comm"] == expected, CASES[world][index]


def test_isp_model_collectives_match_shapes(spawned) -> None:
    """The whole forward + backward of a row: every layer's table, plus the embedding and head
    (gathered in forward, the head again in backward, both reduce-scattered), the final norm's
    gradient and the loss's one scalar all-reduce over the sequence group."""
    world, results, *_ = spawned
    for index, (model_type, sp, wp, _, kw) in enumerate(CASES[world]):
        cfg = isp_config(model_type, sp, wp, **kw)
        m = cfg.model
        block = expected_isp_block_collectives(cfg, SEQ, sp, wp)
        table = 4 * m.vocab_size * m.hidden_size  # embedding and head, fp32
        outside = {("all_gather", "weight"): (3, 3 * table),
                   ("reduce_scatter", "weight"): (2, 2 * table),
                   ("all_reduce", "weight"): (1, 4 * m.hidden_size),
                   ("all_reduce", "tensor"): (1, 4)}
        expected = {}
        for key in set(block) | {k for k in outside if (wp if k[1] == "weight" else sp) > 1}:
            calls, nbytes = block.get(key, (0, 0))
            extra = outside.get(key, (0, 0))
            expected[key] = (m.num_layers * calls + extra[0], m.num_layers * nbytes + extra[1])
        for rank_results in results:
            assert rank_results["cases"][index]["model_comm"] == expected, CASES[world][index]


def test_isp_training_equals_single_process(spawned, tmp_path) -> None:
    world, results, _, one = spawned
    for index, (model_type, *_rest) in enumerate(TRAIN[world]):
        ref_losses = one[0] if index == 0 else train_losses(
            train_config(model_type, 1, "mtp"), 0, 1, tmp_path)[1]
        for rank_results in results:
            losses, _ = rank_results["train"][index]
            assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_isp_checkpoint_loads_into_one_process(spawned, tmp_path) -> None:
    from internevo.checkpoint.manager import parse_load_info
    from internevo.train.trainer import Trainer

    world, results, save_root, _ = spawned
    model_type = TRAIN[world][0][0]
    trainer = Trainer(train_config(model_type, 1, "mtp"), ParallelLayout(),
                      Comm(ParallelLayout()), torch.device("cpu"), tmp_path)
    request = {"path": f"local:{save_root / str(STEPS)}", "content": ("model",)}
    trainer.ckpt.load(parse_load_info(request))
    _, weights = results[0]["train"][0]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name


def test_isp_checkpoint_exports_to_hf(spawned, tmp_path) -> None:
    from internevo.convert import hf_folder

    world, results, save_root, _ = spawned
    sd, cfg = hf_folder.load_model_state_for_export(save_root / str(STEPS))
    _, weights = results[0]["train"][0]
    assert sd.keys() == weights.keys()
    hf_folder.export_hf(sd, cfg, tmp_path / "hf", None, "llama", torch.float32)
    back, _ = hf_folder.load_hf(tmp_path / "hf")
    assert back.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(back[name], w), name


def test_single_process_checkpoint_loads_into_isp(spawned) -> None:
    *_, (_, weights) = spawned
    for rank_results in spawned[1]:
        assert rank_results["loaded"].keys() == weights.keys()
        for name, w in weights.items():
            assert torch.equal(rank_results["loaded"][name], w), name


# ------------------------------------------------------------------------------------------
# layout (no processes)


def test_isp_groups_follow_spec_example() -> None:
    """W=32, sp=4, wp=8, zero1=2 (spec §3.1): weight blocks of 8, weight-data stride 8."""
    lay = ParallelLayout(world_size=32, rank=0, tensor=4, zero1=2, tensor_mode="isp", weight=8)
    assert enumerate_groups(lay, "weight")[:2] == [list(range(8)), list(range(8, 16))]
    assert enumerate_groups(lay, "weight_data")[:2] == [[0, 8, 16, 24], [1, 9, 17, 25]]
    assert enumerate_groups(lay, "zero1")[:3] == [[0, 8], [1, 9], [2, 10]]
    assert [16, 24] in enumerate_groups(lay, "zero1")
    assert enumerate_groups(lay, "zero1_replica")[0] == [0, 16]
    assert enumerate_groups(lay, "tensor")[0] == [0, 1, 2, 3]
    assert enumerate_groups(lay, "data")[0] == [0, 4, 8, 12, 16, 20, 24, 28]


@pytest.mark.parametrize("kw, sp, wp, world, message", [
    ({}, 4, 1, 4, "num_kv_attention_heads=2"),
    (dict(vocab_size=66), 2, 4, 4, "vocab_size=66"),
    ({}, 1, 3, 3, "hidden_size=32"),
    ({}, 2, 4, 6, "world size 6 is not divisible by weight.size*pipeline.size = 4*1"),
])
def test_isp_sizes_are_checked(kw, sp, wp, world, message) -> None:
    cfg = isp_config("INTERNLM2_PUBLIC", sp, wp, **kw)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        ParallelLayout.from_config(cfg, world, 0)
