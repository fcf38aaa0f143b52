"""Keys that used to do nothing: slow-rank diagnostics, cudnn flags, and the one log setup."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from internevo.config import config_from_dict
from internevo.launch import apply_backend_flags, setup_logging
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.train.diag import StepDiagnostics, slow_ranks


def cfg_with(**top):
    return config_from_dict({"data": dict(empty_cache_and_diag_interval=2,
                                          diag_outlier_ratio=0.1), **top})


def test_slow_ranks_threshold():
    assert slow_ranks([1.0, 1.0, 1.0, 1.5], 0.1) == [3]  # mean 1.125, limit 1.2375
    assert slow_ranks([1.0, 1.0, 1.0, 1.1], 0.1) == []  # mean 1.025, limit 1.1275
    assert slow_ranks([2.0, 1.0], 0.0) == [0]


def _diag_rank(rank: int, world: int) -> dict:
    cfg = config_from_dict({"data": dict(empty_cache_and_diag_interval=2, diag_outlier_ratio=0.1),
                            "parallel": dict(zero1=1)})
    layout = ParallelLayout.from_config(cfg, world, rank).build_groups()
    diag = StepDiagnostics(cfg, layout, Comm(layout), torch.device("cpu"))
    seconds = 0.5 if rank == 1 else 0.1
    return {"off_interval": diag.after_step(3, seconds), "at_interval": diag.after_step(4, seconds)}


def test_two_ranks_report_the_slow_one_with_host():
    results = spawn_ranks(_diag_rank, 2)
    for res in results:  # every rank computes the same answer; only interval batches act
        assert res["off_interval"] == []
        (slow,) = res["at_interval"]
        assert (slow.rank, slow.host) == (1, socket.gethostname())
        assert slow.seconds == pytest.approx(0.5) and slow.mean == pytest.approx(0.3)


def test_single_process_interval_zero_is_off():
    cfg = config_from_dict({"data": dict(empty_cache_and_diag_interval=0)})
    layout = ParallelLayout()
    assert StepDiagnostics(cfg, layout, Comm(layout), torch.device("cpu")).after_step(50, 9.) == []


def test_cudnn_flags_follow_config_on_cuda_only():
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = False
        cfg = cfg_with(cudnn_deterministic=True, cudnn_benchmark=True)
        apply_backend_flags(cfg, torch.device("cpu"))
        assert not torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        apply_backend_flags(cfg, torch.device("cuda"))  # sets flags only: no GPU needed
        assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("is_log_rank", [True, False])
def test_library_logging_prints_and_names_other_ranks(capsys, is_log_rank):
    handler = setup_logging(3, is_log_rank)
    try:
        log = logging.getLogger("internevo.train.diag")
        log.info("info line")
        log.warning("warning line")
        out = capsys.readouterr().out.splitlines()
    finally:
        logging.getLogger("internevo").removeHandler(handler)
    if is_log_rank:
        assert out == ["[internevo] info line", "[internevo] WARNING: warning line"]
    else:
        assert out == ["[internevo][rank 3] WARNING: warning line"]
