"""Command line: ``internevo train | tokenize | tokenize-alpaca | convert``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from internevo.config import ConfigError
from internevo.train.checkpoint import CheckpointError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of InternEvo's ``train.py`` that this project supports."""
    parser.add_argument("--config", required=True, help="path to a Python config file")
    parser.add_argument("--launcher", choices=("torch", "slurm"), default="torch",
                        help="where rank/world come from: torchrun's or Slurm's environment")
    parser.add_argument("--run-dir", default=None, help="run folder (default runs/<JOB_NAME>)")
    parser.add_argument("--seed", type=int, default=1024, help="seed of weights and dropout")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (Slurm)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="collective timeout in seconds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.total_steps=20")
    parser.add_argument("--comm-report", action="store_true",
                        help="print the per-collective byte table of the last step")


def run_train(args: argparse.Namespace) -> list[dict]:
    """Launch, build and train; returns the per-step metric records of this rank."""
    from internevo.config import load_config, parse_override
    from internevo.launch import (
        init_process_group,
        pick_device,
        read_launch_env,
        seed_everything,
        shutdown,
    )
    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.trainer import Trainer, run_dir_for

    overrides = dict(parse_override(text) for text in args.set)
    cfg = load_config(args.config, overrides)
    info = read_launch_env(args.launcher, port=args.port)
    layout = ParallelLayout.from_config(cfg, info.world_size, info.rank)  # validate before init
    device = pick_device(info.local_rank)
    init_process_group(info, device, args.timeout)
    seed_everything(args.seed)
    layout.build_groups()
    comm = Comm(layout)
    run_dir = run_dir_for(cfg, args.run_dir)
    if layout.is_log_rank:
        print(f"[internevo] {cfg.JOB_NAME}: {layout.describe()} | device {device} | "
              f"run dir {run_dir}")
    trainer = Trainer(cfg, layout, comm, device, run_dir, args.seed)
    history = trainer.fit()
    if args.comm_report and layout.is_log_rank:
        print(comm.report())
    shutdown()
    return history


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``internevo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "tokenize": _tokenize, "tokenize-alpaca": _alpaca,
                "convert": _convert}
    if not argv or argv[0] not in commands:
        print("usage: internevo {train,tokenize,tokenize-alpaca,convert} ...", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:]) or 0
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="internevo train")
    add_train_arguments(parser)
    run_train(parser.parse_args(argv))
    return 0


def _tokenize(argv: list[str]) -> int:
    from internevo.data.tools import tokenize_main

    return tokenize_main(argv)


def _alpaca(argv: list[str]) -> int:
    from internevo.data.tools import alpaca_main

    return alpaca_main(argv)


def _convert(argv: list[str]) -> int:
    from internevo.models.hf import convert_main

    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
