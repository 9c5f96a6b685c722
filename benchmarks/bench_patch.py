"""``fastnas.patch`` on the reference code: a training step of DARTS's ``model_search.Network`` (the
``cnn/`` folder named by ``FASTNAS_DARTS_SRC``) and of xautodl's ``TinyNetworkDarts`` (``pip install
--no-deps xautodl``), unpatched, with only DARTS's ``MixedOp`` s patched (each edge one mixed sum: what
a per-op drop-in gives), patched whole cells (``fastnas.patch``: each node one mixed sum, ops grouped
across edges), and fastnas's own supernets of the same size.

* ``times``: median seconds of one step (forward, cross-entropy, backward) of each, in
  interleaved rounds, at the sizes of the README's supernet rows: DARTS C=16, 8 layers, batch 16;
  NAS-Bench-201 C=16, N=5, batch 64 (32x32 images, CPU, ``torch.get_num_threads()`` threads).
* ``kernels``: non-view ATen operators of one step (``kernel_count.py``), each a launch on a GPU.

Run:  python benchmarks/bench_patch.py times [--rounds 5]     (on a quiet machine: OMP_NUM_THREADS=1)
      python benchmarks/bench_patch.py kernels
      python benchmarks/bench_patch.py times --tiny --rounds 1  (a check that it runs: C=4, batch 2)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step_kernels import step  # noqa: E402
from kernel_count import count_kernels  # noqa: E402
from timing import interleaved_medians  # noqa: E402

import fastnas  # noqa: E402
from fastnas.spaces import darts, nb201  # noqa: E402

SIZES = {"darts": dict(C=16, layers=8, batch=16), "nb201": dict(C=16, N=5, batch=64)}
TINY = {"darts": dict(C=4, layers=3, batch=2), "nb201": dict(C=4, N=1, batch=2)}


def darts_reference(C: int, layers: int) -> nn.Module | None:
    folder = os.environ.get("FASTNAS_DARTS_SRC")
    if not folder:
        return None
    sys.path.insert(0, folder)
    try:
        model_search = importlib.import_module("model_search")
    finally:
        sys.path.remove(folder)
    return model_search.Network(C, 10, layers, nn.CrossEntropyLoss())


def xautodl_reference(C: int, N: int) -> nn.Module | None:
    try:
        from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts
    except ImportError:
        return None
    return TinyNetworkDarts(C, N, 4, 10, nb201.PRIMITIVES, False, True)


def patched(model: nn.Module, **options) -> nn.Module:
    """A patched copy (the same weights), the report checked: everything it should patch was."""
    copied = copy.deepcopy(model)
    report = fastnas.patch(copied, **options)
    if not report.patched or report.left_alone:
        raise RuntimeError(f"fastnas.patch did not patch the whole model:\n{report}")
    return copied


def networks(space: str, size: dict) -> dict[str, tuple[nn.Module, bool]]:
    """The reference network unpatched and patched, and fastnas's own supernet, for one space, each
    with whether its input batch is channels_last (the layout fastnas runs float32 CPU steps in: a
    patched model runs in its input's layout)."""
    torch.manual_seed(0)
    if space == "darts":
        ref = darts_reference(size["C"], size["layers"])
        own = darts.Network(C=size["C"], layers=size["layers"])
        name = "DARTS model_search"
    else:
        ref = xautodl_reference(size["C"], size["N"])
        own = nb201.Network(C=size["C"], N=size["N"])
        name = "xautodl TinyNetworkDarts"
    nets: dict[str, tuple[nn.Module, bool]] = {}
    if ref is not None:
        nets[name] = ref, False
        if space == "darts":
            nets[f"{name}, MixedOps patched"] = patched(ref, level="mixed_op"), False
        nets[f"{name}, fastnas.patch"] = patched(ref), False
        nets[f"{name}, fastnas.patch, channels_last batch"] = patched(ref), True
    nets[f"fastnas.spaces.{space}"] = own, False
    return nets


def step_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: step(net, x, y)


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["times", "kernels"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny networks and batches: a check that it runs")
    args = parser.parse_args()
    sizes = TINY if args.tiny else SIZES
    for space, size in sizes.items():
        nets = networks(space, size)
        x, y = inputs(2 if args.what == "kernels" else size["batch"])  # the count does not depend on the batch
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        steps = {name: step_of(net, x_nhwc if nhwc else x, y) for name, (net, nhwc) in nets.items()}
        if args.what == "kernels":
            for name, step in steps.items():
                step()
                print(f"{space}: {name}: {count_kernels(step).total} kernels per step")
            continue
        medians = interleaved_medians(steps, "cpu", rounds=args.rounds, warmup=1)
        base = next(iter(medians.values()))
        shape = ", ".join(f"{k}={v}" for k, v in size.items())
        print(f"{space} ({shape}, {torch.get_num_threads()} threads):")
        for name, seconds in medians.items():
            print(f"  {name}: {seconds:.3f} s ({base / seconds:.2f}x the first)")


if __name__ == "__main__":
    main()
