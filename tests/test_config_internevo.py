"""InternEvo configs: inheritance with ``read_base``, and named refusals of what is not built."""

import textwrap

import pytest

from internevo.config import ConfigError, config_from_dict, load_config, section_to_dict

RUNTIME = """
cudnn_deterministic = False
grad_scaler = dict(fp16=dict(initial_scale=2**14, min_scale=1, growth_interval=500),
                   growth_factor=2, backoff_factor=0.5, max_scale=2**24, hysteresis=2)
hybrid_zero_optimizer = dict(overlap_sync_grad=True, clip_grad_norm=1.0)
"""
MODEL = """
model_type = "INTERNLM2_PUBLIC"
VOCAB_SIZE = 320
HIDDEN_SIZE = 64
model = dict(num_layers=2, hidden_size=HIDDEN_SIZE, vocab_size=VOCAB_SIZE, num_attention_heads=4,
             num_kv_attention_heads=2, mlp_ratio=2.0, dtype="torch.float32", rope_base=1e6)
hybrid_zero_optimizer = dict(overlap_sync_grad=False, clip_grad_norm=0.5)
"""
DEMO = """
from internlm.utils.utils import read_base

with read_base():
    from configs._base_.default_runtime import *  # noqa
    from configs._base_.models.tiny import *  # noqa

JOB_NAME = "inherit"
SEQ_LEN = 32
data = dict(seq_len=SEQ_LEN, micro_bsz=2, micro_num=1, total_steps=5)
model["num_layers"] = 3  # a base section edited in place
"""
FLAT = """
cudnn_deterministic = False
grad_scaler = dict(fp16=dict(initial_scale=2**14, min_scale=1, growth_interval=500),
                   growth_factor=2, backoff_factor=0.5, max_scale=2**24, hysteresis=2)
model_type = "INTERNLM2_PUBLIC"
VOCAB_SIZE = 320
HIDDEN_SIZE = 64
model = dict(num_layers=3, hidden_size=64, vocab_size=320, num_attention_heads=4,
             num_kv_attention_heads=2, mlp_ratio=2.0, dtype="torch.float32", rope_base=1e6)
hybrid_zero_optimizer = dict(overlap_sync_grad=False, clip_grad_norm=0.5)
JOB_NAME = "inherit"
SEQ_LEN = 32
data = dict(seq_len=32, micro_bsz=2, micro_num=1, total_steps=5)
"""


def tree(root):
    files = {"configs/_base_/default_runtime.py": RUNTIME, "configs/_base_/models/tiny.py": MODEL,
             "configs/demo.py": DEMO, "elsewhere/flat.py": FLAT}
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(body))
    return root / "configs" / "demo.py", root / "elsewhere" / "flat.py"


def values(cfg):
    out = section_to_dict(cfg)
    out.pop("source")
    return out


def test_read_base_config_equals_its_flattened_version(tmp_path, monkeypatch):
    demo, flat = tree(tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")  # found from the file's folder, not the cwd
    inherited, expected = load_config(demo), load_config(flat)
    assert values(inherited) == values(expected)
    assert inherited.hybrid_zero_optimizer.clip_grad_norm == 0.5  # the later import wins
    assert inherited.constants == {"VOCAB_SIZE": 320, "HIDDEN_SIZE": 64, "SEQ_LEN": 32}
    # the text saved with checkpoints is flat: it loads away from the configs/ tree
    copy = tmp_path / "elsewhere" / "saved.py"
    copy.write_text(inherited.text)
    assert values(load_config(copy)) == values(expected)


def test_missing_base_is_named(tmp_path):
    demo, _ = tree(tmp_path)
    (tmp_path / "configs" / "_base_" / "models" / "tiny.py").unlink()
    with pytest.raises(ConfigError, match=r"configs\._base_\.models\.tiny.*configs/_base_/models/"
                                          r"tiny\.py"):
        load_config(demo)


@pytest.mark.parametrize("values,key", [
    (dict(model_type="INTERNLM_MoE"), "model_type"),
    (dict(model=dict(moe_type="GShard")), "model.moe_type"),
    (dict(model=dict(moe_use_residual=False)), "model.moe_use_residual"),
    (dict(model=dict(num_experts=4)), "model.num_experts"),
])
def test_moe_is_refused_by_name(values, key):
    with pytest.raises(ConfigError, match=rf"{key}.*MoE models are not supported by this version"):
        config_from_dict(values)


def test_deepnorm_is_refused_with_what_it_is():
    assert not config_from_dict({"model_type": "INTERNLM2_PUBLIC",
                                 "model": dict(deepnorm=False)}).model.deepnorm
    with pytest.raises(ConfigError, match=r"model\.deepnorm: DeepNorm \(post-norm residuals.*"
                                          r"not supported"):
        config_from_dict({"model_type": "INTERNLM2_PUBLIC", "model": dict(deepnorm=True)})


def test_norm_head_with_isp_is_refused():
    model = {"model_type": "INTERNLM2_PUBLIC", "model": dict(norm_head=True)}
    assert config_from_dict(model).model.norm_head
    with pytest.raises(ConfigError, match=r"model\.norm_head: is not supported with "
                                          r"parallel\.tensor\.mode='isp'"):
        config_from_dict({**model, "parallel": dict(tensor=dict(size=1, mode="isp"))})
