"""InternLM v1 (``model_type="INTERNLM"``): the model and its spec."""

from internevo.models.internlm.model import InternLM
from internevo.models.internlm.spec import SPEC

__all__ = ["SPEC", "InternLM"]
