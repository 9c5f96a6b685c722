"""``torchrun`` jobs and the device of a run.

Distributed runs are detected from the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):
NCCL on CUDA devices, gloo on CPU. Every command's ``batch_size`` is the *global* batch: each rank
takes its slice of the same seeded global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from fastnas.runs.config import RunError

_LEFT_KEY = "fastnas/ranks_left"  # in the job's store: ranks that have torn their process group down


class Dist:
    """Who we are in a torchrun job (world 1 when not distributed)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.active = True

    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def check_same(self, tensors: list[Tensor], what: str) -> None:
        """Raise if the ranks' ``tensors`` differ in any bit."""
        if not self.active:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        for r, g in enumerate(gathered):
            if not torch.equal(g, gathered[0]):
                raise RuntimeError(f"{what} differ between rank 0 and rank {r}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def leave(self, timeout_s: float = 30.0) -> None:
        """Tear the process group down, then wait (at most ``timeout_s``) until every rank has: a rank
        whose process exits while another still tears down its gloo connections can make that one
        abort ("terminate called without an active exception")."""
        store = dist.distributed_c10d._get_default_store()
        dist.destroy_process_group()
        self.active = False
        try:
            store.add(_LEFT_KEY, 1)
            deadline = time.monotonic() + timeout_s
            while store.add(_LEFT_KEY, 0) < self.world and time.monotonic() < deadline:
                time.sleep(0.005)
        except (RuntimeError, ValueError):  # the store's host is gone: nobody left to wait for
            pass

    def check_batch(self, batch_size: int, accum_steps: int) -> None:
        if batch_size % (self.world * accum_steps) != 0:
            raise RunError(
                f"--batch-size {batch_size} must be divisible by the number of processes ({self.world}) "
                f"times --accum-steps ({accum_steps})"
            )


def resolve_device(name: str, ddp: Dist) -> torch.device:
    """The device ``--device name`` means for this rank (torchrun: one GPU per local rank)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunError(f"unknown --device {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: CUDA is not available here")
        if ddp.world > 1:
            dev = torch.device("cuda", ddp.local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {dev}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise RunError(f"--device must be cpu or cuda[:N], got {name!r}")
    return dev


@contextlib.contextmanager
def process_group(ddp: Dist, device: torch.device, threads: int | None) -> Iterator[None]:
    """Set the CPU threads and join the process group for the body; leave both as they were after."""
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    ddp.init(device)
    try:
        yield
        # every rank finishes before any tears its connections down: without this, a rank that left
        # first sometimes made another abort in gloo's teardown ("terminate called without an active
        # exception", about 1 run in 6 of tests/test_search_distributed.py on a 2-core machine)
        ddp.barrier()
    finally:
        torch.set_num_threads(threads_before)
        if ddp.active:
            ddp.leave()
