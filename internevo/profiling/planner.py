"""``internevo plan``: which layouts of a config fit on N GPUs, and which is fastest.

Memory and communication come from the dry run (:func:`internevo.train.dryrun.dry_run`: rank 0's
real training step on fake tensors), so they follow the code.  A dry run of a deep model is slow,
so each layout is dry-run with 1 and 2 transformer blocks and every byte count is extrapolated
linearly to ``model.num_layers`` (blocks are identical: params, gradients, optimizer states, saved
activations and collective payloads grow by the same amount per block).

Per-rank peak memory (what the memory profiler's timeline peaks at):
``params + master + optimizer_states + max(grads, activations_peak + grads·[micro_num > 1])`` —
the last micro-batch's forward holds every activation on top of the gradients accumulated so far;
the end of backward holds the gradients.  A layout fits when that plus ``Hardware.reserve_gib``
(CUDA context, allocator fragmentation) is at most the GPU's memory.

Step time (per rank, every GPU does the same work):

* compute: the step's FLOPs (:func:`internevo.train.metrics.step_flops`: every matmul, causal
  attention per ``seq_len`` window, backward = 2x forward, recomputed blocks once more) divided by
  ``tensor.size``, at ``Hardware.efficiency`` of the dense bf16 peak;
* communication: each collective's counted payload over a ring: reduce-scatter and all-gather move
  ``(n-1)/n`` of it per rank, all-reduce twice that; at ``intra_gbs`` when the group lies inside
  one node (``--gpus-per-node`` consecutive ranks) else at ``inter_gbs`` (the node's network
  bandwidth shared by its GPUs);
* overlap: tensor-parallel collectives sit on the critical path (not overlapped); data-parallel
  ones (zero1, zero1_replica, data) are hidden by ``dp_overlap`` (a fraction) of the compute time.

``step = compute + tp_comm + max(0, dp_comm - dp_overlap * compute)``; TGS = tokens per GPU per
second, TFLOPS = FLOPs per GPU per second, MFU = TFLOPS / peak.  Every hardware number is a field
of :class:`Hardware`, overridable with ``--set-hw field=value``.  docs/performance.md compares the
predictions with InternEvo's published 7B numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import multiprocessing as mp
from pathlib import Path
from typing import Optional

from internevo.config import TrainConfig

GIB = 1 << 30
TP_GROUPS = ("tensor",)
"""Groups whose collectives are on the critical path."""


@dataclasses.dataclass
class Hardware:
    """One GPU type and its cluster (every field overridable with ``--set-hw``)."""

    name: str
    peak_tflops: float
    """Dense bf16 peak, TFLOP/s (A100: 312, H100/H200 SXM: 989)."""
    memory_gib: float
    """Memory per GPU (A100-80GB: 80, H100: 80, H200: 141)."""
    intra_gbs: float
    """Bus bandwidth of a collective inside a node, GB/s per GPU (NVLink; measured all-reduce
    bus bandwidth of NCCL is ~230 GB/s on A100 NVLink3, ~360 on H100/H200 NVLink4)."""
    inter_gbs: float
    """Network bandwidth per GPU, GB/s: the node's NICs shared by its GPUs (InternEvo's A100
    cluster: 4x100 Gb RoCE per 8 GPUs = 6.25 GB/s; 8x400 Gb InfiniBand per 8 H100s = 50 GB/s)."""
    efficiency: float = 0.6
    """Fraction of the peak the model's matmuls reach (one value for every layout)."""
    dp_overlap: float = 0.0
    """Fraction of the compute time that hides data-parallel communication (0: none)."""
    reserve_gib: float = 2.0
    """Memory not available to tensors (CUDA context, allocator fragmentation)."""


HARDWARE = {
    "A100": Hardware("A100", 312.0, 80.0, 230.0, 6.25),
    "H100": Hardware("H100", 989.0, 80.0, 360.0, 50.0),
    "H200": Hardware("H200", 989.0, 141.0, 360.0, 50.0),
}
LAYOUT_KEYS = ("parallel.tensor.size", "parallel.tensor.mode", "parallel.zero1.size",
               "parallel.zero1.fsdp", "model.checkpoint", "data.micro_bsz", "data.micro_num")


