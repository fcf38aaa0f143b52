"""Command line: ``internevo train | dryrun | tokenize | tokenize-alpaca | convert | report |
plan``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from internevo.errors import InternEvoError, one_line, run_entry


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
    parser.add_argument("--profiling", choices=("memory",), default=None,
                        help="memory: per-module bytes of the first monitor.memory_profile_steps "
                             "steps into <run-dir>/memory/rank<r>/")
    add_dry_run_arguments(parser)


def add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dry-run`` and the rank it plays (internevo/train/dryrun.py)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="one fake-tensor step of one rank: per-rank bytes and traffic")
    parser.add_argument("--world", type=int, default=None,
                        help="dry run: the world size to plan for (required with --dry-run)")
    parser.add_argument("--rank", type=int, default=0, help="dry run: the rank to build")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="dry run: the device the run would train on")


def run_dry(args: argparse.Namespace) -> dict:
    """``--dry-run``: build rank ``--rank`` of a ``--world`` run on fake tensors, run one step,
    write ``<run dir>/dryrun.json`` and print the table; returns the report."""
    from internevo.config import ConfigError, load_config, parse_override
    from internevo.train.dryrun import dry_run, format_report, write_report
    from internevo.train.trainer import run_dir_for

    cfg = load_config(args.config, dict(parse_override(text) for text in args.set))
    if args.world is None:
        raise ConfigError("--dry-run needs --world N (the world size to plan for)")
    if not 0 <= args.rank < args.world:
        raise ConfigError(f"--rank {args.rank} is outside --world {args.world}")
    run_dir = run_dir_for(cfg, args.run_dir)
    report = dry_run(cfg, args.world, args.rank, args.device, args.seed, run_dir)
    path = write_report(report, run_dir)
    print(format_report(report))
    print(f"[internevo] dry run report: {path}")
    return report


def run_train(args: argparse.Namespace) -> list[dict]:
    """Launch, build and train; returns the per-step metric records of this rank."""
    from internevo.config import load_config, parse_override
    from internevo.launch import (
        apply_backend_flags,
        init_process_group,
        pick_device,
        read_launch_env,
        seed_everything,
        setup_logging,
        shutdown,
        start_liveness,
    )
    from internevo.models.attention import describe_backend
    from internevo.parallel.comm import Comm
    from internevo.parallel.layout import ParallelLayout
    from internevo.train.interrupt import StopSignals
    from internevo.train.preflight import preflight
    from internevo.train.trainer import Trainer, run_dir_for

    overrides = dict(parse_override(text) for text in args.set)
    cfg = load_config(args.config, overrides)
    info = read_launch_env(args.launcher, port=args.port)
    layout = ParallelLayout.from_config(cfg, info.world_size, info.rank)  # validate before init
    run_dir = run_dir_for(cfg, args.run_dir)
    preflight(cfg, run_dir)
    setup_logging(info.rank, layout.is_log_rank)
    signals = StopSignals().install()
    try:
        device = pick_device(info.local_rank)
        apply_backend_flags(cfg, device)
        init_process_group(info, device, args.timeout)
        seed_everything(args.seed)
        layout.build_groups(args.timeout)
        comm = Comm(layout, device, liveness=start_liveness(info, args.timeout))
        if layout.is_log_rank:
            print(f"[internevo] {cfg.JOB_NAME}: {layout.describe()} | device {device} | "
                  f"run dir {run_dir}")
            m = cfg.model
            print(f"[internevo] {describe_backend(device, m.use_flash_attn, m.attn_drop_rate)}")
        trainer = Trainer(cfg, layout, comm, device, run_dir, args.seed, signals=signals)
        if args.profiling == "memory":
            from internevo.profiling.memory import attach_memory_profiler

            attach_memory_profiler(trainer)
        history = trainer.fit()
        if args.comm_report and layout.is_log_rank:
            print(comm.report())
        shutdown()
    finally:
        signals.restore()
    return history


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``internevo`` command: every failure is one line on stderr (a
    traceback too with ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # show tracebacks of input errors too
    commands = {"train": _train, "dryrun": _dryrun, "tokenize": _tokenize,
                "tokenize-alpaca": _alpaca, "convert": lambda rest: convert_main(rest, debug),
                "report": _report, "plan": _plan}

    def dispatch(args: list[str]) -> int:
        if not args or args[0] not in commands:
            print("usage: internevo [--debug] {train,dryrun,tokenize,tokenize-alpaca,convert,"
                  "report,plan} ...", file=sys.stderr)
            return 2
        return commands[args[0]](args[1:]) or 0

    return run_entry(dispatch, argv)


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="internevo train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    run_dry(args) if args.dry_run else run_train(args)
    return 0


def _dryrun(argv: list[str]) -> int:
    return _train([*argv, "--dry-run"])


def _tokenize(argv: list[str]) -> int:
    from internevo.data.tools import tokenize_main

    return tokenize_main(argv)


def _alpaca(argv: list[str]) -> int:
    from internevo.data.tools import alpaca_main

    return alpaca_main(argv)


# --------------------------------------------------------------------------------------------
# internevo convert

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
    "float": torch.float32,
}


def parse_size(text: str) -> int:
    """``10GB`` / ``500MB`` / ``2GiB`` / ``1048576`` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10GB, 500MB)")
    value, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(value) * (1024 if binary else 1000) ** power)


