"""``fastnas train``: the command line of training one architecture (see ``fastnas train --help``)."""

from __future__ import annotations

import argparse

from fastnas.runs import cli, sweep
from fastnas.runs.config import RunError
from fastnas.runs.data import DATASETS
from fastnas.train.archs import ArchsConfig, run_archs
from fastnas.train.loop import run_train
from fastnas.train.recipes import DEFAULT_DATASET, LR_SCHEDULES, RECIPES, TrainConfig

PROG = "fastnas train"

EPILOG = """examples:
  fastnas train --from runs/demo --out runs/demo-train          # the architecture a search found
  fastnas train --arch '|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|'
  fastnas train --arch "$(cat runs/pc/arch.txt)" --dataset cifar10 --data-dir ~/data --device cuda --out runs/pc-train
  torchrun --nproc_per_node 8 -m fastnas train --from runs/pc --dataset cifar10 --data-dir ~/data --device cuda
  fastnas train --out runs/demo-train --resume                  # continue (or extend with --epochs)
  fastnas train --arch-file runs/s --workers 2 --out runs/s-train   # each seed's cell of a sweep, on Ray

  fastnas train --arch "$(cat runs/pc/arch.txt)" --dataset imagenet --data-dir ~/imagenet --device cuda \
      --amp bf16 --out runs/pc-imagenet                       # DARTS's ImageNet recipe (darts-imagenet)

recipes (on the embedded data sets the network, epochs and batch are small):
  darts: 600 epochs, batch 96, SGD 0.025 cosine to 0, momentum 0.9, weight decay 3e-4, clip 5,
         C=36, 20 layers, cutout 16, drop path 0.2, auxiliary weight 0.4
  nb201: 200 epochs, batch 256, SGD 0.1 Nesterov cosine to 0, momentum 0.9, weight decay 5e-4, C=16, N=5
  darts-imagenet (default on imagenet): 250 epochs, batch 128, SGD 0.1 x0.97 per epoch, momentum 0.9,
         weight decay 3e-5, clip 5, label smoothing 0.1, C=48, 14 layers, auxiliary weight 0.4,
         crop 224, colour jitter 0.4,0.4,0.4,0.2
  pc-darts-imagenet: darts-imagenet with batch 1024, SGD 0.5, 5 warm-up epochs, PC-DARTS's linear decay
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog=PROG,
        description="Train one architecture from scratch: DARTS's evaluation network or NAS-Bench-201's.",
        epilog=EPILOG,
    )
    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--arch", help="a DARTS Genotype(...) or a NAS-Bench-201 string |op~0|+|op~0|op~1|+...")
    g.add_argument("--from", dest="from_run", help="a search run's folder: train its arch.txt on its data set")
    g.add_argument(
        "--arch-file",
        help="train many: a file of architectures (one a line), or a search run, sweep over seeds or "
        "ranking run (its top-5); each in --out/arch-<k>, and a summary.json",
    )
    g.add_argument(
        "--recipe", help=f"{', '.join(RECIPES)} (default: the architecture's space, darts-imagenet on imagenet)"
    )
    g = p.add_argument_group("data and output")
    cli.add_data_and_output_flags(
        g, f"{', '.join(DATASETS)} (default: the --from run's, else {DEFAULT_DATASET})", d.out
    )
    cli.add_image_folder_flags(g)
    g = p.add_argument_group("how to run")
    cli.add_running_flags(g, d)
    cli.add_pool_flags(g)
    g = p.add_argument_group("the recipe's values (defaults: the recipe's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size")
    g.add_argument("--channels", type=int, help="initial channels C")
    g.add_argument("--cells", type=int, help="DARTS: layers; NAS-Bench-201: cells per stage N")
    g.add_argument("--lr", type=float, help="SGD learning rate")
    g.add_argument("--lr-schedule", help=f"{', '.join(LR_SCHEDULES)} (cosine: to --lr-min)")
    g.add_argument("--lr-min", type=float, help="end of the cosine schedule")
    g.add_argument("--lr-decay", type=float, help="exponential schedule: the factor per epoch")
    g.add_argument("--warmup-epochs", type=int, help="linear warm-up of the learning rate over these first epochs")
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="gradient-norm clip (0: none)")
    g.add_argument("--cutout", type=int, help="cutout square side in pixels (0: none)")
    g.add_argument("--drop-path", type=float, help="DARTS: drop-path probability reached at the end")
    g.add_argument("--auxiliary-weight", type=float, help="DARTS: weight of the auxiliary head's loss (0: no head)")
    g.add_argument("--label-smoothing", type=float, help="weight of the uniform distribution in the targets")
    g.add_argument("--color-jitter", help="imagenet: brightness,contrast,saturation,hue jitter (0: none)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return cli.to_config(TrainConfig, cli.settings(TrainConfig, args))


def main(argv: list[str] | None = None) -> int:
    """Run ``fastnas train`` with ``argv``; return the exit status (2 with one error line on bad input)."""
    return cli.main(PROG, build_parser(), argv, run)


def run(args: argparse.Namespace) -> dict:
    """One training, or one per architecture (``--arch-file``, or ``--resume`` of such a sweep)."""
    pool = sweep.pool_from_args(args)
    if "arch_file" in args or cli.resumed_sweep(args, ArchsConfig().out) == "archs":
        return run_archs(cli.to_config(ArchsConfig, cli.settings(ArchsConfig, args)), pool)
    if pool.uses_ray:
        raise RunError("--workers and --ray-address train many architectures: give --arch-file")
    return run_train(config_from_args(args))
