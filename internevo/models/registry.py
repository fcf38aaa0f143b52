"""``model_type`` -> :class:`~internevo.models.base.ModelSpec`: one import line per model folder.

Registering a model is importing its folder's ``SPEC`` here; the registry holds every spec
imported into this module, in import order (the order ``convert`` tries them when it reads a
Hugging Face config.json).
"""

from __future__ import annotations

from internevo.models.base import ModelSpec
from internevo.models.internlm import SPEC as INTERNLM  # noqa: F401
from internevo.models.internlm2 import SPEC as INTERNLM2_PUBLIC  # noqa: F401
from internevo.models.llama import SPEC as LLAMA2  # noqa: F401

MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec for spec in list(globals().values()) if isinstance(spec, ModelSpec)}


def get_spec(model_type: str) -> ModelSpec:
    """The spec of ``model_type``; an unknown type names the registered ones."""
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; registered: "
                         f"{', '.join(MODEL_REGISTRY)}") from None


def foreign_keys(model_type: str) -> dict[str, list[str]]:
    """``model.*`` keys that other registered types own and ``model_type`` does not accept,
    each with the types that do."""
    mine = get_spec(model_type).own_keys
    out: dict[str, list[str]] = {}
    for spec in MODEL_REGISTRY.values():
        for key in spec.own_keys - mine:
            out.setdefault(key, []).append(spec.name)
    return out
