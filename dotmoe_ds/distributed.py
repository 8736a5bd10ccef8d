"""Rank helpers: process-group setup, who owns which layer, and gathering ZeRO-3 parameters.

The trainer runs the same way under the `deepspeed` launcher, `torchrun`, `srun` (RANK/WORLD_SIZE
and friends set by the caller) and plain `python` (one process: `init_distributed` sets up a
world of one). Everything here is a no-op or a trivial answer in a world of one.

Layer ownership: work that needs one whole layer (the initial clustering, the router fit) is done
by rank `layer mod world` and broadcast, so N ranks share it and every rank ends with the same
values (DESIGN.md, distributed design).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

# The shared-memory all-reduce op DeepSpeed compiles on its first CPU init only serves
# inference_all_reduce (tensor-parallel inference); training never calls it, and compiling it costs
# 60-70 s on a cold cache. Set DOTMOE_SHM_COMM=1 to build it anyway.
SHM_COMM_ENV = "DOTMOE_SHM_COMM"
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun, srun wrapper) set the rendezvous variables."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_info() -> DistInfo:
    """Rank layout from the environment, before any process group exists (a world of one if unset)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 0)) or 0)
    if local_world <= 0:
        local_world = world if world <= (os.cpu_count() or 1) else 1
    return DistInfo(rank, world, local_rank, local_world)


def set_threads(threads: int = 0) -> int:
    """torch intra-op threads: `threads`, or the cores divided by the processes on this node. More
    threads than cores only adds contention (small ops got 15x slower with 2 threads per process
    on a busy 2-core machine)."""
    if threads <= 0:
        info = env_info()
        threads = max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
    torch.set_num_threads(threads)
    return threads


def _skip_shm_comm_build() -> None:
    if os.environ.get(SHM_COMM_ENV) == "1":
        return
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed() -> DistInfo:
    """Join (or, without a launcher, create a one-process) process group through DeepSpeed."""
    import deepspeed

    if not launched():
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    _skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = env_info()
    return DistInfo(rank, world, info.local_rank, info.local_world_size)


def shutdown(*, succeeded: bool = False) -> None:
    """Destroy the process group (without it, some runs aborted at interpreter exit). After a run
    that succeeded on every rank, a barrier first: no rank tears down gloo while a peer still has a
    collective in flight. Never after a failure, where a peer may never reach the barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if succeeded and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """Leave a finished run's process with `code`, skipping the interpreter's finalisation.

    Even after destroy_process_group, a 2-rank gloo run on CPU now and then aborted while the
    interpreter tore down ("terminate called without an active exception", SIGABRT, exit -6 after
    the run had printed its results and written its export): C++ threads of torch/gloo/DeepSpeed
    outlive the Python objects that own them. Everything a run writes is closed and flushed before
    `main` returns, so the finalisation has nothing left to do but race those threads."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def owner_of(layer_idx: int, world: int | None = None) -> int:
    """The rank that does whole-layer work for `layer_idx`."""
    return layer_idx % (world if world is not None else world_size())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled; for small things such as metadata)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small things)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a signal that reached only some ranks)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` is left alone)."""
    if world_size() == 1:
        return t.clone()
    out = t.detach().clone().to(_comm_device())
    torch.distributed.all_reduce(out)
    return out.to(t.device)


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend() if is_initialized() else "gloo"
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- ZeRO-3 parameters

def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None):
    """Context in which `params` are whole on every rank (ZeRO-3), or a no-op for ordinary ones.

    With `modifier_rank`, what that rank writes into them is broadcast to every rank on exit (for
    ZeRO-3 by DeepSpeed's re-partitioning, otherwise by an explicit broadcast), so all ranks agree.
    """
    params = list(params)
    zero = [p for p in params if is_zero3_param(p)]
    plain = [p for p in params if not is_zero3_param(p)]
    stack = contextlib.ExitStack()
    if zero:
        import deepspeed

        stack.enter_context(deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank))
    if plain and modifier_rank is not None and world_size() > 1:
        stack.callback(_broadcast_params, plain, modifier_rank)
    return stack


@torch.no_grad()
def _broadcast_params(params: Sequence[nn.Parameter], src: int) -> None:
    for p in params:
        buf = p.data.to(_comm_device())
        torch.distributed.broadcast(buf, src=src)
        if buf.data_ptr() != p.data.data_ptr():
            p.data.copy_(buf)


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a parameter (ZeRO-3 placeholders are empty outside a gather)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(params: Iterable[torch.Tensor]) -> int:
    n = 0
    for p in params:
        size = 1
        for s in full_shape(p):
            size *= s
        n += size
    return n


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), the others after it finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