def parse_dtype(text: str) -> torch.dtype:
    """``bfloat16`` / ``bf16`` / ``torch.float16`` … -> torch dtype."""
    name = text.removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; use bfloat16, float16 or "
                                         "float32")
    return _DTYPE_NAMES[name]


def _to_hf(args: argparse.Namespace) -> int:
    from internevo.convert.hf_folder import export_hf, load_model_state_for_export

    sd, cfg = load_model_state_for_export(args.src)
    out = export_hf(sd, cfg, args.tgt, args.tokenizer, args.format, args.dtype,
                    args.max_shard, args.overwrite)
    print(f"wrote {args.format} Hugging Face folder {out} ({cfg.model_type}, {args.dtype})")
    if args.format == "internlm2":
        print("note: copy configuration_internlm2.py / modeling_internlm2.py from an InternLM2 "
              "release into it to load with trust_remote_code=True")
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    from internevo.checkpoint.format import save_model_state
    from internevo.config import config_from_dict
    from internevo.convert.hf_folder import load_hf
    from internevo.models.registry import get_spec

    sd, overrides = load_hf(args.src, args.model_type)
    if args.dtype is not None:
        sd = {k: v.to(args.dtype) for k, v in sd.items()}
        overrides["model"]["dtype"] = str(args.dtype)
    if "adapt_hf" in overrides["model"] and not args.adapt_hf:
        overrides["model"]["adapt_hf"] = False
    cfg = config_from_dict(overrides, str(Path(args.src) / "config.json"))
    order = get_spec(cfg.model_type).hf.from_hf_order
    sd = sd if order is None else order(sd, cfg)
    save_model_state(args.tgt, sd, cfg, args.overwrite)
    print(f"wrote checkpoint {args.tgt} ({cfg.model_type}); load it with "
          f"load_ckpt_info=dict(path={str(args.tgt)!r}, content=('model',), ckpt_type='internevo')")
    return 0


def build_convert_parser() -> argparse.ArgumentParser:
    """``internevo convert {to-hf,from-hf,from-internevo,to-internevo}``."""
    parser = argparse.ArgumentParser(prog="internevo convert")
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face folder")
    to.add_argument("--src", required=True, help="checkpoint folder (or a run's save folder)")
    to.add_argument("--tgt", required=True, help="Hugging Face folder to write")
    to.add_argument("--tokenizer", required=True, help="SentencePiece model (or tokenizer folder)")
    to.add_argument("--format", choices=("llama", "internlm2"), default="llama")
    to.add_argument("--dtype", type=parse_dtype, default=torch.bfloat16)
    to.add_argument("--max_shard", type=parse_size, default=10 * 10**9, help="e.g. 10GB")
    to.add_argument("--overwrite", action="store_true", help="replace a non-empty --tgt")
    to.set_defaults(run=_to_hf)
    back = sub.add_parser("from-hf", help="Hugging Face folder -> our checkpoint")
    back.add_argument("--src", required=True, help="Hugging Face folder (safetensors)")
    back.add_argument("--tgt", required=True, help="checkpoint folder to write")
    back.add_argument("--dtype", type=parse_dtype, default=None, help="default: keep the weights'")
    back.add_argument("--model_type", default=None,
                      help="registered model to read it as (default: the first that matches)")
    back.add_argument("--adapt_hf", type=lambda s: s.lower() in ("1", "true", "yes"),
                      default=True, help="InternLM2: false stores q/k interleaved")
    back.add_argument("--overwrite", action="store_true", help="replace a non-empty --tgt")
    back.set_defaults(run=_from_hf)
    from internevo.convert.internevo_folder import add_parsers

    add_parsers(sub)
    return parser


def convert_main(argv: Sequence[str], debug: bool = False) -> int:
    """Entry point of ``internevo convert`` and of ``tools/transformers/*.py``."""
    args = build_convert_parser().parse_args(list(argv))
    try:
        return args.run(args)
    except (InternEvoError, FileExistsError, FileNotFoundError) as err:
        if debug:
            raise
        print(one_line(err), file=sys.stderr)
        return 2


def _report(argv: list[str]) -> int:
    from internevo.profiling.report import report_main

    return report_main(argv)


def _plan(argv: list[str]) -> int:
    from internevo.profiling.planner import plan_main

    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
