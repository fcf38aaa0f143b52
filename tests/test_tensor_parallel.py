"""Tensor parallel (mtp / msp / fsp) on real gloo processes equals one process.

One spawn per world size runs every case in the same processes (process start-up dominates on
this machine).  Each case builds the model with the same seed as the single-process reference
(initialisation is layout-independent), runs one packed row forward and backward, and returns
the full logits, the loss and every gradient gathered to full shape; the test compares them with
the reference (fp32, relative error <= 1e-5).  The same spawn measures, per block, the counted
collectives (against :func:`oracles.expected_block_collectives`) and the bytes
saved for backward.  The 4-rank spawn trains dp=2 x tp=2 with the trainer for 10 steps and saves
a checkpoint that one process then loads.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from oracles import expected_block_collectives, saved_activation_bytes

from internevo.config import ConfigError, TrainConfig, config_from_dict
from internevo.models.build import build_model
from internevo.models.loss import lm_loss
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.tensor import apply_tensor_parallel, vocab_parallel_lm_loss

SEQ, VOCAB, SEED = 16, 64, 7
GQA_MODELS = ("INTERNLM2_PUBLIC", "LLAMA2")
CU = [0, 5, 11, 16]
MODES = ("mtp", "msp", "fsp")


def tiny_config(model_type: str, tp: int = 1, mode: str = "mtp", **model_kw) -> TrainConfig:
    """A 2-layer model in fp32 on packed rows of ``SEQ`` tokens."""
    model = dict(dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                      multiple_of=16, dtype="torch.float32"), **model_kw)
    if model_type in GQA_MODELS:
        model.setdefault("num_kv_attention_heads", 2)
    return config_from_dict(dict(
        model_type=model_type, data=dict(seq_len=SEQ, micro_bsz=1, micro_num=1, num_worker=0),
        model=model, parallel=dict(tensor=dict(size=tp, mode=mode)), enable_tb=False))


def row(step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, labels (some ignored) and positions of one packed row."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels[0, ::5] = -100
    pos = torch.cat([torch.arange(b - a) for a, b in zip(CU, CU[1:])])[None]
    return ids, labels, pos


def full(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly DTensor) tensor, detached."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_case(cfg: TrainConfig, comm: Comm, model: torch.nn.Module, smoothing: float) -> dict:
    """Forward + backward of one row: full logits, loss, full gradients by name."""
    ids, labels, pos = row()
    logits = model(ids, cu_seqlens=torch.tensor(CU, dtype=torch.int32), indexes=pos)
    if hasattr(logits, "to_local"):
        loss = vocab_parallel_lm_loss(logits, labels, comm, smoothing)
    else:
        loss = lm_loss(logits, labels, smoothing)
    loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    for key in [k for k in grads if ".Wqkv." in k and grads[k].shape[0] == 3]:
        grads[key] = grads[key].flatten(0, 1)  # v1 under tp: [3, H*d, ...] -> [3*H*d, ...]
    return {"logits": full(logits), "loss": loss.item(), "grads": grads}


CASES = [
    # (model_type, mode, model overrides, label smoothing)
    *[("INTERNLM2_PUBLIC", m, {}, 0.0) for m in MODES],
    *[("INTERNLM", m, {}, 0.0) for m in MODES],
    *[("LLAMA2", m, {}, 0.0) for m in MODES],
    ("INTERNLM2_PUBLIC", "msp", dict(embed_split_hidden=True), 0.1),
    ("INTERNLM2_PUBLIC", "mtp", dict(parallel_output=False), 0.1),
    ("INTERNLM", "fsp", dict(embed_split_hidden=True, parallel_output=False), 0.0),
]


def tp_rank_main(rank: int, world: int, cases: list) -> list:
    """Every case on this rank (tensor parallel over all ranks)."""
    out = []
    for model_type, mode, kw, smoothing in cases:
        cfg = tiny_config(model_type, world, mode, **kw)
        layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
        comm = Comm(layout)
        model = apply_tensor_parallel(build_model(cfg, seed=SEED), cfg, layout, comm)
        result = run_case(cfg, comm, model, smoothing)
        result["block_comm"] = block_collectives(model, comm)
        ids, _, pos = row()
        result["saved"] = saved_activation_bytes(model, ids, torch.tensor(CU, dtype=torch.int32),
                                                 pos)
        out.append(result)
    return out


def block_collectives(model: torch.nn.Module, comm: Comm) -> dict:
    """Counted (calls, bytes) per (kind, group) of one block's forward + backward."""
    ids, _, pos = row()
    x = model.get_submodule(model.embedding_attr)(ids).detach().requires_grad_()
    ctx = model.forward_context(x, torch.tensor(CU, dtype=torch.int32), pos)
    comm.reset()
    model.transformer_blocks()[0](x, ctx).sum().backward()
    return {k: (comm.calls[k], comm.bytes[k]) for k in comm.bytes}


