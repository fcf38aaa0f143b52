"""Pictures of a run: the figure drawn from metrics.jsonl, the CLI, the ETA on the console line."""

import json

from internevo.cli import main
from internevo.profiling.report import PANELS, build_figure, eta_text, read_metrics


def synthetic_run(run_dir, steps=12, valid_every=4):
    """A metrics.jsonl like the trainer's: step records, one failed update, validation records."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": 2.0,
                        "tgs": 100.0 + step, "success": True, "step_time": 0.5})
        if step == 6:
            records.append({"step": step, "loss": float("nan"), "lr": 1e-3, "grad_norm": 9e9,
                            "tgs": 1.0, "success": False, "step_time": 0.5})
        if step % valid_every == 0:
            records.append({"step": step, "valid/en/loss": 4.0 / step, "valid/en/acc": 0.1,
                            "valid/code/loss": 3.0 / step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_figure_has_one_panel_per_metric_and_validation_on_loss(tmp_path):
    records = synthetic_run(tmp_path / "run")
    fig = build_figure(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == [title for _, title in PANELS]
    loss_ax = axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["train", "valid/en", "valid/code"]
    train_line, valid_en = loss_ax.get_lines()[:2]
    good = [r for r in records if r.get("success") is True]
    assert list(train_line.get_xdata()) == [r["step"] for r in good]  # failed update left out
    assert list(train_line.get_ydata()) == [r["loss"] for r in good]
    assert list(valid_en.get_xdata()) == [4, 8, 12]
    assert list(valid_en.get_ydata()) == [1.0, 0.5, 4.0 / 12]
    for ax, (key, _) in zip(axes[1:], PANELS[1:]):
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == [r[key] for r in good]


def test_report_command_writes_png_next_to_metrics(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "metrics.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_eta_from_recent_step_times():
    history = [{"step_time": 100.0}] * 5 + [{"step_time": 2.0}] * 10
    assert eta_text(history, 90) == "3:00"  # last 10 steps only: 90 * 2 s
    assert eta_text([{"step_time": 4.0}], 1000) == "1:06:40"
    assert eta_text([], 5) == "unknown"


def test_training_run_ends_with_its_picture_and_shows_eta(tmp_path, capsys):
    from test_train import make_trainer, tiny_cfg

    trainer = make_trainer(tiny_cfg(), tmp_path)
    trainer.fit()
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("step")]
    assert [s.split(" eta ")[0].split("batch ")[1].split()[0] for s in lines] == \
        ["1/3", "2/3", "3/3"]
    assert lines[-1].split(" eta ")[1] == "0:00"  # nothing left after the last step
    fig = build_figure(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert len(fig.get_axes()[0].get_lines()[0].get_xdata()) == 3
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
