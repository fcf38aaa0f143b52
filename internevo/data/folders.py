"""InternEvo's folder layouts.

Training: ``train_folder/<type>/**/*.bin``; the type names are the sorted first-level
sub-directories and a type's id is its index in that list.  Validation: every directory that
directly holds ``.bin`` files is one validation set named after the directory.  Walks follow
symlinks and visit directories and files in sorted order, so every rank sees the same list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from internevo.data.errors import DataError


def _walk_bins(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if f.endswith(".bin")]
    return found


def train_files(folder: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(type names, [(bin path, type id)])`` of a training folder; errors name the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: data.train_folder is not a directory")
    top_bins = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(".bin"))
    if top_bins:
        raise DataError(f"{top_bins[0]}: .bin files must sit in a type sub-folder "
                        f"({root}/<type>/..., e.g. {root}/en/{top_bins[0].name})")
    types = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(path, tid) for tid, name in enumerate(types) for path in _walk_bins(root / name)]
    if not files:
        raise DataError(f"{folder}: no .bin files under data.train_folder (expected "
                        "<train_folder>/<type>/**/*.bin)")
    return types, files


def min_length_for(path: Path, min_length: int, per_path: Optional[dict]) -> int:
    """``min_length`` with the ``min_length_dict`` override whose key is a substring of ``path``."""
    hits = [key for key in (per_path or {}) if key in str(path)]
    if len(hits) > 1:
        raise DataError(f"{path}: matches several data.min_length_dict keys {hits}; at most "
                        "one may match a file")
    return int(per_path[hits[0]]) if hits else min_length


def valid_sets(folder: str | Path) -> dict[str, list[Path]]:
    """``{set name: [bin paths]}``: one set per directory that directly holds ``.bin`` files."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: data.valid_folder is not a directory")
    groups: dict[Path, list[Path]] = {}
    for path in _walk_bins(root):
        groups.setdefault(path.parent, []).append(path)
    if not groups:
        raise DataError(f"{folder}: no .bin files under data.valid_folder")
    names = [d.name for d in groups]
    # Two leaves with the same name (a/en, b/en) keep their relative paths instead of colliding.
    return {(d.name if names.count(d.name) == 1 else str(d.relative_to(root))): files
            for d, files in groups.items()}