@functools.cache
def reference(model_type: str, smoothing: float, **kw) -> dict:
    """The single-process result of one case."""
    cfg = tiny_config(model_type, **kw)
    model = build_model(cfg, seed=SEED)
    return run_case(cfg, Comm(ParallelLayout()), model, smoothing)


def assert_equal(result: dict, ref: dict) -> None:
    """Logits, loss and every gradient within 1e-5 relative error."""
    torch.testing.assert_close(result["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert result["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def tp2_results() -> list:
    return spawn_ranks(tp_rank_main, 2, CASES)


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2]) or 'default'}" for c in CASES])
def test_tp2_equals_single_process(tp2_results: list, index: int) -> None:
    model_type, mode, kw, smoothing = CASES[index]
    ref = reference(model_type, smoothing, **kw)
    for rank_results in tp2_results:
        assert_equal(rank_results[index], ref)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_tp2_block_collectives_match_table(tp2_results: list, index: int) -> None:
    model_type, mode, kw, _ = CASES[index]
    cfg = tiny_config(model_type, 2, mode, **kw)
    expected = expected_block_collectives(cfg, mode, SEQ, tp=2)
    for rank_results in tp2_results:
        assert rank_results[index]["block_comm"] == expected


def test_saved_activations_fsp_lt_msp_lt_mtp(tp2_results: list) -> None:
    for model_type in ("INTERNLM2_PUBLIC", "INTERNLM", "LLAMA2"):
        saved = {CASES[i][1]: tp2_results[0][i]["saved"] for i in range(len(CASES))
                 if CASES[i][0] == model_type and not CASES[i][2]}
        assert saved["fsp"] < saved["msp"] < saved["mtp"], saved


def test_vocab_not_divisible_is_rejected() -> None:
    cfg = tiny_config("INTERNLM2_PUBLIC", 2, "mtp", vocab_size=VOCAB + 1)
    with pytest.raises(ConfigError, match="tensor.size=2 does not divide model.vocab_size=65"):
        ParallelLayout.from_config(cfg, 2, 0)
    layout = ParallelLayout(world_size=2, tensor=2)  # also when a layout is built by hand
    with pytest.raises(ConfigError, match="vocab_size=65"):
        apply_tensor_parallel(build_model(cfg), cfg, layout, Comm(layout))


# ------------------------------------------------------------------------------------------
# 4 ranks: dp=2 x tp=2 with the trainer (10 steps, checkpoint), and tp=4


STEPS, GLOBAL_ROWS = 10, 4
TP4_CASES = [("INTERNLM2_PUBLIC", "msp", dict(num_kv_attention_heads=4), 0.1),
             ("INTERNLM", "fsp", {}, 0.0)]
TRAIN_MODELS = (("INTERNLM2_PUBLIC", "msp"), ("INTERNLM", "fsp"))


