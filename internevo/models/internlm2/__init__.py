"""InternLM2 (``model_type="INTERNLM2_PUBLIC"``): the model and its spec."""

from internevo.models.internlm2.model import InternLM2
from internevo.models.internlm2.spec import SPEC

__all__ = ["SPEC", "InternLM2"]
