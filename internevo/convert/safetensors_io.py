"""Safetensors files of a Hugging Face folder: reading every shard, writing sharded + indexed.

Only safetensors are read (never pickle).  The split into shards is ``huggingface_hub``'s
(:func:`huggingface_hub.split_torch_state_dict_into_shards`, the helper ``transformers`` uses),
so the file names and the index are the ones Hugging Face tools write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from internevo.convert.hf_config import HFConversionError
from internevo.errors import last_line

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    """A JSON file of a Hugging Face folder (errors name the file)."""
    if not path.is_file():
        raise HFConversionError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConversionError(f"{path}: not valid JSON ({err})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` (from the index when there is one); never pickle files."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise HFConversionError(f"{f}: missing (named by {index.name})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("bin", "pt", "pth") for p in folder.glob(f"*.{ext}"))
        hint = (f"; found {pickles[:3]}: pickle files are not read, re-save them as safetensors"
                if pickles else "")
        raise HFConversionError(f"{folder}: no .safetensors weights{hint}")
    return files


def read_safetensors(folder: Union[str, Path]) -> dict[str, Tensor]:
    """Every tensor of the safetensors shards of ``folder`` (index-listed keys must be present)."""
    from safetensors import safe_open

    folder = Path(folder)
    out: dict[str, Tensor] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    out[key] = reader.get_tensor(key)
        except Exception as err:  # SafetensorError (not importable by name) or an OSError
            if isinstance(err, HFConversionError):
                raise
            raise HFConversionError(f"{f}: unreadable safetensors file ({last_line(str(err))}); "
                                    "it is truncated or damaged: export or download it again"
                                    ) from err
    index = folder / INDEX_FILE
    if index.is_file():
        for key, name in read_json(index)["weight_map"].items():
            if key not in out:
                raise HFConversionError(f"{folder / name}: tensor {key!r} listed in {index.name} "
                                        "is missing")
    return out


def write_safetensors_shards(hf_sd: dict[str, Tensor], out: Path, dtype: torch.dtype,
                             max_shard_bytes: int) -> None:
    """``model-0000i-of-0000n.safetensors`` (``model.safetensors`` for one shard) + the index
    (always written), floating-point tensors cast to ``dtype``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    # sizes from meta stand-ins in the target dtype: q/k/v views of one fused tensor must count
    # separately (huggingface_hub would group tensors that share a storage)
    meta = {k: torch.empty(t.shape, dtype=cast(t[:0]).dtype, device="meta")
            for k, t in hf_sd.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_bytes)
    for name, keys in split.filename_to_tensors.items():
        # clone: views of one fused tensor share storage, which safetensors rejects
        save_file({k: cast(hf_sd[k]).clone(memory_format=torch.contiguous_format) for k in keys},
                  str(out / name), metadata={"format": "pt"})
    index = {"metadata": {**split.metadata, "total_size": sum(
        t.numel() * t.element_size() for t in meta.values())},
             "weight_map": split.tensor_to_filename}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
