"""Planner: the layouts it enumerates, and its TGS against InternEvo's published 7B numbers.

The published check re-predicts from the dry runs that ``benchmarks/plan_vs_published.py`` ran
and saved (benchmarks/results/plan_7b_a100.json): one set of A100 constants for all 16 rows
(tp1/zero1=8 and tp2/zero1=4, 8 to 1024 GPUs), each within 15% of the published TGS.  The check
against measurements (6 layouts of a small model, profiler peak and counted bytes) is in
test_memory_profile.py, next to the profiled runs it uses.
"""

import itertools
import json
from pathlib import Path

from test_memory_profile import make_cfg

from internevo.profiling.planner import (
    HARDWARE,
    LAYOUT_KEYS,
    enumerate_layouts,
    predict,
    with_layout,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "plan_7b_a100.json"


def test_published_7b_throughput_within_15_percent():
    from internevo.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "7B_sft.py"),
                      {"data.train_folder": None, "data.valid_folder": None})
    rows = json.loads(RESULTS.read_text())
    assert sorted({(r["row"], r["gpus"]) for r in rows}) == sorted(
        itertools.product(("tp1/zero1=8", "tp2/zero1=4"), (8, 16, 32, 64, 128, 256, 512, 1024)))
    for r in rows:
        got = predict(with_layout(cfg, r["layout"]), r["gpus"], r["measured"], HARDWARE["A100"],
                      8)["tgs"]
        assert abs(got / r["published"] - 1) <= 0.15, (r["row"], r["gpus"], got, r["published"])


def test_enumerated_layouts_are_every_valid_combination():
    cfg = make_cfg()  # 4 heads / 2 KV heads, vocab 256, micro_bsz 2 x micro_num 2
    got = enumerate_layouts(cfg, gpus=4, gpus_per_node=2)
    expected = []
    for tp, modes, zero1s, fsdps in ((1, ("mtp",), (1, 2, 4), (False, True)),
                                     (2, ("mtp", "msp", "fsp", "isp"), (1, 2), (False, True))):
        for mode, zero1, fsdp, ckpt, bsz in itertools.product(modes, zero1s, fsdps,
                                                              (False, True), (1, 2, 4)):
            expected.append(dict(zip(LAYOUT_KEYS, (tp, mode, zero1, fsdp, ckpt, bsz, 4 // bsz))))
    key = lambda lay: tuple(lay[k] for k in LAYOUT_KEYS)  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    for lay in got:  # the same global batch everywhere
        assert lay["data.micro_bsz"] * lay["data.micro_num"] == 4
