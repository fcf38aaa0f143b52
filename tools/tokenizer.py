"""InternEvo's raw-data tokenizer: ``python tools/tokenizer.py --text_input_path IN
--bin_output_path OUT.bin [--tokenizer_path MODEL]`` (see ``internevo.data.tools``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from internevo.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prefix=["tokenize"]))
