"""``fastnas search``: the command line of the search driver (see ``fastnas search --help``)."""

from __future__ import annotations

import argparse
import sys

from fastnas.search.algorithms import ALGORITHMS, MODES
from fastnas.search.data import DATASETS
from fastnas.search.trainer import AMP_MODES, SPACES, SearchConfig, SearchError, run_search

PROG = "fastnas search"

EPILOG = """examples:
  fastnas search --out runs/demo                        # GAEA-DARTS on NAS-Bench-201, 8x8 digits, CPU
  fastnas search --space darts --algorithm gaea-pc-darts --dataset cifar10 --data-dir ~/data \\
      --device cuda --amp bf16 --out runs/pc
  torchrun --nproc_per_node 8 -m fastnas search --device cuda --dataset cifar10 --data-dir ~/data --out runs/ddp
  fastnas search --out runs/demo --resume               # continue from the last checkpoint
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with every error as one line: ``fastnas search: error: ...`` and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Search an architecture with weight sharing (DARTS, GAEA, PC-DARTS, GDAS, RS-WS).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SearchConfig()
    g = p.add_argument_group("what to search")
    g.add_argument("--space", default=d.space, help=f"search space: {', '.join(SPACES)} (default {d.space})")
    g.add_argument("--algorithm", default=d.algorithm, help=f"{', '.join(ALGORITHMS)} (default {d.algorithm})")
    g.add_argument(
        "--mode",
        default=d.mode,
        help=f"{' or '.join(MODES)}: architecture steps on the training "
        f"data or on a held-out part of it (default {d.mode})",
    )
    g.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: 20 (nb201) or 10 (darts) on digits, 50 on CIFAR)"
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch size (default {d.batch_size})")
    g.add_argument("--channels", type=int, default=None, help="initial channels C (default: 8 on digits, 16 on CIFAR)")
    g.add_argument(
        "--cells",
        type=int,
        default=None,
        help="NAS-Bench-201: cells per stage N (1 on digits, 5 on CIFAR); DARTS: layers (5 / 8)",
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help=f"{', '.join(DATASETS)} (default {d.dataset}: bundled with scikit-learn, no download)",
    )
    g.add_argument("--data-dir", default=None, help="folder holding the CIFAR python-pickle release")
    g.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument(
        "--nb201-table",
        default=None,
        help="CSV 'arch,accuracy,...' (or the NAS-Bench-201 file, with nas_201_api) to look the result up",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("how to run")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default cpu; torchrun: one GPU per rank)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    g.add_argument("--amp", default=d.amp, help=f"mixed precision: {', '.join(AMP_MODES)} (default {d.amp})")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 on the tiny digits, where more only add overhead; else torch's)",
    )
    g.add_argument(
        "--accum-steps",
        type=int,
        default=d.accum_steps,
        help="split each batch into this many micro-batches (gradient accumulation)",
    )
    g.add_argument(
        "--limit-batches",
        type=int,
        default=None,
        help="at most this many steps per epoch and batches per evaluation (smoke tests)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (resumably) after this many epochs of this invocation, e.g. for time-limited jobs",
    )
    g = p.add_argument_group("optimisation (defaults follow the papers)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"weights: SGD learning rate (default {d.lr}, cosine)")
    g.add_argument("--lr-min", type=float, default=d.lr_min, help=f"end of the cosine decay (default {d.lr_min})")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"(default {d.momentum})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"gradient-norm clip (default {d.grad_clip})")
    g.add_argument("--arch-lr", type=float, default=None, help="architecture learning rate (GAEA 0.1, DARTS 3e-4)")
    g.add_argument("--arch-weight-decay", type=float, default=None, help="Adam weight decay of the logits (1e-3)")
    g.add_argument("--entropy-weight", type=float, default=None, help="GAEA entropic regulariser weight (0)")
    g.add_argument("--arch-warmup", type=int, default=d.arch_warmup, help="epochs before architecture updates start")
    g.add_argument(
        "--train-portion",
        type=float,
        default=d.train_portion,
        help=f"bilevel: part of the training set for the weights (default {d.train_portion})",
    )
    g.add_argument("--rs-samples", type=int, default=d.rs_samples, help="rs-ws: random architectures scored at the end")
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        space=args.space,
        algorithm=args.algorithm,
        mode=args.mode,
        dataset=args.dataset,
        data_dir=args.data_dir,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        channels=args.channels,
        cells=args.cells,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        resume=args.resume,
        lr=args.lr,
        lr_min=args.lr_min,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        arch_lr=args.arch_lr,
        arch_weight_decay=args.arch_weight_decay,
        entropy_weight=args.entropy_weight,
        arch_warmup=args.arch_warmup,
        train_portion=args.train_portion,
        rs_samples=args.rs_samples,
        accum_steps=args.accum_steps,
        limit_batches=args.limit_batches,
        stop_after=args.stop_after,
        nb201_table=args.nb201_table,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``fastnas search`` with ``argv`` (the arguments after ``search``); return the exit status:
    0 on success, 2 (with one ``fastnas search: error: ...`` line on stderr) on bad input."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        run_search(config_from_args(args))
    except (_UsageError, SearchError) as e:
        message = " ".join(str(e).split())  # one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0
