"""One supernet training step of fastnas.spaces against the eager supernet: time and memory.

A step is ``zero_grad``, forward, cross-entropy, backward to every weight and architecture
parameter (DARTS softmax weighting). The eager supernet (``benchmarks/eager_supernets.py``) computes
the way DARTS's ``model_search.py`` and xautodl's ``NAS201SearchCell`` do: every op its own module,
``none`` a real zero tensor, ``sum(w * op(x))`` per edge, NCHW. Both networks hold the same
parameters (the state_dict is copied).

Sizes: NAS-Bench-201 at C=16, N=5, batch 64, 32x32 everywhere; DARTS at C=16, 8 layers, 32x32, batch
64 on a GPU and batch 8 on a CPU.

What is measured:

* ``median_s``: median wall time of a step, fastnas and eager in interleaved rounds (a shared, noisy
  machine drifts for both alike).
* ``peak_MiB``: on CUDA, ``torch.cuda.max_memory_allocated`` during a step minus what was allocated
  before it. On CPU (torch keeps no allocator statistics there), the peak over the step of the heap
  in use (glibc ``mallinfo2``: bytes handed out by malloc, mmapped blocks included) minus its value
  before the step, sampled after every ATen or custom op of the forward and the backward: the same
  quantity at op granularity, and it sees allocations made inside C++ kernels, which the torch
  profiler's memory events miss. -1 where glibc's ``mallinfo2`` is unavailable.
* ``saved_MiB``: bytes of the distinct tensors autograd keeps for the backward (parameters excluded),
  via ``torch.autograd.graph.saved_tensors_hooks`` — what the forward leaves alive for the backward,
  which is what the peak of a training step is made of.
* ``kernels``: the non-view ATen operators one step dispatches (``kernel_count.py``; on a GPU, the
  kernel launches). ``bench_step_kernels.py`` counts every sampler and the reference code too.

Run:  pytest benchmarks/bench_supernet.py --benchmark-only     (results in each benchmark's extra_info)
      python benchmarks/bench_supernet.py [--rounds 5] [--space nb201|darts]   (prints a table)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eager_supernets import EagerDartsNetwork, EagerNB201Network  # noqa: E402
from kernel_count import count_kernels  # noqa: E402
from timing import interleaved_medians, synchronize  # noqa: E402

import fastnas  # noqa: E402
from fastnas.spaces import darts, nb201  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {  # space -> (network kwargs, batch on cuda, batch on cpu)
    "nb201": (dict(C=16, N=5), 64, 64),
    "darts": (dict(C=16, layers=8), 64, 8),
}
ROUNDS = 10 if DEVICE == "cuda" else 5


def build(
    space: str,
    device: str = DEVICE,
    seed: int = 0,
    net_kwargs: dict | None = None,
    batch: int | None = None,
    image_size: int = 32,
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(fastnas network, eager network with the same parameters, images, labels) at the space's size
    (or at ``net_kwargs``, ``batch`` and ``image_size`` when given)."""
    kwargs, batch_cuda, batch_cpu = SIZES[space]
    kwargs = kwargs if net_kwargs is None else net_kwargs
    torch.manual_seed(seed)
    fast_cls, eager_cls = (nb201.Network, EagerNB201Network) if space == "nb201" else (darts.Network, EagerDartsNetwork)
    fast = fast_cls(**kwargs).to(device)
    eager = eager_cls(**kwargs).to(device)
    eager.load_state_dict(fast.state_dict())
    if batch is None:
        batch = batch_cuda if torch.device(device).type == "cuda" else batch_cpu
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return fast, eager, x, y


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, loss and backward to every weight and architecture parameter."""
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: heap in use + mmapped)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc >= 2.33
    _LIBC = None


class _HeapPeak(TorchDispatchMode):
    """Samples the heap in use after every ATen/custom op (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = _heap_in_use()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use() - self.base)
        return out


