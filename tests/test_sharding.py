"""Tests that prove sharding happens: per-rank shapes, per-rank optimizer storage, per-rank rows.

The equality tests elsewhere (tp / dp / FSDP == one process) pass just as well when a mode does
nothing at all.  These check what each rank *holds*:

* every tensor-parallel parameter's local shape is the full shape cut by ``tp`` along the dimension
  written out here per model (all models, mtp / msp / fsp, both embedding splits); built on a fake
  process group of 2 ranks in this process (sharding cuts locally, nothing is communicated);
* the optimizer state each rank holds, counted from the distinct untyped storages of the
  optimizer's tensors (not from ``state_bytes()``), is the full state / zero1;
* the rows each data-parallel rank's model trains on (recorded by a forward hook during
  ``Trainer.fit``) are disjoint and together are exactly the single process's batch rows.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from internevo.config import TrainConfig, config_from_dict
from internevo.models.build import build_model
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.tensor import apply_tensor_parallel

TP = 2
MODELS = ("INTERNLM", "INTERNLM2_PUBLIC", "LLAMA2")

# (model type, parameter-name suffix) -> dimension split by tensor parallel; every other
# parameter (norms, v1's out_proj bias) is replicated with its full shape
SPLIT = {
    "INTERNLM": {"mixer.Wqkv.weight": "qkv", "mixer.Wqkv.bias": "qkv", "mixer.out_proj.weight": 1,
                 "mlp.w1.weight": 0, "mlp.w3.weight": 0, "mlp.w2.weight": 1, "head.weight": 0},
    "INTERNLM2_PUBLIC": {"attention.wqkv.weight": 0, "attention.wo.weight": 1,
                         "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
                         "feed_forward.w2.weight": 1, "output.weight": 0},
    "LLAMA2": {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
               "attention.wo.weight": 1, "feed_forward.w1.weight": 0,
               "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1, "output.weight": 0},
}
EMBEDDING = {"INTERNLM": "embedding.weight", "INTERNLM2_PUBLIC": "tok_embeddings.weight",
             "LLAMA2": "tok_embeddings.weight"}


def tiny(model_type: str, mode: str = "mtp", tp: int = TP, **model) -> TrainConfig:
    """A 2-layer model: hidden 32, 4 heads (2 KV heads where the model has GQA), vocab 64."""
    m = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, multiple_of=16,
             dtype="torch.float32", **model)
    if model_type != "INTERNLM":
        m.setdefault("num_kv_attention_heads", 2)
    return config_from_dict(dict(model_type=model_type, model=m, enable_tb=False,
                                 parallel=dict(tensor=dict(size=tp, mode=mode))))


def expected_local_shape(model_type: str, name: str, full: tuple, split_hidden: bool) -> tuple:
    """The shape rank r holds, worked out from the full shape and the split table."""
    dim = SPLIT[model_type].get(next((s for s in SPLIT[model_type] if name.endswith(s)), ""))
    if name == EMBEDDING[model_type]:
        dim = 1 if split_hidden else 0
    if dim is None:
        return full
    if dim == "qkv":  # v1: [3*H*d, ...] is held as [3, H*d/tp, ...] (each of Q, K, V cut)
        return (3, full[0] // 3 // TP, *full[1:])
    return tuple(n // TP if i == dim else n for i, n in enumerate(full))


def local_shape(t: torch.Tensor) -> tuple:
    return tuple(t.to_local().shape if hasattr(t, "to_local") else t.shape)


@pytest.fixture
def fake_two_ranks():
    """This process as rank 1 of a fake 2-rank world (collectives are not run)."""
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=TP)
    yield 1
    dist.destroy_process_group()


@pytest.mark.parametrize("split_hidden", [False, True], ids=["vocab-split", "hidden-split"])
@pytest.mark.parametrize("mode", ["mtp", "msp", "fsp"])
@pytest.mark.parametrize("model_type", MODELS)
def test_local_shapes_are_full_over_tp(fake_two_ranks, model_type, mode, split_hidden):
    full = {n: tuple(p.shape) for n, p in build_model(tiny(model_type, tp=1),
                                                      device="meta").named_parameters()}
    cfg = tiny(model_type, mode, embed_split_hidden=split_hidden)
    layout = ParallelLayout.from_config(cfg, TP, fake_two_ranks).build_groups()
    model = apply_tensor_parallel(build_model(cfg, device="meta"), cfg, layout, Comm(layout))
    got = {n: local_shape(p) for n, p in model.named_parameters()}
    want = {n: expected_local_shape(model_type, n, s, split_hidden) for n, s in full.items()}
    wrong = {n: (got.get(n), want[n]) for n in want if got.get(n) != want[n]}
    assert not wrong, f"(local, expected) shapes on rank 1: {wrong}"
    assert sum(got[n] != full[n] for n in full) >= 6 * cfg.model.num_layers  # not vacuous


# --------------------------------------------------------------------------------------------
# 2 ranks: optimizer storage per rank, rows per data-parallel rank


def train_config(parallel: dict, micro_num: int = 4, save: str = "") -> TrainConfig:
    """LLAMA2, 2 steps of ``micro_num`` rows per data-parallel rank, on dummy data (saving a
    checkpoint at the end into ``save``)."""
    return config_from_dict(dict(
        model_type="LLAMA2",
        model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
                   vocab_size=256, multiple_of=16, dtype="torch.float32"),
        data=dict(seq_len=16, micro_bsz=1, micro_num=micro_num, total_steps=2, num_worker=0),
        adam=dict(lr=2e-3), parallel=parallel, enable_tb=False,
        ckpt=dict(enable_save_ckpt=bool(save), save_ckpt_folder=save or None)))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the distinct untyped storages of the optimizer's state on this rank: its fp32
    masters and every AdamW state tensor (moments, step counters); a storage is counted once
    (by data pointer) however many views of it there are."""
    tensors = list(optimizer.masters)
    tensors += [v for m in optimizer.masters for v in optimizer.inner.state[m].values()
                if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def fit_and_record(cfg: TrainConfig, rank: int, world: int) -> dict:
    """Train with ``Trainer.fit``; record the rows the model's embedding saw and the optimizer
    state bytes."""
    from internevo.train.trainer import Trainer

    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), Path(run_dir))
        rows: list[list[int]] = []  # token ids entering the embedding: the rows it trains on
        embedding = trainer.model.get_submodule(trainer.model.embedding_attr)
        embedding.register_forward_pre_hook(lambda _, a: rows.extend(r.tolist() for r in a[0]))
        history = trainer.fit()
        params = sum(p.numel() for p in trainer.model.parameters())
        return {"rows": rows, "losses": [h["loss"] for h in history if "loss" in h],
                "bytes": optimizer_state_bytes(trainer.optimizer), "params": params,
                "weights": {n: full(p) for n, p in trainer.model.named_parameters()}}


