"""Pipeline parallel: partition, schedules and the runner on real gloo processes.

The schedule tests are pure (lists of actions); the simulated timeline is checked against the
closed-form bubble.  The runner test builds a toy chain of layers on 2 and 4 processes and
compares every owned gradient with the same chain run in one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internevo.config import ConfigError, config_from_dict
from internevo.parallel.comm import Comm
from internevo.parallel.layout import ParallelLayout
from internevo.parallel.pipeline import (
    Chunk,
    PipelineRunner,
    forward_only,
    interleaved,
    one_f_one_b,
    partition,
    rank_chunks,
    simulate,
    train_schedule,
)
from internevo.parallel.spawn import spawn_ranks


def test_partition_gives_the_last_ranks_the_extra_layers():
    assert partition(8, 2) == [[range(0, 4)], [range(4, 8)]]
    assert partition(7, 3) == [[range(0, 2)], [range(2, 4)], [range(4, 7)]]
    assert partition(10, 4) == [[range(0, 2)], [range(2, 4)], [range(4, 7)], [range(7, 10)]]
    # two chunks of 5 layers over 2 ranks: rank 1 takes the extra layer of each chunk
    assert partition(10, 2, 2) == [[range(0, 2), range(5, 7)], [range(2, 5), range(7, 10)]]
    with pytest.raises(ValueError, match="num_layers=6 .*num_chunks=2 .*pipeline.size=4"):
        partition(6, 4, 2)


def test_rank_chunks_mark_first_and_last_stage():
    assert rank_chunks(8, 2, 2, 0) == [Chunk(0, range(0, 2), True, False),
                                       Chunk(1, range(4, 6), False, False)]
    assert rank_chunks(8, 2, 2, 1)[1] == Chunk(1, range(6, 8), False, True)


def _kinds(actions):
    return "".join(a.kind for a in actions)


def test_one_f_one_b_warmup_steady_cooldown():
    # pp=4, M=6: rank 0 warms up with 3 forwards, the last rank alternates from the start
    assert _kinds(one_f_one_b(4, 0, 6)) == "FFF" + "FB" * 3 + "BBB"
    assert _kinds(one_f_one_b(4, 3, 6)) == "FB" * 6
    assert _kinds(one_f_one_b(4, 0, 2)) == "FFBB"  # warm-up capped at M
    for rank in range(4):
        acts = one_f_one_b(4, rank, 6)
        assert [a.micro for a in acts if a.kind == "F"] == list(range(6))
        assert [a.micro for a in acts if a.kind == "B"] == list(range(6))


def test_interleaved_order_is_internevos():
    acts = interleaved(2, 0, 4, 2)
    forwards = [(a.chunk, a.micro) for a in acts if a.kind == "F"]
    backwards = [(a.chunk, a.micro) for a in acts if a.kind == "B"]
    assert forwards == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert backwards == [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2), (1, 3), (0, 2), (0, 3)]
    # warm-up 2(pp - rank - 1) + (chunks - 1) pp = 4 on rank 0, 2 on rank 1
    assert _kinds(acts) == "FFFF" + "FB" * 4 + "BBBB"
    assert _kinds(interleaved(2, 1, 4, 2)) == "FF" + "FB" * 6 + "BB"
    assert _kinds(interleaved(2, 1, 2, 2)) == "FFFFBBBB"  # M == pp: all forwards first
    with pytest.raises(ValueError, match="micro_num \\(3\\) divisible by pipeline.size \\(2\\)"):
        interleaved(2, 0, 3, 2)


@pytest.mark.parametrize("pp,micro,chunks", [(2, 4, 1), (4, 4, 1), (4, 8, 1), (2, 4, 2),
                                             (4, 8, 2), (2, 2, 3)])
def test_simulated_bubble_equals_theory(pp, micro, chunks):
    """Unit-cost chunks (a stage costs 1 forward + 2 backward): every schedule completes, each
    (chunk, micro-batch) runs forward then backward once, and the idle share is the formula."""
    timeline = simulate(pp, micro, chunks, forward_cost=1 / chunks)
    end = max(t[1] for row in timeline for t in row)
    for row in timeline:
        acts = [a for _, _, a in row]
        assert sorted((a.kind, a.chunk, a.micro) for a in acts) == sorted(
            (k, c, m) for k in "FB" for c in range(chunks) for m in range(micro))
    busy = sum(t[1] - t[0] for row in timeline for t in row)
    assert 1 - busy / (pp * end) == pytest.approx((pp - 1) / (chunks * micro + pp - 1))


def test_forward_only_runs_each_chunk_once_per_micro_batch():
    assert [(a.chunk, a.micro) for a in forward_only(2, 2)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {a.kind for a in train_schedule(4, 1, 4, 2)} == {"F", "B"}


# ------------------------------------------------------------------------- the runner, toy chain
LAYERS, WIDTH, MICRO, ROWS = 8, 6, 4, 3


def toy_chain() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS))


def toy_inputs() -> torch.Tensor:
    return torch.randn(MICRO, 1, ROWS, WIDTH, generator=torch.Generator().manual_seed(1))


def toy_reference() -> list[torch.Tensor]:
    """Gradients of the whole chain in one process: sum over micro-batches of mean(out²) / M."""
    chain = toy_chain()
    for x in toy_inputs():
        for layer in chain:
            x = layer(x)
        (x.square().mean() / MICRO).backward()
    return [p.grad for p in chain.parameters()]


def toy_rank(rank: int, world: int, chunks: int) -> dict:
    """Run the toy chain's schedule on this pipeline rank; return its gradients and counts."""
    layout = ParallelLayout(world_size=world, rank=rank, pipeline=world).build_groups()
    comm = Comm(layout)
    chain, inputs = toy_chain(), toy_inputs()
    mine = rank_chunks(LAYERS, world, chunks, rank)

    def forward(chunk: Chunk, micro: int, x):
        x = inputs[micro] if x is None else x
        for i in chunk.layers:
            x = chain[i](x)
        return x.square().mean() / MICRO if chunk.last else x

    runner = PipelineRunner(comm, rank, world, chunks)
    runner.run(train_schedule(world, rank, MICRO, chunks), mine, forward, lambda last: None,
               (1, ROWS, WIDTH), torch.float32, torch.device("cpu"))
    grads = {f"{i}.{j}": p.grad for c in mine for i in c.layers
             for j, p in enumerate(chain[i].parameters())}
    return {"grads": grads, "counts": comm.snapshot()}


