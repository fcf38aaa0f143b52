"""Config loading: shipped configs load, and bad input is one clear error naming key and file."""

import textwrap

import pytest

from internevo.config import ConfigError, load_config


def write(tmp_path, body: str):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("name", ["7B_sft.py", "7B_internlm2.py", "7B_llama2.py", "demo.py"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}")
    assert cfg.packed_length == cfg.data.seq_len * cfg.data.micro_bsz
    assert cfg.model.dtype in ("torch.bfloat16", "torch.float32")


def test_7b_values_follow_internevo():
    v1 = load_config("configs/7B_sft.py")
    assert (v1.model.num_layers, v1.model.hidden_size, v1.model.vocab_size) == (32, 4096, 103168)
    assert v1.constants["SEQ_LEN"] == 2048 and v1.hybrid_zero_optimizer.clip_grad_norm == 1.0
    v2 = load_config("configs/7B_internlm2.py")
    assert (v2.model_type, v2.num_kv_heads, v2.model.vocab_size) == ("INTERNLM2_PUBLIC", 8, 92544)
    llama = load_config("configs/7B_llama2.py")
    assert (llama.model_type, llama.num_kv_heads, llama.model.vocab_size) == ("LLAMA2", 8, 32000)


def test_model_type_defaults_and_foreign_keys(tmp_path):
    """LLAMA2's own default (adapt_hf=False) applies only where the file is silent; a key of
    another model type is refused, naming the types that accept it."""
    assert load_config(write(tmp_path, "model_type = 'LLAMA2'\n")).model.adapt_hf is False
    given = load_config(write(tmp_path, "model_type = 'LLAMA2'\nmodel = dict(adapt_hf=True)\n"))
    assert given.model.adapt_hf is True
    assert load_config(write(tmp_path, "model_type = 'INTERNLM2_PUBLIC'\n")).model.adapt_hf
    with pytest.raises(ConfigError, match=r"model\.norm_head: not a parameter of LLAMA2 "
                                          r"\(only of INTERNLM2_PUBLIC\)"):
        load_config(write(tmp_path, "model_type = 'LLAMA2'\nmodel = dict(norm_head=False)\n"))
    with pytest.raises(ConfigError, match=r"only of INTERNLM2_PUBLIC, LLAMA2"):
        load_config(write(tmp_path, "model = dict(adapt_hf=True)\n"))


def test_defaults_are_internevo_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "data = dict(seq_len=8, micro_bsz=1, total_steps=2)\n"))
    assert cfg.JOB_NAME == "AnonymousJob" and cfg.model_type == "INTERNLM"
    assert cfg.adam.lr == 1e-4 and cfg.adam.adam_beta2 == 0.95 and cfg.adam.weight_decay == 0.01
    assert cfg.lr_scheduler.warmup_ratio == 0.01 and cfg.lr_scheduler.eta_min == 1e-5
    assert cfg.grad_scaler.fp16.initial_scale == 2**16 and cfg.grad_scaler.hysteresis == 2
    assert cfg.parallel.zero1.size == -1 and cfg.parallel.tensor.mode == "mtp"
    assert cfg.ckpt.auto_resume is True and cfg.data.seed == 1024


def test_int_shorthand_for_parallel_sections(tmp_path):
    cfg = load_config(write(tmp_path, "parallel = dict(zero1=2, tensor=4, pipeline=1)\n"))
    assert cfg.parallel.zero1.size == 2 and cfg.parallel.tensor.size == 4


def test_typo_names_closest_key_and_file(tmp_path):
    path = write(tmp_path, "data = dict(seq_len=8, micro_bzs=2)\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "data.micro_bzs" in msg and "did you mean 'micro_bsz'" in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="hybrid_zero_optimiser: unknown key; did you mean "
                                          "'hybrid_zero_optimizer'"):
        load_config(write(tmp_path, "hybrid_zero_optimiser = dict(clip_grad_norm=1.0)\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_layers: expected int, got str '4'"):
        load_config(write(tmp_path, "model = dict(num_layers='4')\n"))


@pytest.mark.parametrize("body, key", [
    ("model = dict(hidden_size=100, num_attention_heads=8)", "model.num_attention_heads"),
    ("model_type = 'INTERNLM2_PUBLIC'\nmodel = dict(num_attention_heads=8, "
     "num_kv_attention_heads=3, hidden_size=64)", "model.num_kv_attention_heads"),
    ("model = dict(num_kv_attention_heads=4)", "model.num_kv_attention_heads"),
    ("model = dict(dtype='torch.int8')", "model.dtype"),
    ("data = dict(seq_len=0)", "data.seq_len"),
    ("data = dict(seq_len=8, micro_bsz=2, packed_length=10)", "data.packed_length"),
    ("parallel = dict(tensor=dict(size=2, mode='xsp'))", "parallel.tensor.mode"),
    ("parallel = dict(weight=dict(size=2))", "parallel.weight.size"),
    ("model = dict(norm_type='layernorm')", "model.norm_type"),
    ("model_type = 'GPT2'", "model_type"),
    ("adam = dict(adam_beta2=1.5)", "adam.adam_beta2"),
])
def test_impossible_values(tmp_path, body, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, body + "\n"))


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, "data = dict(seq_len=8, micro_bsz=1, total_steps=2)\n")
    assert load_config(path, {"data.total_steps": 7}).data.total_steps == 7
    with pytest.raises(ConfigError, match="data.total_stesp"):
        load_config(path, {"data.total_stesp": 7})


def test_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="could not execute"):
        load_config(write(tmp_path, "data = dict(\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")


def test_saved_text_reproduces_overrides(tmp_path):
    path = write(tmp_path, "data = dict(seq_len=8, micro_bsz=1, total_steps=2)\n")
    cfg = load_config(path, {"data.total_steps": 7, "model.hidden_size": 64})
    again = tmp_path / "again.py"
    again.write_text(cfg.text)
    reloaded = load_config(again)
    assert reloaded.data.total_steps == 7 and reloaded.model.hidden_size == 64