# -------------------------------------------------------------------------------- layouts
def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def with_layout(cfg: TrainConfig, layout: dict) -> TrainConfig:
    """A copy of ``cfg`` with the ``LAYOUT_KEYS`` values of ``layout`` set."""
    out = copy.deepcopy(cfg)
    for key, value in layout.items():
        *path, leaf = key.split(".")
        obj = out
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return out


def allowed(cfg: TrainConfig, gpus: int) -> bool:
    """The layout validates at ``gpus`` ranks (sizes divide, shapes split, mode implemented)."""
    from internevo.config import ConfigError
    from internevo.parallel.layout import ParallelLayout

    try:
        ParallelLayout.from_config(cfg, gpus, 0)
    except (ConfigError, ValueError):
        return False
    return True


def enumerate_layouts(cfg: TrainConfig, gpus: int, gpus_per_node: int) -> list[dict]:
    """Every layout the config allows on ``gpus`` GPUs at the config's global batch."""
    rows = cfg.data.micro_bsz * cfg.data.micro_num
    out = []
    for tp in [t for t in divisors(gpus) if t <= gpus_per_node]:
        modes = ("mtp", "msp", "fsp", "isp") if tp > 1 else (cfg.parallel.tensor.mode,)
        dp = gpus // tp
        for mode, zero1, fsdp, ckpt, bsz in itertools.product(
                modes, divisors(dp), (False, True), (False, True), divisors(rows)):
            layout = dict(zip(LAYOUT_KEYS, (tp, mode, zero1, fsdp, ckpt, bsz, rows // bsz)))
            if allowed(with_layout(cfg, layout), gpus):
                out.append(layout)
    return out


# ------------------------------------------------------------------------------ dry runs
def _dry_bytes(job: tuple[TrainConfig, int]) -> dict:
    """Worker: the dry run of ``cfg`` at ``world`` ranks (in a process of its own)."""
    from internevo.train.dryrun import dry_run

    cfg, world = job
    try:
        report = dry_run(cfg, world, 0, device="cuda")
    except Exception as err:  # a layout the code cannot build: say why, keep planning
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    return {"bytes": report["bytes"], "comm": report["comm"]}


def extrapolate(one: dict, two: dict, layers: int) -> dict:
    """Linear in the number of blocks: ``one + (layers - 1) * (two - one)`` per key."""
    return {k: one.get(k, 0) + (layers - 1) * (two.get(k, 0) - one.get(k, 0))
            for k in set(one) | set(two)}


def measure(cfgs: list[TrainConfig], world: int | list[int], workers: int = 2,
            progress: bool = True) -> list[dict]:
    """Dry-run bytes and comm of each config at ``world`` ranks (one world size for all, or one
    per config), deep models by the 1- and 2-block extrapolation."""
    worlds = world if isinstance(world, list) else [world] * len(cfgs)
    jobs = []
    for cfg, ranks in zip(cfgs, worlds):
        layers = cfg.model.num_layers
        depths = (layers,) if layers <= 2 else (1, 2)
        for depth in depths:
            small = copy.deepcopy(cfg)
            small.model.num_layers = depth
            jobs.append((small, ranks))
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=8) as pool:
        results = pool.imap(_dry_bytes, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="dry runs", unit="run")
        results = list(results)
    out, i = [], 0
    for cfg in cfgs:
        if cfg.model.num_layers <= 2:
            out.append(results[i])
            i += 1
            continue
        one, two = results[i], results[i + 1]
        i += 2
        if "error" in one or "error" in two:
            out.append(one if "error" in one else two)
            continue
        out.append({key: extrapolate(one[key], two[key], cfg.model.num_layers)
                    for key in ("bytes", "comm")})
    return out


# ------------------------------------------------------------------------------ predictions
def peak_bytes(b: dict, micro_num: int, fsdp: bool = False) -> int:
    """Per-rank peak of the profiled categories (module doc); under FSDP the masters are the
    sharded parameters, counted once."""
    static = b["params"] + (0 if fsdp else b["master"]) + b["optimizer_states"]
    held = b["activations_peak"] + (b["grads"] if micro_num > 1 else 0)
    return static + max(b["grads"], held)


def group_span(cfg: TrainConfig, gpus: int, group: str, gpus_per_node: int) -> tuple[int, bool]:
    """(size of rank 0's group ``group``, whether it stays inside one node)."""
    from internevo.parallel.layout import ParallelLayout

    ranks = ParallelLayout.from_config(cfg, gpus, 0).ranks(group)
    return len(ranks), len({r // gpus_per_node for r in ranks}) == 1


def comm_seconds(cfg: TrainConfig, gpus: int, comm: dict, hw: Hardware,
                 gpus_per_node: int) -> dict[str, float]:
    """Ring time of each counted collective: ``{"tp": s, "dp": s}``."""
    out = {"tp": 0.0, "dp": 0.0}
    for key, payload in comm.items():
        kind, group = key.split("/", 1)
        n, intra = group_span(cfg, gpus, group, gpus_per_node)
        if n <= 1:
            continue
        factor = (2.0 if kind == "all_reduce" else 1.0) * (n - 1) / n
        seconds = factor * payload / ((hw.intra_gbs if intra else hw.inter_gbs) * 1e9)
        out["tp" if group in TP_GROUPS else "dp"] += seconds
    return out


def predict(cfg: TrainConfig, gpus: int, measured: dict, hw: Hardware,
            gpus_per_node: int) -> dict:
    """TGS, TFLOPS, MFU, memory and the terms of the step time of one layout."""
    from internevo.train.metrics import step_flops

    d = cfg.data
    tp = cfg.parallel.tensor.size
    dp = gpus // tp
    tokens = d.seq_len * d.micro_bsz * d.micro_num  # one data-parallel rank's rows
    flops = step_flops(cfg, tokens, [d.seq_len] * d.micro_bsz * d.micro_num) / tp
    compute = flops / (hw.peak_tflops * 1e12 * hw.efficiency)
    comm = comm_seconds(cfg, gpus, measured["comm"], hw, gpus_per_node)
    hidden = min(comm["dp"], hw.dp_overlap * compute)
    step = compute + comm["tp"] + comm["dp"] - hidden
    memory = peak_bytes(measured["bytes"], d.micro_num, cfg.parallel.zero1.fsdp)
    return {"tgs": tokens * dp / gpus / step, "tflops": flops / step / 1e12,
            "mfu": flops / step / (hw.peak_tflops * 1e12), "memory_gib": memory / GIB,
            "fits": memory / GIB + hw.reserve_gib <= hw.memory_gib,
            "terms": {"compute_s": compute, "tp_comm_s": comm["tp"], "dp_comm_s": comm["dp"],
                      "dp_hidden_s": hidden, "step_s": step, "flops_per_gpu": flops,
                      "bytes": measured["bytes"], "comm": measured["comm"]}}


def plan(cfg: TrainConfig, gpus: int, hw: Hardware, gpus_per_node: int = 8,
         layouts: Optional[list[dict]] = None, workers: int = 2) -> list[dict]:
    """Rows ``{"layout", "tgs", "tflops", "mfu", "memory_gib", "fits", "terms"}``, best first
    (layouts that fit, by TGS; then the rest); layouts the code cannot build are left out."""
    layouts = enumerate_layouts(cfg, gpus, gpus_per_node) if layouts is None else layouts
    cfgs = [with_layout(cfg, lay) for lay in layouts]
    rows = []
    for lay, c, m in zip(layouts, cfgs, measure(cfgs, gpus, workers)):
        if "error" not in m:
            rows.append({"layout": lay, **predict(c, gpus, m, hw, gpus_per_node)})
    return sorted(rows, key=lambda r: (not r["fits"], -r["tgs"]))


# ------------------------------------------------------------------------------------ CLI
def format_table(rows: list[dict], top: int) -> str:
    """The ranked table (layouts that fit)."""
    head = (f"{'#':>3} {'tp':>3} {'mode':>4} {'zero1':>5} {'fsdp':>5} {'ckpt':>5} "
            f"{'mbsz':>4} {'mnum':>4} {'TGS':>8} {'TFLOPS':>7} {'MFU':>6} {'GiB':>7}")
    lines = [head]
    for i, r in enumerate([r for r in rows if r["fits"]][:top], start=1):
        v = [r["layout"][k] for k in LAYOUT_KEYS]
        lines.append(f"{i:>3} {v[0]:>3} {v[1]:>4} {v[2]:>5} {str(v[3]):>5} {str(v[4]):>5} "
                     f"{v[5]:>4} {v[6]:>4} {r['tgs']:>8.0f} {r['tflops']:>7.1f} "
                     f"{100 * r['mfu']:>5.1f}% {r['memory_gib']:>7.2f}")
    return "\n".join(lines)


def explain(row: dict, hw: Hardware) -> str:
    """The terms of one row's prediction."""
    t = row["terms"]
    lines = [f"layout {row['layout']}", f"hardware {dataclasses.asdict(hw)}",
             f"compute  {t['compute_s']:.4f} s = {t['flops_per_gpu']:.4g} FLOPs / "
             f"({hw.peak_tflops} TFLOP/s x {hw.efficiency})",
             f"tp comm  {t['tp_comm_s']:.4f} s (critical path)",
             f"dp comm  {t['dp_comm_s']:.4f} s, hidden {t['dp_hidden_s']:.4f} s "
             f"(dp_overlap {hw.dp_overlap} of compute)",
             f"step     {t['step_s']:.4f} s -> TGS {row['tgs']:.0f}",
             "bytes per rank: " + ", ".join(f"{k} {v / GIB:.2f} GiB"
                                            for k, v in t["bytes"].items()),
             "collective payload per step: " + ", ".join(f"{k} {v / GIB:.3f} GiB"
                                                         for k, v in t["comm"].items())]
    return "\n".join(lines)


def parse_hw(name: str, overrides: list[str]) -> Hardware:
    """``--gpu`` plus ``--set-hw field=value`` overrides."""
    hw = copy.deepcopy(HARDWARE[name])
    fields = {f.name: f for f in dataclasses.fields(Hardware)}
    for text in overrides:
        key, _, value = text.partition("=")
        if key not in fields or key == "name":
            raise SystemExit(f"--set-hw {text}: unknown field; valid: "
                             f"{', '.join(k for k in fields if k != 'name')}")
        setattr(hw, key, float(value))
    return hw


def plan_main(argv: list[str]) -> int:
    """``internevo plan --config C --gpus N [--gpu A100|H100|H200] ...``."""
    from internevo.config import load_config

    parser = argparse.ArgumentParser(prog="internevo plan")
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", choices=sorted(HARDWARE), default="A100")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", default=None, help="write every row to this file")
    parser.add_argument("--explain", action="store_true", help="show the winner's terms")
    parser.add_argument("--set-hw", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--workers", type=int, default=2, help="dry runs in parallel")
    args = parser.parse_args(argv)
    hw = parse_hw(args.gpu, args.set_hw)
    cfg = load_config(args.config, {"data.train_folder": None, "data.valid_folder": None})
    rows = plan(cfg, args.gpus, hw, args.gpus_per_node, workers=args.workers)
    print(f"{cfg.JOB_NAME} on {args.gpus} x {hw.name} ({args.gpus_per_node} per node): "
          f"{sum(r['fits'] for r in rows)} of {len(rows)} layouts fit")
    print(format_table(rows, args.top))
    if args.json:
        keep = ("layout", "tgs", "tflops", "mfu", "memory_gib", "fits")
        Path(args.json).write_text(json.dumps([{k: r[k] for k in keep} for r in rows], indent=1))
    if args.explain and rows:
        print(explain(rows[0], hw))
    return 0 if any(r["fits"] for r in rows) else 1
