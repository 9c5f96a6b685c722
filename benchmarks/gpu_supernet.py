"""One supernet training step on the GPU: fastnas against the eager supernets (a stage of ``gpu_check.sh``).

Sizes as in ``bench_supernet.py`` on a GPU: NAS-Bench-201 (C=16, N=5) and DARTS (C=16, 8 layers),
batch 64, 32x32 images; the two networks of a space start from the same parameters. A step is
``zero_grad``, forward, cross-entropy, backward and an SGD step (momentum 0.9, weight decay 3e-4)
over every parameter, weights and architecture alike.

Modes, each a row:

* ``eager``: the step as written; its time is the median over steps after warm-up of the host
  clock around a step with the device drained before and after, fastnas and eager in interleaved
  rounds; ``peak_MiB`` is ``torch.cuda.max_memory_allocated`` during a step minus what was
  allocated before it.
* ``cuda-graph``: the whole step captured once with ``torch.cuda.graph`` (PyTorch's whole-network
  capture recipe: warm-up on a side stream, gradients set to None before the capture) and replayed;
  median of replays; ``graph_MiB`` is the memory the graph's pool holds. A network that cannot be
  captured (a host synchronisation inside its step, say) gets the error in its row.
* ``fastnas-native-bn`` rows: the same fastnas step with its BatchNorm ops switched off (PyTorch's
  BatchNorm, a copy splitting its output per edge, two merging in the backward), eager and as a
  CUDA graph: what the Triton BatchNorm (``kernels/batch_norm.py``) gains or loses at these sizes.
* ``compile``: with ``--compile`` only (long): ``torch.compile(mode="reduce-overhead")`` of forward
  and loss, the backward and the SGD step outside; ``compile_s`` is the first step's time.

Run:  python benchmarks/gpu_supernet.py --json supernet.json [--budget-s 60] [--compile] [--dry]
With ``--dry``: tiny networks on the CPU, eager mode only, labelled as stand-ins.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_supernet import build  # noqa: E402
from gpu_common import DRY_LABEL, Deadline, device_for, stage_arguments, write_json  # noqa: E402
from timing import time_once  # noqa: E402

import fastnas  # noqa: E402

EXIT_BUDGET_SPENT = 3
GPU_SIZES = {"nb201": (dict(C=16, N=5), 64, 32), "darts": (dict(C=16, layers=8), 64, 32)}  # kwargs, batch, image
DRY_SIZES = {"nb201": (dict(C=4, N=1), 2, 8), "darts": (dict(C=4, layers=2), 2, 8)}


@contextlib.contextmanager
def native_batch_norm():
    """fastnas's BatchNorm ops switched off: ``lean_batch_norm`` takes PyTorch's kernels."""
    fastnas.set_kernels("batch_norm", "torch")
    try:
        yield
    finally:
        fastnas.set_kernels("batch_norm", None)


def with_native_batch_norm(step: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with native_batch_norm():
            return step()

    return run


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)


def eager_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = optimizer(net)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def graph_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], object], int]:
    """The whole step captured in one CUDA graph: (replay, bytes its memory pool holds)."""
    opt = optimizer(net)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: cached tensors, optimizer state
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        F.cross_entropy(net(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    return graph.replay, torch.cuda.memory_allocated() - before


def compiled_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = optimizer(net)
    loss_fn = torch.compile(lambda: F.cross_entropy(net(x), y), mode="reduce-overhead")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def peak_mib(step: Callable[[], object], device: str) -> float:
    if device != "cuda":
        return -1.0  # torch keeps no allocator statistics on the CPU
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def stats(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return dict(step_ms=round(statistics.median(ms), 3), min_ms=round(ms[0], 3), max_ms=round(ms[-1], 3), steps=len(ms))


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="also torch.compile(mode='reduce-overhead')")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per network (default 8, dry 1)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)
    device = device_for(args.dry)
    sizes = DRY_SIZES if args.dry else GPU_SIZES
    steps = args.steps or (1 if args.dry else 8)
    warmup = 1 if args.dry else 2
    result = {
        "dry": args.dry,
        "label": DRY_LABEL if args.dry else "",
        "device": "cpu" if args.dry else torch.cuda.get_device_name(),
        "mixed_sum_backend": fastnas.get_backend(device),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "rows": [],
        "stopped_by_budget": False,
    }
    nets = {}

    def out_of_time(needed: float) -> bool:
        if deadline.left() < needed:
            result["stopped_by_budget"] = True
            return True
        return False

    def save(row: dict) -> None:
        result["rows"].append(row)
        write_json(args.json, result)
        print(f"[{deadline.seconds - deadline.left():6.1f}s] {row}", flush=True)

    # eager mode, both spaces first: the numbers that matter most
    for space, (kwargs, batch, image_size) in sizes.items():
        if out_of_time(10 if not args.dry else 1):
            break
        fast, eager, x, y = build(space, device, net_kwargs=kwargs, batch=batch, image_size=image_size)
        fast_native = copy.deepcopy(fast)
        nets[space] = (fast, eager, fast_native, x, y)
        base = dict(space=space, batch=batch, image=image_size, **kwargs)
        steps_of = {
            "fastnas": eager_step(fast, x, y),
            "eager": eager_step(eager, x, y),
            "fastnas-native-bn": with_native_batch_norm(eager_step(fast_native, x, y)),
        }
        for _ in range(warmup):
            for step in steps_of.values():
                step()
        seconds = {name: [] for name in steps_of}
        for _ in range(steps):
            for name, step in steps_of.items():
                seconds[name].append(time_once(step, device))
        for name, step in steps_of.items():
            save(dict(base, net=name, mode="eager", **stats(seconds[name]), peak_MiB=peak_mib(step, device)))

    # the whole step as one CUDA graph, then (asked for) torch.compile
    modes = [] if args.dry else ["cuda-graph"] + (["compile"] if args.compile else [])
    for mode in modes:
        for space, (fast, eager, fast_native, x, y) in nets.items():
            for name, net in (("eager", eager), ("fastnas", fast), ("fastnas-native-bn", fast_native)):
                if out_of_time(60 if mode == "compile" else 8):
                    break
                row = dict(space=space, batch=x.shape[0], net=name, mode=mode)
                try:
                    start = time.perf_counter()
                    native = native_batch_norm() if name == "fastnas-native-bn" else contextlib.nullcontext()
                    if mode == "cuda-graph":
                        with native:  # captured with the native BatchNorm; replays need no switch
                            step, held = graph_step(net, x, y)
                        row["graph_MiB"] = round(held / 2**20, 1)
                    elif name == "fastnas-native-bn":
                        continue  # compile: the two fastnas rows are enough
                    else:
                        step = compiled_step(net, x, y)
                        time_once(step, device)
                        row["compile_s"] = round(time.perf_counter() - start, 1)
                    for _ in range(warmup):
                        step()
                    row.update(stats([time_once(step, device) for _ in range(steps)]))
                except Exception as exc:  # e.g. a host synchronisation inside the captured step
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                save(row)
    if args.dry:
        result["not_run"] = "CUDA graphs and compile: GPU only"
    write_json(args.json, result)
    return EXIT_BUDGET_SPENT if result["stopped_by_budget"] else 0


if __name__ == "__main__":
    sys.exit(main())
