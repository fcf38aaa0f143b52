"""The training loop: accumulation, metrics files, FLOP accounting and the entry points."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from internevo.config import config_from_dict
from internevo.models.build import build_model
from internevo.models.loss import lm_loss
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.train.metrics import step_flops
from internevo.train.trainer import Trainer

TINY = dict(
    JOB_NAME="tiny", model_type="INTERNLM2_PUBLIC",
    data=dict(seq_len=16, micro_bsz=2, micro_num=2, total_steps=3, num_worker=0),
    model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
               vocab_size=256, dtype="torch.float32", mlp_ratio=2.0, multiple_of=16),
    adam=dict(lr=1e-2), hybrid_zero_optimizer=dict(clip_grad_norm=1.0),
    ckpt=dict(enable_save_ckpt=False),
)


def tiny_cfg(**overrides):
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        values[section][key] = value
    return config_from_dict(values)


def make_trainer(cfg, tmp_path):
    layout = ParallelLayout.from_config(cfg, 1, 0)
    return Trainer(cfg, layout, Comm(layout), torch.device("cpu"), tmp_path / "run")


def test_accumulation_equals_one_big_batch(tmp_path):
    trainer = make_trainer(tiny_cfg(), tmp_path)
    batch = next(iter(trainer.loader))
    rows, length = batch["input_ids"].shape
    one_segment = dict(batch, cu_seqlens=[torch.tensor([0, length], dtype=torch.int32)] * rows,
                       indexes=torch.arange(length).repeat(rows, 1))
    trainer.forward_backward(one_segment, 1.0)
    accumulated = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad()
    # reference: one batched forward over all rows, mean of per-row token means
    logits = trainer.model(batch["input_ids"])
    loss = torch.stack([lm_loss(logits[r], batch["labels"][r]) for r in range(rows)]).mean()
    loss.backward()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_metrics_written_everywhere(tmp_path):
    trainer = make_trainer(tiny_cfg(), tmp_path)
    history = trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tgs", "tflops", "mfu"):
            assert key in r
        assert r["tokens"] == 2 * 32 and r["tgs"] > 0 and r["tflops"] > 0
        # one data type: its accuracy equals the overall one, its tokens are the supervised ones
        (name,) = [k.split("/", 1)[1] for k in r if k.startswith("acc/")]
        assert r[f"acc/{name}"] == pytest.approx(r["acc"])
        assert 0 < r[f"tokens/{name}"] <= r["tokens"]
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert history[-1]["loss"] == records[-1]["loss"]


def test_loss_falls_on_dummy_data(tmp_path):
    cfg = tiny_cfg(**{"data.total_steps": 12, "adam.lr": 3e-3})
    history = make_trainer(cfg, tmp_path).fit()
    assert history[-1]["loss"] < history[0]["loss"] - 0.5


def test_skip_batches_consume_without_training(tmp_path):
    cfg = tiny_cfg(**{"data.skip_batches": "1", "data.total_steps": 3})
    trainer = make_trainer(cfg, tmp_path)
    history = trainer.fit()
    assert [r["batch"] for r in history] == [0, 2]
    assert trainer.state.skipped_batches == 1 and trainer.state.step_count == 2


@pytest.mark.parametrize("model_type", ["INTERNLM", "INTERNLM2_PUBLIC"])
def test_matmul_flops_match_torch_flop_counter(model_type):
    model_cfg = dict(TINY["model"], num_layers=2)
    if model_type == "INTERNLM":
        model_cfg.pop("num_kv_attention_heads")
    cfg = config_from_dict(dict(TINY, model_type=model_type, model=model_cfg))
    model = build_model(cfg)
    ids = torch.randint(0, 256, (1, 32))
    with FlopCounterMode(display=False) as counter:  # counts matmuls; CPU SDPA counts 0
        lm_loss(model(ids, cu_seqlens=torch.tensor([0, 32], dtype=torch.int32)), ids).backward()
    ours_without_attention = step_flops(cfg, 32, [])
    assert counter.get_total_flops() == pytest.approx(ours_without_attention, rel=1e-9)


def test_attention_flops_by_hand():
    cfg = tiny_cfg()
    h, layers = 32, 2
    # two segments of 3 and 2 tokens: keys attended = (1+2+3) + (1+2) = 9; 4*h per key
    extra = step_flops(cfg, 5, [3, 2]) - step_flops(cfg, 5, [])
    assert extra == pytest.approx(3 * layers * 4 * h * 9)


def test_recompute_adds_one_forward_of_the_blocks():
    plain = step_flops(tiny_cfg(), 32, [32])
    ck = step_flops(tiny_cfg(**{"model.checkpoint": True}), 32, [32])
    head = 2 * 32 * 256 * 32
    assert ck - plain == pytest.approx((plain / 3) - head)


def test_train_py_entry_point(tmp_path):
    cfg_file = tmp_path / "tiny.py"
    body = json.dumps(json.dumps(TINY))
    cfg_file.write_text(f"import json\nglobals().update(json.loads({body}))\n")
    run = subprocess.run([sys.executable, "train.py", "--config", str(cfg_file), "--launcher",
                          "torch", "--run-dir", str(tmp_path / "r"), "--set",
                          "data.total_steps=2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "step     2" in run.stdout
    bad = subprocess.run([sys.executable, "train.py", "--config", str(cfg_file), "--set",
                          "data.totl_steps=2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "did you mean 'total_steps'" in bad.stderr


def test_token_ids_beyond_vocab_are_a_clear_error(tmp_path):
    trainer = make_trainer(tiny_cfg(**{"model.vocab_size": 64}), tmp_path)
    with pytest.raises(ValueError, match="model.vocab_size=64"):
        trainer.fit()
