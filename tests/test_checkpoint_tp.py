"""InternLM v1 checkpoints across tensor-parallel sizes: the fused ``Wqkv`` is saved as
``[3, H*d, h]`` / ``[3, H*d]`` at every tensor size, so a tp=2 checkpoint loads into one process
(weights and optimizer state bit for bit), a single-process one loads at tp=2, and the HF export
of a tp=2 checkpoint computes the single-process model's logits.

One 2-rank spawn does all the tensor-parallel work (train + save at tp=2 msp, then load the
single-process checkpoint at tp=2); the single-process checkpoint is written before it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from internevo.checkpoint import format as ckpt_format
from internevo.checkpoint.manager import parse_load_info
from internevo.config import config_from_dict
from internevo.convert import hf_folder
from internevo.models.build import build_model
from internevo.models.registry import get_spec
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 2
QKV = "blocks.0.mixer.Wqkv.weight"


def v1_config(tp: int, save: str = "", load: str = "", fsdp: bool = False):
    """A 2-layer InternLM v1 in fp32 on dummy data (2 packed rows of 16 tokens per step)."""
    return config_from_dict(dict(
        model_type="INTERNLM",
        model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256,
                   multiple_of=16, dtype="torch.float32"),
        data=dict(seq_len=16, micro_bsz=1, micro_num=2, total_steps=STEPS, num_worker=0),
        adam=dict(lr=1e-2), enable_tb=False,
        ckpt=dict(enable_save_ckpt=bool(save), save_ckpt_folder=save or None, auto_resume=False,
                  load_ckpt_info=dict(path=load, content=("model", "optimizer")) if load
                  else None),
        parallel=dict(tensor=dict(size=tp, mode="msp"), zero1=dict(size=-1, fsdp=fsdp))))


def make_trainer(cfg, run_dir: Path, world: int = 1, rank: int = 0) -> Trainer:
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), run_dir)


def _full(name: str, t: torch.Tensor) -> torch.Tensor:
    """Full value in the single-process model's shape (tensor-parallel DTensors gathered)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return ckpt_format.from_checkpoint_shape(get_spec("INTERNLM"), name, t.detach()).clone()


def gathered(trainer: Trainer) -> dict:
    """Weights and optimizer masters / moments, full and in the single-process shapes."""
    opt = trainer.optimizer.state_dict()
    return {"weights": {n: _full(n, p) for n, p in trainer.model.named_parameters()},
            "optimizer": {n: {k: _full(n, v) for k, v in d.items()}
                          for n, d in opt["params"].items()},
            "step": opt["step"]}


def assert_state_equal(got: dict, want: dict) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        assert torch.equal(got["weights"][name], w), name
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for name, d in want["optimizer"].items():
        for key, v in d.items():
            assert torch.equal(got["optimizer"][name][key], v), f"{name}.{key}"
    assert got["step"] == want["step"]


def tp2_main(rank: int, world: int, root: str, single: str) -> dict:
    """Train + save at tp=2; load the single-process checkpoint at tp=2; load the tp=2 one
    under FSDP (dp=2: ``Wqkv`` shards have no checkpoint-shaped view) and save it again."""
    run = Path(root) / f"run{rank}"
    trainer = make_trainer(v1_config(2, save=str(Path(root) / "tp2")), run, world, rank)
    trainer.fit()
    out = {"trained": gathered(trainer), "qkv_local": tuple(trainer.model.state_dict()[QKV]
                                                             .to_local().shape)}
    loaded = make_trainer(v1_config(2, load=single), run, world, rank)
    loaded.ckpt.maybe_resume()
    out["loaded_single"] = gathered(loaded)
    tp2 = str(Path(root) / "tp2" / str(STEPS))
    fsdp = make_trainer(v1_config(1, save=str(Path(root) / "fsdp"), load=tp2, fsdp=True), run,
                        world, rank)
    fsdp.ckpt.maybe_resume()
    fsdp.ckpt.save()
    fsdp.ckpt.wait()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp_v1")
    single = make_trainer(v1_config(1, save=str(root / "tp1")), root / "run")
    single.fit()
    results = spawn_ranks(tp2_main, 2, str(root), str(root / "tp1" / str(STEPS)))
    return {"root": root, "single": gathered(single), "tp2": results}


