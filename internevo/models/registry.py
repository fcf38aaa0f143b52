"""``model_type`` -> :class:`~internevo.models.base.ModelSpec`: one line per model folder."""

from __future__ import annotations

from internevo.models.base import ModelSpec
from internevo.models.internlm import SPEC as INTERNLM
from internevo.models.internlm2 import SPEC as INTERNLM2

MODEL_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    INTERNLM,
    INTERNLM2,
)}


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
