"""Shared pieces of the reliability suite (tests/test_reliability.py, tests/test_faults.py):
a tiny config file, a CLI runner that checks the one-line contract, tree hashes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    JOB_NAME="rel", model_type="INTERNLM2_PUBLIC",
    data=dict(seq_len=16, micro_bsz=2, micro_num=1, total_steps=2, num_worker=0),
    model=dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2,
               vocab_size=256, dtype="torch.float32", mlp_ratio=2.0, multiple_of=16),
    adam=dict(lr=1e-3), ckpt=dict(enable_save_ckpt=False, auto_resume=False),
    parallel=dict(zero1=dict(size=-1)),
)


def write_config(path: Path, **sections: dict) -> Path:
    """A config file holding :data:`TINY` with ``sections`` merged in (section by section)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, extra in sections.items():
        values[name] = {**values.get(name, {}), **extra} if isinstance(extra, dict) else extra
    body = json.dumps(json.dumps(values))
    path.write_text(f"import json\nglobals().update(json.loads({body}))\n")
    return path


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (protected files stay equal)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


KINDS = ("config error", "data error", "checkpoint error", "conversion error", "launch error",
         "peer lost", "interrupted", "OS error", "write failed", "safetensors error", "error")
"""What an error line starts with (``<kind>: <message>``, internevo/errors.py)."""


def error_line(rc: int, err: str, code: int, *needles: str) -> str:
    """Check the one-line contract: exit ``code``, exactly one ``<kind>: ...`` line on stderr
    holding every needle, no traceback; returns the line."""
    lines = [ln for ln in err.splitlines() if ln.split(":")[0] in KINDS]
    assert rc == code, (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_process(config: Path, run_dir: Path, *sets: str, rank: int = 0, world: int = 1,
                  port: int = 0, timeout: float = 60) -> subprocess.Popen:
    """``python train.py`` as a child process (rank ``rank`` of ``world`` without torchrun)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if world > 1:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--run-dir",
            str(run_dir), "--timeout", str(timeout)]
    for item in sets:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    """Read ``proc``'s stdout until a line starts with ``prefix`` (fails if it ends first)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"process ended before a {prefix!r} line: {proc.stderr.read()[-2000:]}")
