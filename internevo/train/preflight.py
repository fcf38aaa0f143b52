"""Checks made before any process group, model or step exists: what would otherwise fail late.

A run folder or save folder that is a regular file, or lies under one, or cannot be written is
found here, not at the first save after the steps have run.
"""

from __future__ import annotations

import os
from pathlib import Path

from internevo.config import ConfigError, TrainConfig


def check_output_folder(path: Path, key: str) -> None:
    """``path`` is a folder that this user can create or write (the error names ``key``)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: is a regular file, not a folder; name a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {existing} is a regular file, so no folder "
                          "can be made under it; name another folder")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r}: {existing} is not writable by this user; "
                          "name a folder you can write")


def preflight(cfg: TrainConfig, run_dir: Path) -> None:
    """``ckpt.load_ckpt_info`` is well-formed and every output folder of the run is usable (run
    folder, save folder, stop file's folder)."""
    from internevo.checkpoint.format import local_path
    from internevo.checkpoint.manager import parse_load_info

    ck = cfg.ckpt
    if ck.load_ckpt_info is not None:
        parse_load_info(ck.load_ckpt_info)
    check_output_folder(run_dir, "--run-dir")
    if ck.enable_save_ckpt and ck.save_ckpt_folder:
        check_output_folder(local_path(ck.save_ckpt_folder, "ckpt.save_ckpt_folder"),
                            "ckpt.save_ckpt_folder")
    if ck.stop_file_path:
        stop = local_path(ck.stop_file_path, "ckpt.stop_file_path")
        if stop.is_dir():
            raise ConfigError(f"ckpt.stop_file_path={ck.stop_file_path!r}: is a folder; name a "
                              "file (it is created with '0' at start)")
        check_output_folder(stop.parent, "ckpt.stop_file_path (its folder)")
