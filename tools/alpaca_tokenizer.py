"""InternEvo's Alpaca tokenizer: ``python tools/alpaca_tokenizer.py DATASET OUT_DIR TOKENIZER
[--split_ratio 0.1]`` (see ``internevo.data.tools``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from internevo.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prefix=["tokenize-alpaca"]))
