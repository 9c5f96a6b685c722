"""Kernels per training step, step times and compile times of fastnas.spaces against the eager supernets
and, where installed, the reference code itself.

* Kernels: the non-view ATen operators of one forward + cross-entropy + backward (see
  ``kernel_count.py``), for fastnas (every sampler), the eager supernets of ``eager_supernets.py``
  (same sampler) and the reference implementations: xautodl's ``TinyNetworkDarts`` / ``TinyNetworkGDAS``
  (``pip install --no-deps xautodl``) and DARTS's ``model_search.Network`` (a copy of quark0/darts's
  ``cnn/`` folder, with ``.cuda()`` calls removed, in the folder named by ``FASTNAS_DARTS_SRC``).
* GPU path: fastnas's count with its CPU-only kernels switched off (:func:`gpu_path`), next to the
  CPU count on the same sample.
* Times: median seconds of a step in interleaved rounds: fastnas, the eager supernet on a
  channels_last batch (the layout fastnas runs in on CPU) and the reference code.
* Host time: the same step on tiny images (16 of 4x4 for NAS-Bench-201, 8x8 for DARTS), so that
  the kernels have almost nothing to compute and the time is what the host spends dispatching them:
  Python, autograd and the operators' own overhead. On a GPU, where a supernet step at batch 64 is
  launch-bound, this is the floor of an eager step's time. (A batch of 16: below it PyTorch runs
  single-threaded 1x1 convolutions by its slow reference kernel, a grouped one group by group, which
  no real step does.)
* Compile: ``net.compile_cells()`` (inductor): seconds of the first step (compilation included), then
  the compiled step against the eager fastnas step, interleaved.

Run:  python benchmarks/bench_step_kernels.py kernels
      python benchmarks/bench_step_kernels.py gpu-path-kernels   (fastnas on CPU and on the GPU path)
      python benchmarks/bench_step_kernels.py times [--rounds 5]
      python benchmarks/bench_step_kernels.py host [--rounds 15]
      python benchmarks/bench_step_kernels.py compile --space nb201
      pytest benchmarks/bench_step_kernels.py --benchmark-only   (kernel counts in extra_info)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eager_supernets import EagerDartsNetwork, EagerNB201Network  # noqa: E402
from kernel_count import count_kernels  # noqa: E402
from timing import interleaved_medians  # noqa: E402

import fastnas  # noqa: E402
from fastnas.spaces import darts, nb201  # noqa: E402

MODES = {
    "softmax": dict(),
    "simplex": dict(arch="simplex"),
    "gdas": dict(sampler="gdas"),
    "uniform": dict(sampler="uniform"),
    "pc": dict(partial_channels=4),
}
SIZES = {"darts": dict(C=16, layers=8), "nb201": dict(C=16, N=5)}
BATCH = {"darts": 16, "nb201": 64}


def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    out = net(x)
    F.cross_entropy(out[1] if isinstance(out, tuple) else out, y).backward()


def reference_networks(space: str, mode: str, track_running_stats: bool = True) -> dict[str, nn.Module]:
    """The reference code's supernet for this space and mode, when it is installed (else {})."""
    if space == "nb201":
        try:
            from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts
            from xautodl.models.cell_searchs.search_model_gdas import TinyNetworkGDAS
        except ImportError:
            return {}
        args = (16, 5, 4, 10, nb201.PRIMITIVES, False, track_running_stats)
        if mode == "softmax":
            return {"xautodl DARTS-V1": TinyNetworkDarts(*args)}
        return {"xautodl GDAS": TinyNetworkGDAS(*args)} if mode == "gdas" else {}
    folder = os.environ.get("FASTNAS_DARTS_SRC")
    if mode != "softmax" or not folder:
        return {}
    sys.path.insert(0, folder)
    try:
        model_search = importlib.import_module("model_search")
    finally:
        sys.path.remove(folder)
    return {"DARTS model_search": model_search.Network(16, 10, 8, nn.CrossEntropyLoss())}


def fastnas_network(space: str, mode: str, track_running_stats: bool = True) -> nn.Module:
    kwargs = {**SIZES[space], **MODES[mode]}
    if space == "nb201":
        return nb201.Network(**kwargs, track_running_stats=track_running_stats)
    return darts.Network(**kwargs)


