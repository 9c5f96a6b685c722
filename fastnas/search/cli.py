"""``fastnas search``: the command line of the search driver (see ``fastnas search --help``)."""

from __future__ import annotations

import argparse

from fastnas.runs import cli, sweep
from fastnas.runs.config import RunError
from fastnas.runs.data import DATASETS
from fastnas.runs.tables import TABLE_HELP
from fastnas.search.algorithms import ALGORITHMS, MODES
from fastnas.search.config import SPACES, SearchConfig
from fastnas.search.loop import run_search
from fastnas.search.seeds import SeedsConfig, parse_seeds, run_seeds

PROG = "fastnas search"

EPILOG = """examples:
  fastnas search --out runs/demo                        # GAEA-DARTS on NAS-Bench-201, distorted digits, CPU
  fastnas search --space darts --algorithm gaea-pc-darts --dataset cifar10 --data-dir ~/data \\
      --device cuda --amp bf16 --out runs/pc
  torchrun --nproc_per_node 8 -m fastnas search --device cuda --dataset cifar10 --data-dir ~/data --out runs/ddp
  fastnas search --out runs/demo --resume               # continue from the last checkpoint
  fastnas search --seeds 0-3 --workers 2 --nb201-table nb201.csv --out runs/s   # 4 searches on Ray, mean and std
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog=PROG,
        description="Search an architecture with weight sharing (DARTS, GAEA, PC-DARTS, GDAS, RS-WS).",
        epilog=EPILOG,
    )
    d = SearchConfig()
    g = p.add_argument_group("what to search")
    g.add_argument("--space", help=f"search space: {', '.join(SPACES)} (default {d.space})")
    g.add_argument("--algorithm", help=f"{', '.join(ALGORITHMS)} (default {d.algorithm})")
    g.add_argument(
        "--mode",
        help=f"{' or '.join(MODES)}: architecture steps on the training "
        f"data or on a held-out part of it (default {d.mode})",
    )
    g.add_argument(
        "--epochs",
        type=int,
        help="epochs (default: 40 (nb201) or 10 (darts) on distorted-digits, 20 / 10 on digits, 50 elsewhere)",
    )
    g.add_argument("--batch-size", type=int, help="global batch size (default: 32 on distorted-digits, else 64)")
    g.add_argument("--channels", type=int, help="initial channels C (default: 8 on the digits, 16 elsewhere)")
    g.add_argument(
        "--cells",
        type=int,
        help="NAS-Bench-201: cells per stage N (1 on the digits, 5 elsewhere); DARTS: layers (5 / 8)",
    )
    g = p.add_argument_group("data and output")
    cli.add_data_and_output_flags(
        g, f"{', '.join(DATASETS)} (default {d.dataset}: built from scikit-learn's digits, no download)", d.out
    )
    g.add_argument("--nb201-table", help=f"look the result up in a NAS-Bench-201 table: {TABLE_HELP}")
    g.add_argument(
        "--subset",
        help="bilevel: class-balanced fractions W,A of the training set for the weights and the architecture, "
        "drawn for --seed (PC-DARTS's ImageNet search: 0.1,0.025)",
    )
    cli.add_image_folder_flags(g)
    g = p.add_argument_group("how to run")
    cli.add_running_flags(g, d)
    g = p.add_argument_group("many searches")
    g.add_argument(
        "--seeds",
        type=parse_seeds,
        help="one search per seed, e.g. 0,1,2,3 or 0-3, each in --out/seed-<s>, and a summary.json of "
        "their architectures and accuracies (mean and standard deviation)",
    )
    cli.add_pool_flags(g)
    g = p.add_argument_group("optimisation (defaults follow the papers)")
    g.add_argument("--lr", type=float, help=f"weights: SGD learning rate (default {d.lr}, cosine)")
    g.add_argument("--lr-min", type=float, help=f"end of the cosine decay (default {d.lr_min})")
    g.add_argument("--momentum", type=float, help=f"(default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, help=f"gradient-norm clip (default {d.grad_clip})")
    g.add_argument(
        "--arch-lr",
        type=float,
        help="architecture learning rate (GAEA 0.1, DARTS 3e-4; 3 times those on distorted-digits)",
    )
    g.add_argument("--arch-weight-decay", type=float, help="Adam weight decay of the logits (1e-3)")
    g.add_argument("--entropy-weight", type=float, help="GAEA entropic regulariser weight (0)")
    g.add_argument("--arch-warmup", type=int, help="epochs before architecture updates start")
    g.add_argument(
        "--train-portion",
        type=float,
        help=f"bilevel: part of the training set for the weights (default {d.train_portion})",
    )
    g.add_argument(
        "--rs-samples",
        type=int,
        help=f"rs-ws: random architectures scored with the shared weights at the end (default {d.rs_samples}; 0: none)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    return cli.to_config(SearchConfig, cli.settings(SearchConfig, args))


def run(args: argparse.Namespace) -> dict:
    """One search, or one per seed (``--seeds``, or ``--resume`` of a sweep over seeds)."""
    pool = sweep.pool_from_args(args)
    if "seeds" in args or cli.resumed_sweep(args, SeedsConfig().out) == "seeds":
        if "seed" in args:
            raise RunError("give --seed or --seeds, not both")
        return run_seeds(cli.to_config(SeedsConfig, cli.settings(SeedsConfig, args)), pool)
    if pool.uses_ray:
        raise RunError("--workers and --ray-address run many searches: give --seeds")
    return run_search(config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    """Run ``fastnas search`` with ``argv`` (the arguments after ``search``); return the exit status:
    0 on success, 2 (with one ``fastnas search: error: ...`` line on stderr) on bad input."""
    return cli.main(PROG, build_parser(), argv, run)
