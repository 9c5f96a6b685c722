"""How far apart standalone accuracies of random NAS-Bench-201 cells lie on an embedded data set.

Trains ``--count`` distinct random cells (seeded) with ``fastnas train``'s default recipe on the data
set and prints each one's test accuracy, the span (best minus worst) and the time; ``--json`` writes
the numbers. Not a timed test: a measurement to run by hand, e.g.::

    python benchmarks/task_separation.py --dataset distorted-digits --count 10
    python benchmarks/task_separation.py --dataset digits --count 10
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from fastnas.spaces.nb201 import random_arch_strings
from fastnas.train import TrainConfig, run_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="distorted-digits")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the architectures and of the trainings")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    archs = random_arch_strings(args.count, torch.Generator().manual_seed(args.seed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, arch in enumerate(archs):
            t0 = time.perf_counter()
            cfg = TrainConfig(
                arch=arch, dataset=args.dataset, epochs=args.epochs, seed=args.seed,
                out=os.path.join(tmp, str(i)), progress=False, log=lambda s: None,
            )  # fmt: skip
            result = run_train(cfg)
            rows.append({"arch": arch, "test_acc": result["test_acc"], "seconds": time.perf_counter() - t0})
            print(f"{result['test_acc']:6.2f}%  {rows[-1]['seconds']:5.1f} s  {arch}", flush=True)
    accs = [r["test_acc"] for r in rows]
    summary = {
        "dataset": args.dataset,
        "count": len(rows),
        "span": max(accs) - min(accs),
        "min": min(accs),
        "max": max(accs),
        "seconds": sum(r["seconds"] for r in rows),
        "rows": rows,
    }
    print(
        f"{args.dataset}: {len(rows)} random cells, test accuracy {min(accs):.2f}..{max(accs):.2f}% "
        f"(span {summary['span']:.2f} points), {summary['seconds']:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
