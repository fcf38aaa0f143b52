"""Our checkpoint -> Hugging Face folder (same as ``internevo convert to-hf``).

    python tools/transformers/convert2hf.py --src CKPT --tgt HF_DIR --tokenizer TOKENIZER \
        [--format llama|internlm2] [--dtype bfloat16] [--max_shard 10GB] [--overwrite]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

from internevo.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prefix=["convert", "to-hf"]))
