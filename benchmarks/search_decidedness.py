"""Whether a search's architecture weights decide: GAEA against DARTS in the same setting.

Runs ``fastnas search`` with each ``--algorithms`` entry and otherwise default settings on the data
set, and prints per run the mean over edges of the largest op weight (1/5 = uniform, 1 = one-hot),
the mean entropy of the rows (ln 5 = 1.609 uniform), the test accuracy of the supernet, the
architecture and the wall time. Not a timed test: a measurement to run by hand, e.g.::

    python benchmarks/search_decidedness.py --dataset distorted-digits
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from fastnas.search import SearchConfig, run_search


def decidedness(record: dict) -> float:
    """Mean over every edge of every cell type of its largest op weight."""
    rows = torch.cat([torch.tensor(w) for w in record["arch_weights"].values()])
    return float(rows.max(-1).values.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="distorted-digits")
    p.add_argument("--algorithms", default="gaea-darts,darts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: the data set's")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.algorithms.split(","):
            t0 = time.perf_counter()
            cfg = SearchConfig(
                algorithm=name, dataset=args.dataset, epochs=args.epochs, seed=args.seed,
                out=os.path.join(tmp, name), progress=False, log=lambda s: None,
            )  # fmt: skip
            result = run_search(cfg)
            last = result["history"][-1]
            rows.append(
                {
                    "algorithm": name,
                    "epochs": last["epoch"],
                    "mean_max_weight": decidedness(last),
                    "entropy": last["entropy"],
                    "test_acc": last["test_acc"],
                    "arch": result["arch"],
                    "seconds": time.perf_counter() - t0,
                    "mean_max_by_epoch": [round(decidedness(h), 4) for h in result["history"]],
                }
            )
            r = rows[-1]
            print(
                f"{name:12s} {r['epochs']} epochs: mean largest weight {r['mean_max_weight']:.3f}, entropy "
                f"{r['entropy']:.4f}, supernet test accuracy {r['test_acc']:.2f}%, {r['seconds']:.0f} s\n"
                f"{'':12s} {r['arch']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