def networks(space: str, mode: str, track_running_stats: bool = True, seed: int = 0) -> dict[str, nn.Module]:
    """fastnas, the eager supernet (same parameters) and the reference code's, for one space and mode."""
    torch.manual_seed(seed)
    fast = fastnas_network(space, mode, track_running_stats)
    kwargs = {**SIZES[space], **MODES[mode]}
    if space == "nb201":
        eager = EagerNB201Network(**kwargs, track_running_stats=track_running_stats)
    else:
        eager = EagerDartsNetwork(**kwargs)
    eager.load_state_dict(fast.state_dict())
    return {"fastnas": fast, "eager": eager, **reference_networks(space, mode, track_running_stats)}


def space_modes(space: str) -> list[str]:
    return list(MODES) if space == "darts" else [m for m in MODES if m != "pc"]


def kernel_rows() -> list[dict]:
    """Kernels per step of every network, space, mode and (NAS-Bench-201) BatchNorm setting."""
    rows = []
    x = torch.randn(2, 3, 32, 32)  # the count does not depend on the batch or the image size
    y = torch.randint(0, 10, (2,))
    for space in SIZES:
        for mode in space_modes(space):
            for trs in (True, False) if space == "nb201" else (True,):
                for name, net in networks(space, mode, trs).items():
                    step(net, x, y)
                    counted = count_kernels(lambda net=net: step(net, x, y))
                    rows.append(dict(space=space, mode=mode, track_running_stats=trs, network=name,
                                     kernels=counted.total, top=counted.counts.most_common(6)))  # fmt: skip
    return rows


@contextlib.contextmanager
def gpu_path():
    """The operators a GPU's step dispatches, counted on CPU: fastnas's CPU-only kernels (depthwise
    convolution, average pooling) switched off, so those run PyTorch's operators as on CUDA; the
    BatchNorm ops stay on (on CUDA they are the Triton kernels of ``kernels/batch_norm.py``)."""
    for op in ("avg_pool", "depthwise_conv"):
        fastnas.set_kernels(op, "torch")
    try:
        yield
    finally:
        for op in ("avg_pool", "depthwise_conv"):
            fastnas.set_kernels(op, None)


def gpu_path_rows() -> list[dict]:
    """Kernels per step of fastnas on CPU and on the GPU path (:func:`gpu_path`), every space and mode,
    the two counts of a row on the same sample (the global RNG seeded alike before each)."""
    rows = []
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for space in SIZES:
        for mode in space_modes(space):
            for trs in (True, False) if space == "nb201" else (True,):
                torch.manual_seed(0)
                net = fastnas_network(space, mode, trs)
                step(net, x, y)
                counts = {}
                for path, context in (("cpu", contextlib.nullcontext), ("gpu", gpu_path)):
                    with context():
                        torch.manual_seed(1)
                        counts[path] = count_kernels(lambda net=net: step(net, x, y)).total
                rows.append(dict(space=space, mode=mode, track_running_stats=trs, **counts))
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = [
        "| space | sampler | BN tracks stats | fastnas | eager (ratio) | reference code (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["space"], r["mode"], r["track_running_stats"]) for r in rows},
        key=lambda k: (k[0], list(MODES).index(k[1]), not k[2]),
    )
    for key in keys:
        by_net = {r["network"]: r["kernels"] for r in rows if (r["space"], r["mode"], r["track_running_stats"]) == key}
        fast = by_net.pop("fastnas")
        eager = by_net.pop("eager")
        refs = ", ".join(f"{name} {n} ({n / fast:.2f}x)" for name, n in by_net.items()) or "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {fast} | {eager} ({eager / fast:.2f}x) | {refs} |")
    return "\n".join(lines)


def time_row(space: str, rounds: int) -> dict:
    """Median step seconds of fastnas, the eager supernet on a channels_last batch and the reference
    code (softmax weighting), interleaved."""
    nets = networks(space, "softmax")
    x = torch.randn(BATCH[space], 3, 32, 32)
    y = torch.randint(0, 10, (BATCH[space],))
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    fns = {"fastnas": lambda: step(nets["fastnas"], x, y), "eager-nhwc": lambda: step(nets["eager"], x_nhwc, y)}
    for name, net in nets.items():
        if name not in ("fastnas", "eager"):
            fns[name] = lambda net=net: step(net, x, y)
    medians = interleaved_medians(fns, "cpu", rounds=rounds, warmup=1)
    return dict(space=space, batch=BATCH[space], threads=torch.get_num_threads(), medians=medians)


HOST_SIZE = {"darts": 4, "nb201": 4}
"""Image side of the host-time step: the smallest both networks' reductions accept."""
HOST_BATCH = 16


