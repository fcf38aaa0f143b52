"""LLaMA 2 (``model_type="LLAMA2"``): the model and its spec."""

from internevo.models.llama.model import Llama
from internevo.models.llama.spec import SPEC

__all__ = ["SPEC", "Llama"]