def test_checkpoint_shape_is_tp_independent(runs) -> None:
    shapes = {}
    for tp in (1, 2):
        meta = dcp.FileSystemReader(str(runs["root"] / f"tp{tp}" / str(STEPS))).read_metadata()
        shapes[tp] = {k: tuple(m.size) for k, m in meta.state_dict_metadata.items()
                      if hasattr(m, "size")}
    assert shapes[1] == shapes[2]
    assert shapes[1][f"model.{QKV}"] == (3, 32, 32)
    assert shapes[1]["model.blocks.0.mixer.Wqkv.bias"] == (3, 32)
    assert shapes[1][f"optimizer.params.{QKV}.exp_avg"] == (3, 32, 32)
    assert runs["tp2"][0]["qkv_local"] == (3, 16, 32)  # each rank: its heads of Q, K and V


def test_tp2_checkpoint_loads_into_one_process(runs, tmp_path) -> None:
    folder = runs["root"] / "tp2" / str(STEPS)
    t = make_trainer(v1_config(1, load=str(folder)), tmp_path)
    t.ckpt.maybe_resume()
    want = runs["tp2"][0]["trained"]
    assert_state_equal(gathered(t), want)
    assert t.state.step_count == STEPS
    assert any(v.abs().max() > 0 for v in want["optimizer"][QKV].values())  # not vacuous
    # the loaded model trains on (masters, moments and weights agree)
    t.train_step(next(iter(t.loader)))


def test_fsdp_loads_and_saves_the_same_layout(runs, tmp_path) -> None:
    folder = runs["root"] / "fsdp" / str(STEPS)
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert tuple(meta[f"model.{QKV}"].size) == (3, 32, 32)
    t = make_trainer(v1_config(1, load=str(folder)), tmp_path)
    t.ckpt.maybe_resume()
    assert_state_equal(gathered(t), runs["tp2"][0]["trained"])


def test_single_process_checkpoint_loads_at_tp2(runs) -> None:
    for rank_results in runs["tp2"]:
        assert_state_equal(rank_results["loaded_single"], runs["single"])


def test_hf_export_of_tp2_checkpoint_equals_single_process_model(runs, tmp_path) -> None:
    sd, cfg = hf_folder.load_model_state_for_export(runs["root"] / "tp2" / str(STEPS))
    weights = runs["tp2"][0]["trained"]["weights"]
    assert sd.keys() == weights.keys()
    assert all(torch.equal(sd[k], weights[k]) for k in sd)
    reference = build_model(cfg).eval()
    reference.load_state_dict(weights)
    hf_folder.export_hf(sd, cfg, tmp_path / "hf", None, "llama", torch.float32)
    back, overrides = hf_folder.load_hf(tmp_path / "hf")
    exported = build_model(config_from_dict(overrides)).eval()
    exported.load_state_dict(back)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids)
        assert torch.equal(exported(ids), want)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_model_only_checkpoint_round_trip_and_old_flat_layout(runs, tmp_path) -> None:
    """``save_model_state`` writes the same layout; a folder with the old flat single-process
    ``Wqkv`` ([3*H*d, h], written before the layout was fixed) still loads, at tp=1."""
    sd, cfg = hf_folder.load_model_state_for_export(runs["root"] / "tp2" / str(STEPS))
    ckpt_format.save_model_state(tmp_path / "new", sd, cfg)
    meta = dcp.FileSystemReader(str(tmp_path / "new")).read_metadata().state_dict_metadata
    assert tuple(meta[f"model.{QKV}"].size) == (3, 32, 32)
    old = tmp_path / "old"
    dcp.save({f"model.{k}": v for k, v in sd.items()},
             storage_writer=dcp.FileSystemWriter(str(old)), no_dist=True)
    (old / "config.py").write_text(ckpt_format.config_text(cfg))
    assert tuple(dcp.FileSystemReader(str(old)).read_metadata()
                 .state_dict_metadata[f"model.{QKV}"].size) == (96, 32)
    for folder in (tmp_path / "new", old):
        t = make_trainer(v1_config(1), tmp_path / "run")
        t.ckpt.load(parse_load_info({"path": str(folder), "content": ("model",)}))
        for name, p in t.model.named_parameters():
            assert torch.equal(p.detach(), sd[name]), (folder, name)
