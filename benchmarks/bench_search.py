"""Search throughput (images per second) of the fastnas supernets against the eager reference supernets.

One *search step* is what ``fastnas search`` does per batch in bilevel form: an architecture step
(forward and backward on a held-out batch, with respect to the architecture, then the GAEA or Adam
update) and a weight step (forward and backward on a training batch, gradient clipping, SGD). The
images/s counted are the training batch's, as in the search log. Both supernets get the same
optimizers, batches and step code; only the network differs (``fastnas.spaces`` against
``benchmarks/eager_supernets.py``, written the way DARTS and xautodl compute).

Run:  python benchmarks/bench_search.py                  # CPU sizes, both spaces
      python benchmarks/bench_search.py --device cuda     # paper sizes (C=16, 32x32, batch 64)
      pytest benchmarks/bench_search.py --benchmark-only  # the same steps under pytest-benchmark
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eager_supernets import EagerDartsNetwork, EagerNB201Network  # noqa: E402
from timing import interleaved_medians  # noqa: E402

from fastnas.optim import GAEA  # noqa: E402
from fastnas.spaces import darts, nb201  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (space, network kwargs, image size, batch): paper sizes on a GPU, smaller ones for a CPU
SIZES = {
    "cuda": [
        ("nb201", dict(C=16, N=5), 32, 64),
        ("darts", dict(C=16, layers=8), 32, 64),
    ],
    "cpu": [
        ("nb201", dict(C=16, N=1), 32, 32),
        ("darts", dict(C=8, layers=5), 32, 16),
    ],
}


def build(provider: str, space: str, kwargs: dict, algorithm: str, device: str) -> nn.Module:
    arch = "simplex" if algorithm.startswith("gaea") else "logits"
    cls = {
        ("fastnas", "nb201"): nb201.Network,
        ("fastnas", "darts"): darts.Network,
        ("eager", "nb201"): EagerNB201Network,
        ("eager", "darts"): EagerDartsNetwork,
    }[provider, space]
    torch.manual_seed(0)
    return cls(num_classes=10, arch=arch, **kwargs).to(device)


def search_step_fn(
    net: nn.Module, algorithm: str, batch: int, size: int, device: str, amp: str | None = None
) -> Callable:
    """A closure running one bilevel first-order search step of ``net`` on fixed random batches."""
    arch_params = [p for n, p in net.named_parameters() if n.split(".")[-1].startswith(("alphas", "betas"))]
    ids = {id(p) for p in arch_params}
    weights = [p for p in net.parameters() if id(p) not in ids]
    w_opt = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
    if algorithm.startswith("gaea"):
        a_opt = GAEA(arch_params, lr=0.1)
    else:
        a_opt = torch.optim.Adam(arch_params, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    xt, xv = (torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(2))
    yt, yv = (torch.randint(0, 10, (batch,), generator=g).to(device) for _ in range(2))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    net.train()

    def ctx():
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)

    def step() -> None:
        with ctx():
            loss = F.cross_entropy(net(xv), yv)
        for p, gr in zip(arch_params, torch.autograd.grad(loss, arch_params)):
            p.grad = gr
        a_opt.step()
        a_opt.zero_grad(set_to_none=True)
        for p in arch_params:
            p.requires_grad_(False)
        w_opt.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(net(xt), yt)
        loss.backward()
        nn.utils.clip_grad_norm_(weights, 5.0)
        w_opt.step()
        for p in arch_params:
            p.requires_grad_(True)

    return step


def compare(space: str, kwargs: dict, size: int, batch: int, algorithm: str, device: str, rounds: int,
            amp: str | None = None) -> dict:  # fmt: skip
    fns = {p: search_step_fn(build(p, space, kwargs, algorithm, device), algorithm, batch, size, device, amp)
           for p in ("fastnas", "eager")}  # fmt: skip
    med = interleaved_medians(fns, device, rounds=rounds, warmup=2)
    return {
        "space": space,
        "net": ", ".join(f"{k}={v}" for k, v in kwargs.items()),
        "input": f"{batch}x3x{size}x{size}",
        "algorithm": algorithm,
        "amp": amp or "fp32",
        "fastnas_img_s": batch / med["fastnas"],
        "eager_img_s": batch / med["eager"],
        "speedup": med["eager"] / med["fastnas"],
    }


def machine() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


@pytest.mark.parametrize("provider", ["fastnas", "eager"])
@pytest.mark.parametrize("space,kwargs,size,batch", SIZES[DEVICE], ids=[s[0] for s in SIZES[DEVICE]])
def test_search_step(benchmark, provider, space, kwargs, size, batch):
    step = search_step_fn(build(provider, space, kwargs, "gaea-darts", DEVICE), "gaea-darts", batch, size, DEVICE)
    step()
    benchmark.extra_info.update(provider=provider, space=space, batch=batch, unit="one search step")
    benchmark.pedantic(step, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--space", choices=["nb201", "darts", "both"], default="both")
    p.add_argument("--algorithm", choices=["gaea-darts", "darts"], default="gaea-darts")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = torch.device(args.device).type
    rows = [
        compare(
            space, kw, size, batch, args.algorithm, args.device, args.rounds or (20 if kind == "cuda" else 5), args.amp
        )  # fmt: skip
        for space, kw, size, batch in SIZES[kind]
        if args.space in ("both", space)
    ]
    print(f"search step (bilevel: arch step + weight step), {machine()}, torch {torch.__version__}")
    print("| space | net | input | algorithm | precision | fastnas img/s | eager img/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['space']} | {r['net']} | {r['input']} | {r['algorithm']} | {r['amp']} | "
              f"{r['fastnas_img_s']:.0f} | {r['eager_img_s']:.0f} | {r['speedup']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
