"""Run twice by tests/test_triton_mixed_sum.py, each time in a fresh process: the bits of dL/dw (and
of y and dL/do_k) from the triton backend for fixed inputs, as one JSON line. With ``--history`` the
process first runs other sizes, K and dtypes, as a training script would before reaching these
inputs. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from fastnas.kernels import mixed_sum as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for _ in range(k)]
    weights = torch.randn(k, generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    return outputs, weights, grad


def digest(tensors) -> str:
    return hashlib.sha256(
        b"".join(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    ).hexdigest()


def main() -> None:
    if "--history" in sys.argv:
        for n, k, dtype in ((777, 3, torch.float16), (2048, 17, torch.float32), (1000, 9, torch.float64)):
            outputs, weights, grad = inputs(n, k, dtype, seed=n)
            tk.mixed_sum_forward(outputs, weights.to(grad.dtype if dtype == torch.float64 else torch.float32))
            tk.mixed_sum_backward(
                grad, outputs, weights.to(torch.float64 if dtype == torch.float64 else torch.float32), True
            )
    bits = {}
    for dtype in (torch.float32, torch.float16):
        for n in (1023, 5000):  # one program; several (partial sums added by the last)
            outputs, weights, grad = inputs(n, 9, dtype, seed=1)
            y = tk.mixed_sum_forward(outputs, weights)
            dos, dw = tk.mixed_sum_backward(grad, outputs, weights, True)
            bits[f"{dtype}-{n}"] = [dw.cpu().tolist(), digest([y, *dos])]
    print(json.dumps(bits))


if __name__ == "__main__":
    main()
