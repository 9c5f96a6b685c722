"""A small forward+backward of every GPU backend of the mixed sum, for ``compute-sanitizer`` to watch.

``benchmarks/gpu_check.sh`` runs it under ``compute-sanitizer --tool memcheck`` and ``--tool
racecheck`` (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so that every tensor is its own allocation
and a read past its end is caught, not hidden inside a cached block). Cases: each backend (``cuda``,
``triton``), float32 and bfloat16, K = 3 and 40 (two chunks of inputs), inputs aligned or misaligned
(slices of one stacked tensor at an odd element offset), an odd-sized shape (masked tails) and a
flat one spanning many blocks, and a backward without the input gradients. Every result is also
checked against the float64 reference, so garbage is caught even where the sanitizer sees nothing.

Inputs are drawn and the reference computed on the CPU, so the only kernels the sanitizer watches
are the backends' own (and a few copies and casts).

Run:  compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py
      compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py --quick   (float32, K=40)
      python benchmarks/gpu_sanitize.py --dry        (the same calls on the CPU backends, no sanitizer)
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import fastnas
from fastnas.ops import reference

SHAPES = ((3, 5, 7, 11), (70_001,))
KS = (3, 40)
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative to the result's scale


def inputs(shape: tuple[int, ...], K: int, dtype: torch.dtype, aligned: bool, device: str, seed: int):
    """Drawn on the CPU and copied over: no kernel runs under the sanitizer but the ones checked."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if aligned:
        outputs = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(K)]
    else:
        flat = torch.randn(K * numel + 1, generator=gen).to(device, dtype)
        outputs = list(flat[1:].view(K, *shape).unbind(0))
    weights = torch.randn(K, generator=gen).to(device)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    return outputs, weights, grad


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``want``: the float64 reference, on the CPU."""
    scale = want.abs().max().item() + 1e-6
    error = (got.detach().cpu().double() - want).abs().max().item() / scale
    if not error <= TOLERANCE[dtype]:  # NaN fails too
        raise AssertionError(f"{name}: relative error {error:.3g} above {TOLERANCE[dtype]}")


def run_case(shape, K, dtype, aligned, device, seed) -> None:
    outputs, weights, grad = inputs(shape, K, dtype, aligned, device, seed)
    o64, w64, g64 = [o.cpu().double() for o in outputs], weights.cpu().double(), grad.cpu().double()
    y_ref = reference.mixed_sum_forward_reference(o64, w64)
    og_ref, wg_ref = reference.mixed_sum_backward_reference(g64, o64, w64, True)

    leaves = [o.detach().requires_grad_() for o in outputs]
    w = weights.detach().requires_grad_()
    y = fastnas.mixed_sum(leaves, w)
    grads = torch.autograd.grad(y, [w, *leaves], grad)
    check("y", y, y_ref, dtype)
    check("d weights", grads[0], wg_ref, dtype)
    for k in (0, K - 1):
        check(f"d outputs[{k}]", grads[1 + k], og_ref[k], dtype)

    # the weights' gradient alone (frozen inputs: no input gradients written)
    w_only = torch.autograd.grad(fastnas.mixed_sum(outputs, w), [w], grad)[0]
    check("d weights (inputs frozen)", w_only, wg_ref, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="run on the CPU backends (no GPU, no sanitizer)")
    parser.add_argument("--quick", action="store_true", help="float32 and K=40 only (for the slower racecheck)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry else "cuda"
    wanted = ("cpu", "reference") if args.dry else ("cuda", "triton")
    backends = [b for b in wanted if b in fastnas.available_backends(device)]
    if not backends:
        print(f"gpu_sanitize: none of the backends {wanted} is available on {device}", file=sys.stderr)
        return 1
    shapes = SHAPES[:1] if args.dry else SHAPES  # the CPU stand-in only checks the driver runs
    dtypes, ks = (DTYPES[:1], KS[-1:]) if args.quick else (DTYPES, KS)
    failures = 0
    seed = 0
    for name in backends:
        fastnas.set_backend(name)
        for dtype in dtypes:
            for K in ks:
                for shape in shapes:
                    for aligned in (True, False):
                        seed += 1
                        label = f"{name} {str(dtype).removeprefix('torch.')} K={K} {shape} " + (
                            "aligned" if aligned else "misaligned"
                        )
                        try:
                            run_case(shape, K, dtype, aligned, device, seed)
                            print(f"ok   {label}", flush=True)
                        except AssertionError as exc:
                            failures += 1
                            print(f"FAIL {label}: {exc}", flush=True)
        fastnas.set_backend(None)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize: {failures} wrong results on {device} ({', '.join(backends)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
