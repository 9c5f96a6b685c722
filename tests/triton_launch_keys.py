"""Run by tests/test_triton_compiled.py in a process without TRITON_INTERPRET: do the launch keys of
kernels/mixed_sum.py and kernels/batch_norm.py determine Triton's specialisation of a call?

The launchers run on CPU tensors under the offline driver; every launch is recorded instead of
made (nothing compiles), and Triton's own binder gives the specialisation of its arguments (the
key of Triton's kernel cache). Prints one JSON line: calls, distinct launch keys, and the keys
that met two specialisations (``conflicts``; must be empty). With ``--without-alignment`` the
keys lose their alignment bits, and conflicts must appear: the check can fail.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from fastnas.kernels import batch_norm as kb
from fastnas.kernels import mixed_sum as tk
from triton.runtime.jit import compute_cache_key

from fastnas.ops.reference import accumulation_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from triton_offline import offline_gpu  # noqa: E402


def at_offset(numel: int, dtype: torch.dtype, offset: int) -> torch.Tensor:
    """A dense tensor of ``numel`` elements starting ``offset`` elements into a fresh buffer."""
    return torch.zeros(numel + offset, dtype=dtype)[offset:]


def main() -> None:
    calls: list[tuple] = []

    def recorder(kernels, tag):
        def record(which, grid, args, key, num_warps, device):
            calls.append((kernels[which], args, (tag, which, device, *key), num_warps))

        return record

    tk._launch = recorder(tk.KERNELS, "mixed_sum")
    kb._launch = recorder(kb.KERNELS, "batch_norm")
    if "--without-alignment" in sys.argv:
        tk.alignment = lambda tensors: 1
        kb.alignment = lambda tensors: 1
    rng = random.Random(0)
    with offline_gpu(90):
        for _ in range(500):
            dtype = rng.choice([torch.float32, torch.float16, torch.float64])
            k = rng.choice([1, 2, 3, 5, 8, 9, 16, 17, 33])
            n = rng.choice([1, 7, 100, 511, 512, 1000, 2048, 5000, 70001])
            # aligned, or misaligned by one or two elements: one key, several addresses
            outputs = [at_offset(n, dtype, rng.choice([0, 0, 0, 1, 2])) for _ in range(k)]
            weights = at_offset(k, accumulation_dtype(dtype), rng.choice([0, 0, 1]))
            grad = at_offset(n, dtype, rng.choice([0, 0, 0, 1]))
            form = rng.randrange(4)
            if form == 0:
                tk.mixed_sum_forward(outputs, weights)
            else:
                tk.mixed_sum_backward(grad, outputs if form != 3 else [], weights, form != 2)
        for _ in range(300):  # the BatchNorm: dtypes, planes Triton specialises or not, blocks, alignment
            dtype = rng.choice([torch.float32, torch.float16, torch.float64])
            stats = accumulation_dtype(dtype)
            B, parts, c = rng.choice([1, 2, 5]), rng.choice([1, 2, 3, 17]), rng.choice([1, 3, 8])
            H, W = rng.choice([(1, 1), (4, 4), (7, 7), (8, 8), (3, 5), (32, 32)])
            if B * H * W < 2:
                B = 2
            x = at_offset(B * parts * c * H * W, dtype, rng.choice([0, 0, 1])).view(B, parts * c, H, W)
            running = rng.choice([None, stats, torch.float32])
            rm = None if running is None else at_offset(parts * c, running, rng.choice([0, 0, 1]))
            rv = None if running is None else at_offset(parts * c, running, 0)
            out, _, invstd = kb.batch_norm_parts(x, parts, rm, rv, 0.1, 1e-5)
            grads = [at_offset(B * c * H * W, dtype, rng.choice([0, 0, 0, 1])).view(B, c, H, W) for _ in range(parts)]
            kb.batch_norm_parts_backward(grads, list(out.unbind(0)), invstd)
        specialisations: dict[tuple, set[str]] = {}
        for kernel, args, key, num_warps in calls:
            _, key_cache, _, _, binder = kernel.device_caches[0]
            options = {"num_warps": num_warps, "num_stages": 1, "debug": False}
            _, specialisation, options = binder(*args, **options)
            specialisations.setdefault(key, set()).add(compute_cache_key(key_cache, specialisation, options))
    conflicts = [repr(key) for key, found in specialisations.items() if len(found) > 1]
    print(json.dumps({"calls": len(calls), "keys": len(specialisations), "conflicts": conflicts}))


if __name__ == "__main__":
    main()
