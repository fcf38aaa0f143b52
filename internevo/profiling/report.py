"""Pictures of a run: loss, learning rate, grad norm and TGS over steps, from ``metrics.jsonl``.

``internevo report <run-dir>`` draws them at any time; the trainer draws them at the end of a run
(``monitor.plot``).  The PNG lies next to ``metrics.jsonl`` as ``metrics.png``.  Validation records
(``valid/<name>/loss``) are drawn on the loss axes as markers joined by a dashed line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
          ("tgs", "TGS (tokens/s per device)"))
"""(metrics key, axis title) of each panel, top to bottom."""


def report_path(run_dir: Path) -> Path:
    """Where the run's picture is written."""
    return Path(run_dir) / "metrics.png"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the successful training steps that carry a numeric ``key``."""
    rows = [r for r in records if isinstance(r.get(key), (int, float)) and r.get("success", True)]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def validation_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Validation loss per validation set: name -> (steps, losses)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("valid/") and key.endswith("/loss"):
                steps, values = out.setdefault(key[len("valid/"):-len("/loss")], ([], []))
                steps.append(r["step"])
                values.append(float(value))
    return out


def build_figure(records: list[dict]):
    """A matplotlib Figure (Agg canvas, no pyplot state) with one panel per entry of PANELS."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 10), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        steps, values = _series(records, key)
        ax.plot(steps, values, label="train" if key == "loss" else key, linewidth=1.2)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    for name, (steps, values) in validation_series(records).items():
        axes[0].plot(steps, values, "o--", label=f"valid/{name}")
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("step")
    return fig


def write_report(run_dir: Path) -> Optional[Path]:
    """Draw ``<run_dir>/metrics.jsonl`` into ``<run_dir>/metrics.png``; None when there is none."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    out = report_path(run_dir)
    build_figure(read_metrics(metrics)).savefig(out, dpi=80)
    return out


def report_main(argv: list[str]) -> int:
    """``internevo report <run-dir>``: write and print the path of the run's picture."""
    parser = argparse.ArgumentParser(prog="internevo report")
    parser.add_argument("run_dir", help="run folder holding metrics.jsonl")
    args = parser.parse_args(argv)
    out = write_report(Path(args.run_dir))
    if out is None:
        print(f"report: no metrics.jsonl in {args.run_dir}; pass a run folder written by "
              "`internevo train`")
        return 2
    print(out)
    return 0


def eta_text(history: list[dict], remaining: int, window: int = 10) -> str:
    """Time left for ``remaining`` steps at the mean step time of the last ``window`` steps."""
    times = [r["step_time"] for r in history[-window:] if "step_time" in r]
    if not times:
        return "unknown"
    seconds = int(round(remaining * sum(times) / len(times)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
