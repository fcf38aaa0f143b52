"""Data: tokenized ``.bin``/``.meta`` files, packing, sampling, streaming, dummy data, tools.

The heavy entry points are imported lazily so that the tokenizer tools start without torch.
See ``docs/data.md``.
"""

from __future__ import annotations

from typing import Any

from internevo.data.errors import DataError

_LAZY = {
    "build_train_loader": "internevo.data.loader",
    "build_valid_loaders": "internevo.data.loader",
    "TrainLoader": "internevo.data.loader",
    "ValidLoader": "internevo.data.loader",
    "parse_skip_batches": "internevo.data.sampler",
    "load_tokenizer": "internevo.data.tokenizer",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'internevo.data' has no attribute {name!r}")
