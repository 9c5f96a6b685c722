"""``fastnas rank``: the command line of the rank-disorder measurement (see ``fastnas rank --help``)."""

from __future__ import annotations

import argparse

from fastnas.rank.config import DEFAULT_DATASET, RankConfig
from fastnas.rank.run import run_rank
from fastnas.runs import cli
from fastnas.runs.data import DATASETS
from fastnas.runs.sweep import pool_from_args
from fastnas.runs.tables import TABLE_HELP
from fastnas.search.algorithms import ALGORITHMS, MODES
from fastnas.search.config import SPACES

PROG = "fastnas rank"

EPILOG = """examples:
  fastnas rank --out runs/rank                      # RS-WS supernet, 10 cells trained standalone, distorted digits
  fastnas rank --from runs/demo --out runs/rank-gaea   # the supernet of a search run
  fastnas rank --dataset cifar10 --data-dir ~/data --device cuda --count 100 \\
      --nb201-table NAS-Bench-201-v1_1-096897.pth --out runs/rank-c10
  fastnas rank --out runs/rank --resume             # continue after a stop, crash or kill
  fastnas rank --count 100 --workers 8 --device cuda --out runs/rank   # trainings as Ray tasks, 8 at once
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog=PROG,
        description="How well a weight-sharing supernet ranks architectures: shared-weight accuracies of "
        "random architectures against their ground truth (Kendall tau, Spearman rho, top-1/top-5).",
        epilog=EPILOG,
    )
    d = RankConfig()
    g = p.add_argument_group("the supernet")
    g.add_argument("--space", help=f"{', '.join(SPACES)} (default {d.space})")
    g.add_argument("--algorithm", help=f"trains the supernet: {', '.join(ALGORITHMS)} (default {d.algorithm})")
    g.add_argument("--mode", help=f"{' or '.join(MODES)} (default {d.mode})")
    g.add_argument(
        "--from",
        dest="from_run",
        help="use the supernet of this search run (its checkpoint.pt; its space, algorithm and size too)",
    )
    g.add_argument("--epochs", type=int, help="epochs of the supernet (default: fastnas search's)")
    g.add_argument("--batch-size", type=int, help=f"batch size of the supernet's training (default {d.batch_size})")
    g.add_argument("--channels", type=int, help="initial channels C (default: fastnas search's)")
    g.add_argument("--cells", type=int, help="cells per stage N / DARTS layers (default: fastnas search's)")
    g = p.add_argument_group("the architectures and their ground truth")
    g.add_argument("--count", type=int, help=f"architectures to rank, drawn at random (default {d.count})")
    g.add_argument(
        "--bn-batches",
        type=int,
        help=f"recompute BatchNorm statistics of each architecture on this many training batches "
        f"(default {d.bn_batches}; 0: keep the supernet's)",
    )
    g.add_argument("--nb201-table", help=f"ground truth from a NAS-Bench-201 table: {TABLE_HELP}")
    g.add_argument(
        "--table-column",
        help="the table's column to rank by (default: the data set's, e.g. ImageNet16-120_test_acc, "
        "when the table has it, else its first value column)",
    )
    g.add_argument(
        "--train-epochs",
        type=int,
        help="without a table: epochs of each standalone training (default: fastnas train's)",
    )
    g = p.add_argument_group("data and output")
    cli.add_data_and_output_flags(
        g, f"{', '.join(DATASETS)} (default: the --from run's, else {DEFAULT_DATASET})", d.out
    )
    g = p.add_argument_group("how to run")
    cli.add_running_flags(g, d)
    cli.add_pool_flags(g)
    return p


def config_from_args(args: argparse.Namespace) -> RankConfig:
    return cli.to_config(RankConfig, cli.settings(RankConfig, args))


def main(argv: list[str] | None = None) -> int:
    """Run ``fastnas rank`` with ``argv``; return the exit status (2 with one error line on bad input)."""
    return cli.main(PROG, build_parser(), argv, lambda args: run_rank(config_from_args(args), pool_from_args(args)))
