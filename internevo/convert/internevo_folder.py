"""``internevo convert from-internevo`` / ``to-internevo``: whole folders between InternEvo's
checkpoint layout (:mod:`internevo.convert.internevo`) and ours (:mod:`internevo.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from internevo.checkpoint.format import load_model_state, save_model_state
from internevo.checkpoint.manager import PARTS, write_full_checkpoint
from internevo.config import TrainConfig, load_config
from internevo.convert.internevo import (
    InternEvoCheckpointError,
    read_checkpoint,
    read_model,
    require_checkpoint,
    saved_config_text,
    scan,
    write_model,
)


def _config_for(folder: Path, config: Optional[str]) -> tuple[TrainConfig, str]:
    """(config, its text): ``--config``, else the text InternEvo saved in ``config_file.pt``."""
    if config is not None:
        cfg = load_config(config)
        return cfg, cfg.text
    text = saved_config_text(folder)
    if text is None:
        raise InternEvoCheckpointError(f"{folder}: no config_file.pt; pass --config with the "
                                       "run's config file (model_config.pt is not read: it "
                                       "pickles InternEvo's Config class)")
    tmp = folder.parent / f".{folder.name}.config-{id(text)}.py"
    tmp.write_text(text)
    try:
        cfg = load_config(tmp)
    finally:
        tmp.unlink()
    return cfg, text


def from_internevo(src: Path, tgt: Path, config: Optional[str] = None) -> Path:
    """Write the InternEvo checkpoint ``src`` as ours: ``tgt/<step>/`` (everything it holds;
    point ``save_ckpt_folder`` or ``load_ckpt_info.path`` at ``tgt``), or a model-only folder
    ``tgt`` when ``src`` has no optimizer files."""
    folder = require_checkpoint(src)
    cfg, text = _config_for(folder, config)
    lay = scan(folder)
    if not lay.zero1:
        return save_model_state(tgt, read_model(folder, cfg, lay), cfg)
    full = read_checkpoint(folder, cfg, frozenset(PARTS))
    layout = {"world_size": lay.world, "tensor": lay.tensor, "data": lay.data,
              "pipeline": lay.pipeline, "zero1": lay.zero1, "fsdp": False}
    tgt.mkdir(parents=True, exist_ok=True)
    return write_full_checkpoint(tgt, cfg, full, layout, text)


def to_internevo(src: Path, tgt: Path, tp: int, pp: int) -> list[Path]:
    """Model weights of our checkpoint ``src`` as InternEvo's ``model_tp{t}_pp{p}.pt`` files
    in ``tgt``, with ``model_config.pt`` (a plain dict) and ``config_file.pt`` (the config
    text), which InternEvo's loaders and ``transformers/`` conversion tools read."""
    sd, cfg = load_model_state(src)
    tgt.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in tgt.glob("model_tp*_pp*.pt"))
    if existing:
        raise FileExistsError(f"{tgt}: already holds {existing[0]}; choose an empty folder")
    written = write_model(sd, cfg, tgt, tp, pp)
    model = {f: getattr(cfg.model, f) for f in vars(cfg.model) if not f.startswith("_")}
    torch.save({**model, "num_kv_attention_heads": cfg.num_kv_heads}, tgt / "model_config.pt")
    torch.save(cfg.text or "", tgt / "config_file.pt")
    return written


def add_parsers(sub: Any) -> None:
    """``from-internevo`` and ``to-internevo`` under ``internevo convert``."""
    back = sub.add_parser("from-internevo", help="InternEvo checkpoint folder -> our checkpoint")
    back.add_argument("src", help="an InternEvo step folder, or its save folder (the newest)")
    back.add_argument("tgt", help="folder to write (our checkpoint goes into tgt/<step>/)")
    back.add_argument("--config", default=None,
                      help="the run's config file (default: the text in config_file.pt)")
    back.set_defaults(run=lambda a: _report(from_internevo(Path(a.src), Path(a.tgt), a.config)))
    to = sub.add_parser("to-internevo", help="our checkpoint -> InternEvo model_tp*_pp*.pt files")
    to.add_argument("src", help="our checkpoint folder (or a run's save folder)")
    to.add_argument("tgt", help="folder for model_tp{t}_pp{p}.pt")
    to.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write")
    to.add_argument("--pp", type=int, default=1, help="pipeline stages to write")
    to.set_defaults(run=lambda a: _report(to_internevo(Path(a.src), Path(a.tgt), a.tp, a.pp)))


def _report(result: Any) -> int:
    shown = result if isinstance(result, Path) else f"{len(result)} files in {result[0].parent}"
    print(f"wrote {shown}")
    return 0
