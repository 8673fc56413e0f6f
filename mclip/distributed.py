"""torchrun helpers: rank/world from the environment, process-group setup (NCCL on GPU, gloo on CPU), device and
precision choice."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mclip.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this stage joined the process group, so it ends it (`teardown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> this rank's GPU when CUDA is present, else CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA GPU is visible; use --device cpu or auto")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it (fp16 otherwise), fp32 on CPU."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type == "cpu" and precision == "fp16":
            raise UserError("precision=fp16 is not supported on CPU; use fp32 or bf16")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def setup(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; return this rank's context and device. A group that is
    already there (`mclip run` holds one for all three stages) is used as it is, and its owner ends it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device, ctx.local_rank)
    if ctx.enabled and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        ctx = Dist(ctx.rank, ctx.world_size, ctx.local_rank, owns_group=True)
    return ctx, dev


@contextlib.contextmanager
def group(device: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """One stage's rank context and device (`setup`); when the block ends, the process group goes if this stage joined
    it (`teardown`). On an error the process is about to end anyway, so nothing is torn down under the other ranks'
    feet."""
    ctx, dev = setup(device)
    yield ctx, dev
    teardown(ctx)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (identity without torchrun)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_only(ctx: Dist, fn):
    """Run `fn` on rank 0 and hand its result, or its UserError, to every rank (so all ranks stop on one line)."""
    result = None
    if ctx.is_main:
        try:
            result = fn()
        except UserError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    return result


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over all ranks, in place (identity without torchrun), so every rank logs the same
    numbers."""
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def teardown(ctx: Dist) -> None:
    """End the process group that `setup` joined for `ctx` (after a stage's last collective); one it found is left."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