@pytest.mark.parametrize("world,chunks", [(2, 1), (4, 1), (2, 2)])
def test_runner_gradients_equal_one_process(world, chunks):
    ref = toy_reference()
    ref_by_name = {f"{i}.{j}": ref[2 * i + j] for i in range(LAYERS) for j in range(2)}
    results = spawn_ranks(toy_rank, world, chunks)
    seen = set()
    for rank, res in enumerate(results):
        for name, grad in res["grads"].items():
            torch.testing.assert_close(grad, ref_by_name[name], rtol=1e-6, atol=1e-7,
                                       msg=f"rank {rank} {name}")
            seen.add(name)
        # worked out: one [1, ROWS, WIDTH] fp32 activation per micro-batch and boundary each way
        stage_ids = [c * world + rank for c in range(chunks)]
        boundaries = sum(s > 0 for s in stage_ids) + sum(s < world * chunks - 1 for s in stage_ids)
        nbytes = boundaries * MICRO * ROWS * WIDTH * 4
        assert res["counts"]["comm/send/pipeline/bytes"] == nbytes
        assert res["counts"]["comm/recv/pipeline/bytes"] == nbytes
    assert seen == set(ref_by_name)


@pytest.mark.parametrize("model, micro, message", [
    (dict(num_layers=3), 4, "pipeline.size=4: model.num_layers=3 must be a multiple of "
                            "model.num_chunks=1 with at least 4 layers per chunk"),
    (dict(num_layers=6, num_chunks=2), 4, "num_layers=6 must be a multiple of model.num_chunks=2 "
                                          "with at least 4 layers"),
    (dict(num_layers=9, num_chunks=2), 4, "num_layers=9 must be a multiple of model.num_chunks=2"),
    (dict(num_layers=16, num_chunks=2), 6, "pipeline.size=4 does not divide data.micro_num=6"),
])
def test_layout_rejects_splits_that_do_not_fit(model, micro, message):
    pp4 = config_from_dict(dict(parallel=dict(pipeline=dict(size=4, interleaved_overlap=True)),
                                model=model, data=dict(micro_num=micro)))
    with pytest.raises(ConfigError, match=message):
        ParallelLayout.from_config(pp4, world_size=4, rank=0)
    ok = config_from_dict(dict(parallel=dict(pipeline=4), model=dict(num_layers=4)))
    assert ParallelLayout.from_config(ok, world_size=8, rank=5).pp_rank == 2