def train_config(model_type: str, tp: int, mode: str, save: str = "",
                 zero1: int | dict = -1) -> TrainConfig:
    """A 2-layer model on dummy data, clipping on, 4 rows per step (``zero1``: the
    ``parallel.zero1`` value)."""
    model = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256,
                 multiple_of=16, dtype="torch.float32")
    if model_type in GQA_MODELS:
        model["num_kv_attention_heads"] = 2
    return config_from_dict(dict(
        model_type=model_type, model=model,
        data=dict(seq_len=16, micro_bsz=2, micro_num=GLOBAL_ROWS, total_steps=STEPS, num_worker=0),
        adam=dict(lr=2e-3), lr_scheduler=dict(warmup_ratio=0.2), loss=dict(label_smoothing=0.1),
        hybrid_zero_optimizer=dict(clip_grad_norm=0.5), enable_tb=False,
        ckpt=dict(enable_save_ckpt=False, save_ckpt_folder=save or None),
        parallel=dict(tensor=dict(size=tp, mode=mode), zero1=zero1)))


@functools.cache
def global_batches() -> list[dict]:
    """``STEPS`` batches of ``GLOBAL_ROWS`` rows from the single-process loader."""
    from internevo.data.loader import build_train_loader

    loader = iter(build_train_loader(train_config("INTERNLM2_PUBLIC", 1, "mtp"), 0, 1))
    return [next(loader) for _ in range(STEPS)]


def train_losses(cfg: TrainConfig, rank: int, world: int, run_dir: Path):
    """Train ``STEPS`` steps on this rank's data slice; return the trainer and the losses."""
    from internevo.train.trainer import Trainer

    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    trainer = Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)
    per_rank = GLOBAL_ROWS // layout.data
    start = layout.dp_rank * per_rank
    losses = [trainer.train_step({k: v[start:start + per_rank] for k, v in b.items()})["loss"]
              for b in global_batches()]
    return trainer, losses


def four_rank_main(rank: int, world: int, save_root: str) -> dict:
    """tp=4 equality cases, then dp=2 x tp=2 training (+ a checkpoint of the first model)."""
    out: dict = {"tp4": tp_rank_main(rank, world, TP4_CASES), "train": {}}
    for i, (model_type, mode) in enumerate(TRAIN_MODELS):
        save = str(Path(save_root) / model_type) if i == 0 else ""
        with tempfile.TemporaryDirectory() as run_dir:
            trainer, losses = train_losses(train_config(model_type, 2, mode, save), rank, world,
                                           Path(run_dir))
            if save:
                trainer.ckpt.save()
                trainer.ckpt.wait()
        weights = {n: full(p) for n, p in trainer.model.named_parameters()}
        out["train"][model_type] = (losses, weights)
    return out


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> tuple[list, Path]:
    save_root = tmp_path_factory.mktemp("tp_ckpt")
    return spawn_ranks(four_rank_main, 4, str(save_root), timeout=600), save_root


@pytest.mark.parametrize("index", range(len(TP4_CASES)))
def test_tp4_equals_single_process(four_rank, index: int) -> None:
    model_type, _, kw, smoothing = TP4_CASES[index]
    ref = reference(model_type, smoothing, **kw)
    for rank_results in four_rank[0]:
        assert_equal(rank_results["tp4"][index], ref)


@pytest.mark.parametrize("model_type, mode", TRAIN_MODELS)
def test_dp2_tp2_training_equals_single_process(four_rank, tmp_path, model_type, mode) -> None:
    _, ref_losses = train_losses(train_config(model_type, 1, "mtp"), 0, 1, tmp_path)
    for rank_results in four_rank[0]:
        losses, _ = rank_results["train"][model_type]
        assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_tp2_checkpoint_loads_into_one_process(four_rank, tmp_path) -> None:
    from internevo.checkpoint.manager import parse_load_info
    from internevo.train.trainer import Trainer

    results, save_root = four_rank
    folder = save_root / "INTERNLM2_PUBLIC" / str(STEPS)
    cfg = train_config("INTERNLM2_PUBLIC", 1, "mtp")
    trainer = Trainer(cfg, ParallelLayout(), Comm(ParallelLayout()), torch.device("cpu"),
                      tmp_path)
    trainer.ckpt.load(parse_load_info({"path": f"local:{folder}", "content": ("model",)}))
    _, weights = results[0]["train"]["INTERNLM2_PUBLIC"]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
