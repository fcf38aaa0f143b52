"""InternEvo's entry point: ``python train.py --config CONFIG [--launcher torch|slurm]``."""

import sys

from internevo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
