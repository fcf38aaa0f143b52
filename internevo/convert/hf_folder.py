"""Hugging Face folders: export (safetensors shards + index, config.json,
generation_config.json, tokenizer) and import (safetensors only, every check before any write).

A bad folder raises one :class:`~internevo.convert.hf_config.HFConversionError` naming the file
or the key, and the target is replaced only once the new one is complete.  Our own checkpoints
are read and written through :mod:`internevo.checkpoint.format`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from internevo.checkpoint.format import CheckpointError, load_model_state, staged_dir
from internevo.config import TrainConfig
from internevo.convert.hf import from_hf_state_dict, to_hf_state_dict
from internevo.convert.hf_config import (
    HFConversionError,
    check_against_run,
    detect_format,
    hf_config_dict,
)
from internevo.convert.safetensors_io import read_json, read_safetensors, write_safetensors_shards
from internevo.convert.tokenizer import check_tokenizer, write_tokenizer
from internevo.models.registry import get_spec

log = logging.getLogger(__name__)


def load_model_state_for_export(path: Union[str, Path]) -> tuple[dict[str, Tensor], TrainConfig]:
    """(model state dict, run config) of one of our checkpoints or model-only folders (a run's
    save folder: its newest checkpoint), in the single-process model's shapes."""
    try:
        return load_model_state(path)
    except CheckpointError as err:
        raise HFConversionError(str(err)) from None


def load_hf(folder: Union[str, Path], model_type: Optional[str] = None
            ) -> tuple[dict[str, Tensor], dict]:
    """A HF folder (``llama`` or ``internlm2`` layout, safetensors only) -> (our state dict,
    config overrides); the layout comes from config.json's ``architectures``/``model_type``, the
    model from the registered specs (or ``model_type``)."""
    folder = Path(folder)
    hf_config = read_json(folder / "config.json")
    fmt = detect_format(hf_config, str(folder / "config.json"))
    return from_hf_state_dict(read_safetensors(folder), hf_config, fmt, str(folder), model_type)


def load_hf_for_training(folder: Union[str, Path], cfg: TrainConfig) -> dict[str, Tensor]:
    """State dict for ``cfg``'s model from a HF folder (``ckpt_type="hf"``).

    Shape mismatches with the run's config raise (naming the config.json field); numeric
    differences (RoPE base, norm eps) are logged as warnings.  The q/k order follows
    ``cfg.model.adapt_hf`` (``spec.hf.from_hf_order``).
    """
    sd, overrides = load_hf(folder, cfg.model_type)
    for warning in check_against_run(overrides, cfg, str(Path(folder) / "config.json")):
        log.warning(warning)
    order = get_spec(cfg.model_type).hf.from_hf_order
    return sd if order is None else order(sd, cfg)


def export_hf(model_state_dict: dict[str, Tensor], cfg: TrainConfig, out_dir: Union[str, Path],
              tokenizer_path: Optional[Union[str, Path]], fmt: str = "llama",
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 10 * 10**9,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face folder: safetensors shards + index, config.json,
    generation_config.json and the tokenizer files.  ``out_dir`` is replaced only when complete.
    """
    hf_sd = to_hf_state_dict(model_state_dict, cfg, fmt)  # every check before any write
    ids = check_tokenizer(tokenizer_path, cfg) if tokenizer_path is not None else None
    with staged_dir(out_dir, overwrite) as tmp:
        write_safetensors_shards(hf_sd, tmp, dtype, max_shard_bytes)
        if tokenizer_path is not None:
            ids = write_tokenizer(tokenizer_path, tmp) or ids
        config = hf_config_dict(cfg, fmt, ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(out_dir)
