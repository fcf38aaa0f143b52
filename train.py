"""InternEvo's entry point: ``python train.py --config CONFIG [--launcher torch|slurm]``."""

import sys

from internevo.entry import main

if __name__ == "__main__":
    sys.exit(main(prefix=["train"]))