def full(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly sharded DTensor) tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


PARALLEL = {"zero1": dict(zero1=-1), "fsdp": dict(zero1=dict(size=-1, fsdp=True))}


def two_rank_main(rank: int, world: int, save_root: str) -> dict:
    """Each mode trains (and saves its final state under ``save_root/<mode>``)."""
    return {name: fit_and_record(train_config(p, save=str(Path(save_root) / name)), rank, world)
            for name, p in PARALLEL.items()}


@pytest.fixture(scope="module")
def save_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharding_ckpt")


@pytest.fixture(scope="module")
def two_ranks(save_root) -> list[dict]:
    return spawn_ranks(two_rank_main, 2, str(save_root), timeout=600)


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The same global batches in one process: micro_num = 2 ranks x 4 rows."""
    return fit_and_record(train_config(dict(zero1=1), micro_num=8), 0, 1)


@pytest.mark.parametrize("mode", PARALLEL)
def test_each_dp_rank_trains_its_own_rows(two_ranks, one_process, mode):
    mine = [r[mode]["rows"] for r in two_ranks]
    assert len(one_process["rows"]) == 2 * 8 and all(len(m) == 2 * 4 for m in mine)
    assert not {tuple(r) for r in mine[0]} & {tuple(r) for r in mine[1]}
    assert sorted(mine[0] + mine[1]) == sorted(one_process["rows"])
    for rank_result in two_ranks:  # LLAMA2 under ZeRO / FSDP trains as the single process
        assert rank_result[mode]["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


@pytest.mark.parametrize("mode", PARALLEL)
def test_optimizer_storage_is_split_over_ranks(two_ranks, one_process, mode):
    """fp32 master + 2 AdamW moments: 12 bytes per element in one process, half of that on each
    of 2 ranks (plus padding and 4-byte step counters: a few hundred bytes)."""
    params = one_process["params"]
    assert 12 * params <= one_process["bytes"] <= 12 * params + 4096
    per_rank = [r[mode]["bytes"] for r in two_ranks]
    for b in per_rank:
        assert 6 * params <= b <= 6 * params + 4096, (per_rank, 12 * params)
    assert math.isclose(sum(per_rank), one_process["bytes"], rel_tol=0.02)


@pytest.mark.parametrize("mode", PARALLEL)
def test_two_rank_checkpoint_loads_into_one_process(two_ranks, save_root, mode, tmp_path):
    """LLAMA2's ZeRO / FSDP checkpoint (sharded on disk) loads into one process as the trained
    weights."""
    from internevo.checkpoint.manager import parse_load_info
    from internevo.train.trainer import Trainer

    trainer = Trainer(train_config(dict(zero1=1), micro_num=8), ParallelLayout(),
                      Comm(ParallelLayout()), torch.device("cpu"), tmp_path)
    trainer.ckpt.load(parse_load_info({"path": str(save_root / mode), "content": ("model",)}))
    weights = two_ranks[0][mode]["weights"]
    assert weights.keys() == dict(trainer.model.named_parameters()).keys()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
