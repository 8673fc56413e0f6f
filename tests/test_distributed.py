"""torchrun helpers: one process (no group: every helper is the identity), a one-process gloo group, and two real ranks
(rank means, rank 0's result and refusal on every rank, and a stage ending only the group it joined)."""

import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist

from mclip import distributed
from mclip.distributed import Dist
from mclip.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


def test_one_process_is_rank_zero_of_one_and_joins_no_group(single_process):
    ctx, device = distributed.setup("cpu")
    assert ctx == Dist(0, 1, 0) and ctx.is_main and not ctx.enabled and not ctx.owns_group
    assert device == torch.device("cpu") and not dist.is_initialized()
    distributed.barrier()
    distributed.teardown(ctx)  # nothing to end


def test_without_a_group_every_helper_is_the_identity(single_process):
    values = torch.tensor([1.0, 3.0])
    assert distributed.mean_over_ranks(values) is values and values.tolist() == [1.0, 3.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_objects("x") == ["x"]
    assert distributed.main_only(Dist(), lambda: 42) == 42
    with pytest.raises(UserError, match="refused"):
        distributed.main_only(Dist(), lambda: (_ for _ in ()).throw(UserError("refused")))
    calls = []
    assert (
        distributed.main_only(Dist(rank=1, world_size=2), lambda: calls.append(1)) is None and not calls
    )  # rank 0's job only


def test_device_and_precision_choices(single_process):
    assert distributed.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert distributed.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UserError, match="fp16 is not supported on CPU; use fp32 or bf16"):
        distributed.resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible; use --device cpu or auto"):
            distributed.resolve_device("cuda")
        assert distributed.resolve_device("auto") == torch.device("cpu")


def test_a_stage_leaves_a_group_it_did_not_join(single_process):
    """`mclip run` (or any caller) may hold the group: a stage's teardown ends only the group its own setup joined."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with distributed.group("cpu") as (ctx, _):  # a stage run inside it (as under `mclip run`)
            assert not ctx.owns_group
        assert dist.is_initialized()
        values = torch.tensor([2.0, 4.0])
        assert distributed.mean_over_ranks(values).tolist() == [2.0, 4.0]  # all_reduce over one rank
        assert distributed.all_gather_objects({"rank": 0}) == [{"rank": 0}]
        distributed.teardown(ctx)
        assert dist.is_initialized()
        distributed.teardown(Dist(owns_group=True))  # its owner ends it
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        with distributed.group("cpu") as (ctx, _):  # what a stage's run() does
            mean = distributed.mean_over_ranks(torch.tensor([float(rank), 10.0 * rank])).tolist()
            chosen = distributed.main_only(ctx, lambda: f"rank {ctx.rank} decided")
            try:
                distributed.main_only(ctx, lambda: (_ for _ in ()).throw(UserError("one line for every rank")))
                refused = None
            except UserError as exc:
                refused = str(exc)
            gathered = distributed.all_gather_objects(ctx.rank)
            distributed.barrier()
        results.put((rank, ctx.owns_group, mean, chosen, refused, gathered, dist.is_initialized()))
    except BaseException as exc:  # the parent reports it
        results.put((rank, "failed", repr(exc)))


@pytest.mark.slow
def test_two_ranks_share_means_and_rank_zeros_answers_and_end_the_group_they_joined():
    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), _free_port()
    procs = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert all(len(r) == 7 for r in got), got
    for rank, owns, mean, chosen, refused, gathered, still_initialized in got:
        assert owns and not still_initialized  # the stage's setup joined the group, so the end of its block ended it
        assert (
            mean == [0.5, 5.0]
            and chosen == "rank 0 decided"
            and refused == "one line for every rank"
            and gathered == [0, 1]
        )
