"""Input errors reached from the command line are one line (no traceback unless --debug)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = """
model = dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size={vocab},
             mlp_ratio=1.0, multiple_of=16, dtype="torch.float32", use_flash_attn=False)
data = dict(seq_len=8, micro_bsz=1, micro_num=1, total_steps=1, num_worker=0)
enable_tb = False
ckpt = dict(enable_save_ckpt=False)
"""


def run(tmp_path, body, *extra):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(body)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg),
                           "--run-dir", str(tmp_path / "run"), *extra], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_token_id_beyond_vocab_is_one_line(tmp_path):
    out = run(tmp_path, TINY.format(vocab=10))  # dummy samples start [n, r], 10 <= r < 200
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith("data error: batch 0: token id")
    assert "model.vocab_size=10;" in lines[0]


def test_moe_config_is_one_line_and_debug_shows_the_traceback(tmp_path):
    body = 'model_type = "INTERNLM_MoE"\n' + TINY.format(vocab=256)
    out = run(tmp_path, body)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("config error: ") and out.stderr.strip().endswith(
        "model_type: 'INTERNLM_MoE': MoE models are not supported by this version (dense "
        "INTERNLM and INTERNLM2 only)")
    debug = run(tmp_path, body, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
