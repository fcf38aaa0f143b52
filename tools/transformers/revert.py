"""Hugging Face folder (Llama or InternLM2 layout, safetensors) -> our checkpoint
(same as ``internevo convert from-hf``).

    python tools/transformers/revert.py --src HF_DIR --tgt CKPT [--dtype bfloat16] \
        [--adapt_hf false] [--overwrite]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from internevo.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prefix=["convert", "from-hf"]))
