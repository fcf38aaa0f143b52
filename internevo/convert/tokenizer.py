"""Tokenizer files of a Hugging Face export: a SentencePiece model (or a tokenizer folder)
copied so that ``AutoTokenizer.from_pretrained`` works offline, and its special-token ids."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from internevo.config import TrainConfig
from internevo.convert.hf_config import HFConversionError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class SentencePieceInfo:
    """What the export needs to know about a SentencePiece model."""

    ids: dict
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` for config.json (pad defaults to eos)."""
    pieces: dict
    """``bos_token``/``eos_token``/``unk_token`` strings for tokenizer_config.json."""
    vocab_size: int
    """Number of pieces."""
    add_dummy_prefix: bool
    """Whether '▁' is prepended to the text (InternLM's models: no)."""


def sentencepiece_info(model_file: Union[str, Path]) -> SentencePieceInfo:
    """Special tokens, size and prefix rule of a SentencePiece model."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.normalizer_spec.name != "identity":  # InternLM's models use identity
        log.warning("%s: SentencePiece normalizer %r: transformers' LlamaTokenizer does not apply "
                    "it, so its ids may differ from SentencePiece's on some text", model_file,
                    proto.normalizer_spec.name)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {f"{k}_token_id": (v if v >= 0 else None) for k, v in special.items() if k != "unk"}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    pieces = {f"{k}_token": sp.id_to_piece(v) for k, v in special.items()
              if k != "pad" and v >= 0}
    return SentencePieceInfo(ids, pieces, sp.vocab_size(),
                             bool(proto.normalizer_spec.add_dummy_prefix))


def write_tokenizer(tokenizer_path: Union[str, Path], out: Path) -> dict:
    """Copy the tokenizer into ``out`` so ``AutoTokenizer.from_pretrained(out)`` works offline.

    A SentencePiece file becomes ``tokenizer.model`` + a ``LlamaTokenizer``
    ``tokenizer_config.json`` (plus ``tokenizer.json`` when transformers is installed to build
    it); a folder's tokenizer files are copied.  Returns the special-token ids for config.json.
    """
    src = Path(tokenizer_path)
    if src.is_dir():
        for f in src.iterdir():
            if f.name in _TOKENIZER_FILES or re.fullmatch(r"tokenization_\w+\.py", f.name):
                shutil.copy2(f, out / f.name)
        sp_file = out / "tokenizer.model"
        return sentencepiece_info(sp_file).ids if sp_file.is_file() else {}
    if not src.is_file():
        raise HFConversionError(f"{src}: tokenizer not found")
    shutil.copy2(src, out / "tokenizer.model")
    info = sentencepiece_info(src)
    config = {"tokenizer_class": "LlamaTokenizer", **info.pieces, "add_bos_token": True,
              "add_eos_token": False, "add_prefix_space": info.add_dummy_prefix, "legacy": True,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _add_fast_tokenizer(out)
    return info.ids


def _add_fast_tokenizer(out: Path) -> None:
    """Let transformers build ``tokenizer.json`` from the SentencePiece model (fast loading)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # transformers is optional: the .model + config are enough to load
        return
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def check_tokenizer(tokenizer_path: Union[str, Path], cfg: TrainConfig) -> Optional[dict]:
    """Special-token ids of a SentencePiece tokenizer that fits the model (None for a folder)."""
    path = Path(tokenizer_path)
    if path.is_dir():
        return None
    if not path.is_file():
        raise HFConversionError(f"{path}: tokenizer not found")
    info = sentencepiece_info(path)
    if info.vocab_size > cfg.model.vocab_size:
        raise HFConversionError(f"{path}: tokenizer has {info.vocab_size} tokens but the "
                                f"model's vocab_size is {cfg.model.vocab_size}")
    return info.ids
