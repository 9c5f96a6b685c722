"""Run by tests/test_triton_compiled.py in a process without TRITON_INTERPRET: do the launch keys of
kernels/mixed_sum.py determine Triton's specialisation of a call?

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

import torch
from fastnas.kernels import mixed_sum as tk
from fastnas.kernels.offline import offline_gpu
from triton.runtime.jit import compute_cache_key

from fastnas.ops.reference import accumulation_dtype


def at_offset(numel: int, dtype: torch.dtype, offset: int) -> torch.Tensor:
    """A dense tensor of ``numel`` elements starting ``offset`` elements into a fresh buffer."""
    return torch.zeros(numel + offset, dtype=dtype)[offset:]


def main() -> None:
    calls: list[tuple] = []

    def record(which, grid, args, key, num_warps, device):
        calls.append((which, args, (which, device, *key), num_warps))

    tk._launch = record
    if "--without-alignment" in sys.argv:
        tk._alignment = lambda tensors: 1
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
        specialisations: dict[tuple, set[str]] = {}
        for which, args, key, num_warps in calls:
            kernel = tk.KERNELS[which]
            _, key_cache, _, _, binder = kernel.device_caches[0]
            options = {"num_warps": num_warps, "num_stages": 1, "debug": False}
            _, specialisation, options = binder(*args, **options)
            specialisations.setdefault(key, set()).add(compute_cache_key(key_cache, specialisation, options))
    conflicts = [repr(key) for key, found in specialisations.items() if len(found) > 1]
    print(json.dumps({"calls": len(calls), "keys": len(specialisations), "conflicts": conflicts}))


if __name__ == "__main__":
    main()
