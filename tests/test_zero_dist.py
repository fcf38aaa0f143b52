"""ZeRO-1.5 on real gloo processes equals one process with the same global batch."""

import pytest
import torch

from internevo.config import config_from_dict
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.spawn import spawn_ranks
from internevo.parallel.zero import HybridZeroOptimizer
from internevo.train.schedules import LossScaler

STEPS, ROWS = 4, 8


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, 6, generator=g)


def train(rank, world, zero1, clip):
    cfg = config_from_dict({"hybrid_zero_optimizer": dict(clip_grad_norm=clip),
                            "parallel": dict(zero1=zero1), "adam": dict(lr=1e-2),
                            "model": dict(dtype="torch.float32")})
    layout = ParallelLayout.from_config(cfg, world, rank)
    if world > 1:
        layout.build_groups()
    comm = Comm(layout)
    model = make_model()
    opt = HybridZeroOptimizer(list(model.named_parameters()), cfg, layout, comm,
                              LossScaler.from_config(cfg))
    norms, byte_counts = [], []
    for step in range(STEPS):
        comm.reset()
        rows = data(step).chunk(world)[layout.dp_rank]
        model(rows).square().mean().backward()
        norms.append(opt.step(lr=1e-2, beta2=0.95).grad_norm)
        byte_counts.append(dict(comm.bytes))
    params = [p.detach().clone() for p in model.parameters()]
    return params, norms, opt.state_bytes(), opt.total, byte_counts


@pytest.mark.parametrize("world, zero1", [(2, -1), (4, -1), (4, 2), (4, 1)])
def test_zero_matches_single_process(world, zero1):
    ref_params, ref_norms, ref_bytes, total, _ = train(0, 1, -1, 0.5)
    results = spawn_ranks(train, world, zero1, 0.5)
    zo = world if zero1 == -1 else zero1
    for params, norms, state_bytes, _, byte_counts in results:
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        shard = -(-total // zo)
        assert state_bytes == 3 * 4 * shard  # exactly total / zero1, up to padding
        padded_bytes = shard * zo * 4
        counted = byte_counts[-1]
        assert counted.get(("reduce_scatter", "zero1"), 0) == (padded_bytes if zo > 1 else 0)
        assert counted.get(("all_gather", "zero1"), 0) == (padded_bytes if zo > 1 else 0)
        replica = world // zo
        assert counted.get(("all_reduce", "zero1_replica"), 0) == (
            padded_bytes // zo if replica > 1 else 0)