def peak_bytes(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes allocated during one step beyond what was allocated before it (see module docstring)."""
    net.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        train_step(net, x, y)
        synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    if _LIBC is None:
        return -1
    gc.collect()  # no garbage of earlier steps freed (and counted negative) during this one
    gc.disable()
    try:
        with _HeapPeak() as mode:
            train_step(net, x, y)
    finally:
        gc.enable()
    return mode.peak


def saved_bytes(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for the backward of one step."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return sum(seen.values())


def measure(space: str, rounds: int = ROUNDS, device: str = DEVICE, with_nhwc: bool = False) -> dict:
    """Side-by-side numbers of one space (see the module docstring). ``with_nhwc`` also times the
    eager supernet fed a channels_last batch (``eager-nhwc``), the layout fastnas runs in on CPU."""
    fast, eager, x, y = build(space, device)
    fns = {"fastnas": lambda: train_step(fast, x, y), "eager": lambda: train_step(eager, x, y)}
    if with_nhwc:
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        fns["eager-nhwc"] = lambda: train_step(eager, x_nhwc, y)
    medians = interleaved_medians(fns, device, rounds=rounds, warmup=1)
    info = {
        "space": space,
        "device": device,
        "threads": torch.get_num_threads(),
        "mixed_sum_backend": fastnas.get_backend(device),
        "batch": x.shape[0],
        **SIZES[space][0],
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "speedup": round(medians["eager"] / medians["fastnas"], 3),
    }
    if with_nhwc:
        info["speedup_vs_eager_nhwc"] = round(medians["eager-nhwc"] / medians["fastnas"], 3)
    kernels = {
        name: count_kernels(lambda net=net: train_step(net, x, y)).total
        for name, net in (("fastnas", fast), ("eager", eager))
    }
    info["kernels"] = kernels
    info["kernels_ratio"] = round(kernels["fastnas"] / kernels["eager"], 3)
    for name, measure_fn in (("peak_MiB", peak_bytes), ("saved_MiB", saved_bytes)):
        values = {"fastnas": measure_fn(fast, x, y), "eager": measure_fn(eager, x, y)}
        info[name] = {k: round(v / 2**20, 1) for k, v in values.items()}
        info[name.replace("MiB", "ratio")] = round(values["fastnas"] / values["eager"], 3)
    return info


@pytest.mark.parametrize("space", list(SIZES))
def test_supernet_step(benchmark, space):
    """fastnas against eager, interleaved; the benchmark's own timing is the fastnas step."""
    info = measure(space)
    benchmark.extra_info.update(info)
    fast, _, x, y = build(space)
    benchmark.pedantic(lambda: (train_step(fast, x, y), synchronize(DEVICE)), rounds=2, iterations=1, warmup_rounds=1)


def _table(rows: list[dict]) -> str:
    lines = [
        "| space | batch | device | fastnas s | eager s | speedup | peak MiB fastnas / eager (ratio) "
        "| saved MiB fastnas / eager (ratio) | kernels fastnas / eager (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['space']} | {r['batch']} | {r['device']} ({r['threads']} threads) | {r['median_s']['fastnas']} "
            f"| {r['median_s']['eager']} | {r['speedup']}x | {r['peak_MiB']['fastnas']} / {r['peak_MiB']['eager']} "
            f"({r['peak_ratio']}) | {r['saved_MiB']['fastnas']} / {r['saved_MiB']['eager']} ({r['saved_ratio']}) "
            f"| {r['kernels']['fastnas']} / {r['kernels']['eager']} ({r['kernels_ratio']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", choices=list(SIZES), action="append")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument(
        "--with-nhwc", action="store_true", help="also time the eager supernet on a channels_last batch"
    )
    args = parser.parse_args()
    rows = [measure(space, args.rounds, args.device, args.with_nhwc) for space in (args.space or list(SIZES))]
    print(_table(rows))
    for r in rows:
        if "speedup_vs_eager_nhwc" in r:
            print(
                f"{r['space']}: eager on a channels_last batch {r['median_s']['eager-nhwc']} s, "
                f"fastnas {r['speedup_vs_eager_nhwc']}x faster"
            )