def host_row(space: str, rounds: int) -> dict:
    """Median step seconds of each network on a batch of tiny images (channels_last for fastnas and
    the eager supernet, as on CPU), interleaved: the step's host cost (see the module docstring)."""
    nets = networks(space, "softmax")
    side = HOST_SIZE[space]
    x = torch.randn(HOST_BATCH, 3, side, side)
    y = torch.randint(0, 10, (HOST_BATCH,))
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    inputs = {name: x_nhwc if name in ("fastnas", "eager") else x for name in nets}
    fns = {name: lambda net=net, x=inputs[name]: step(net, x, y) for name, net in nets.items()}
    medians = interleaved_medians(fns, "cpu", rounds=rounds, warmup=2)
    kernels = count_kernels(lambda: step(nets["fastnas"], x_nhwc, y)).total
    return dict(space=space, side=side, threads=torch.get_num_threads(), medians=medians, kernels=kernels)


def compile_row(space: str, mode: str, rounds: int) -> dict:
    """Seconds of the first compiled step (compilation included) and medians of compiled and eager steps."""
    nets = networks(space, mode)
    fast, compiled = nets["fastnas"], networks(space, mode)["fastnas"]
    compiled.load_state_dict(fast.state_dict())
    compiled.compile_cells()
    x = torch.randn(BATCH[space], 3, 32, 32)
    y = torch.randint(0, 10, (BATCH[space],))
    start = time.perf_counter()
    step(compiled, x, y)
    first = time.perf_counter() - start
    medians = interleaved_medians(
        {"eager": lambda: step(fast, x, y), "compiled": lambda: step(compiled, x, y)}, "cpu", rounds=rounds, warmup=1
    )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return dict(space=space, mode=mode, first_step_s=round(first, 1), graphs=graphs, medians=medians)


@pytest.mark.parametrize("space", list(SIZES))
def test_kernels_per_step(benchmark, space):
    rows = [r for r in kernel_rows() if r["space"] == space]
    benchmark.extra_info["kernels"] = [{k: v for k, v in r.items() if k != "top"} for r in rows]
    nets = networks(space, "softmax")
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    benchmark.pedantic(lambda: step(nets["fastnas"], x, y), rounds=2, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["kernels", "gpu-path-kernels", "times", "host", "compile"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--space", choices=list(SIZES), default="nb201")
    parser.add_argument("--mode", choices=list(MODES), default="softmax")
    args = parser.parse_args()
    if args.what == "kernels":
        rows = kernel_rows()
        print(kernel_table(rows))
        for r in rows:
            if r["network"] == "fastnas":
                print(r["space"], r["mode"], r["track_running_stats"], r["top"])
    elif args.what == "gpu-path-kernels":
        for r in gpu_path_rows():
            stats = "tracks stats" if r["track_running_stats"] else "no stats"
            print(f"{r['space']} {r['mode']} ({stats}): CPU {r['cpu']}, GPU path {r['gpu']}")
    elif args.what == "times":
        for r in (time_row(space, args.rounds) for space in SIZES):
            med = r["medians"]
            ratios = ", ".join(f"{k} {v:.3f} s ({v / med['fastnas']:.2f}x)" for k, v in med.items() if k != "fastnas")
            print(f"{r['space']} batch {r['batch']} ({r['threads']} threads): fastnas {med['fastnas']:.3f} s; {ratios}")
    elif args.what == "host":
        for r in (host_row(space, args.rounds) for space in SIZES):
            med = r["medians"]
            fast = med["fastnas"]
            ratios = ", ".join(f"{k} {v * 1e3:.1f} ms ({v / fast:.2f}x)" for k, v in med.items() if k != "fastnas")
            per_kernel = f"{fast / r['kernels'] * 1e6:.1f} us per kernel of {r['kernels']}"
            print(f"{r['space']} batch {HOST_BATCH} of {r['side']}x{r['side']} ({r['threads']} threads): fastnas "
                  f"{fast * 1e3:.1f} ms ({per_kernel}); {ratios}")  # fmt: skip
    else:
        r = compile_row(args.space, args.mode, args.rounds)
        med = r["medians"]
        speedup = med["eager"] / med["compiled"]
        print(f"{r['space']} {r['mode']}: first compiled step {r['first_step_s']} s ({r['graphs']} graphs); "
              f"compiled {med['compiled']:.3f} s, eager {med['eager']:.3f} s ({speedup:.2f}x)")  # fmt: skip
