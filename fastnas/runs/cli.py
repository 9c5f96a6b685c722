"""What the command lines share: one-line errors with exit status 2, the flags of every run.

Parsers built here leave out every flag the user did not give (``argparse.SUPPRESS``), so a command
knows which settings were asked for: the config's defaults fill the rest, and ``--resume`` takes
them from the run's ``config.json`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable

from fastnas.runs.config import AMP_MODES, RunError, check_setting_types, flag, setting_names
from fastnas.runs.distributed import Dist
from fastnas.runs.folder import contents, decide, owner_of


class UsageError(Exception):
    """A command line argparse refuses."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with every error raised as :class:`UsageError` (printed as one line by :func:`main`)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(argument_default=argparse.SUPPRESS, **kwargs)
        add_version_flag(self)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line asked for, by config field name."""
    out = dict(vars(args))
    if out.pop("no_progress", False):
        out["progress"] = False
    return out


# settings of a run's config.json that do not carry over to its resumption
NOT_CARRIED = ("out", "resume", "stop_after", "progress", "part")


def settings(config_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the run the command line asks for. With ``--resume``, those of the run's
    ``config.json``, overridden by the flags given; a given flag that would change what the run
    computes (a field outside ``config_cls._RESUME_FREE``) and differs from ``config.json`` is refused,
    and so is a folder that holds no run of this command (:func:`fastnas.runs.folder.decide`)."""
    asked = given(args)
    if not asked.get("resume"):
        return asked
    out = asked.get("out", config_cls().out)
    owner = owner_of(out) if Dist().is_main else None  # torchrun: rank 0 may hold it already
    if owner is not None:  # another process is writing it: its files are not yet what a resumption reads
        raise RunError(f"{out} is in use by {owner}")
    found = contents(out)
    decide(out, found, config_cls.COMMAND, resume=True, sweep=config_cls.SWEEP)
    saved = found.config
    if saved is None:  # no config.json: the checkpoint alone says whether the flags fit
        return asked
    check_setting_types(config_cls, saved, os.path.join(out, "config.json"))
    for name in setting_names(config_cls):
        if name in asked and name in saved and name not in config_cls._RESUME_FREE and asked[name] != saved[name]:
            raise RunError(
                f"{out} is from another run: {name} = {saved[name]!r} there, {asked[name]!r} here; "
                f"resume without {flag(name)} or choose another --out"
            )
    names = {f.name for f in dataclasses.fields(config_cls)}
    merged = {k: v for k, v in saved.items() if k in names and k not in NOT_CARRIED}
    merged.update(asked)
    return merged


def to_config(config_cls: type, settings: dict[str, Any]) -> Any:
    """``config_cls(**settings)``; ``progress`` only where stderr is a terminal."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in settings.items() if k in names})
    if not sys.stderr.isatty():
        cfg = dataclasses.replace(cfg, progress=False)
    return cfg


def add_data_and_output_flags(g: argparse._ArgumentGroup, dataset_help: str, default_out: str) -> None:
    """--dataset, --data-dir, --out, --resume, --no-progress."""
    g.add_argument("--dataset", help=dataset_help)
    g.add_argument(
        "--data-dir", help="folder holding the data set: CIFAR's or ImageNet16's pickles, or imagenet's train/ and val/"
    )
    g.add_argument("--out", help=f"output directory (default {default_out})")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with the settings of its config.json",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_image_folder_flags(g: argparse._ArgumentGroup) -> None:
    """--crop-size, --loader-workers: how an image folder (--dataset imagenet) is read."""
    g.add_argument("--crop-size", type=int, help="imagenet: training crop and evaluation centre crop (default 224)")
    g.add_argument(
        "--loader-workers",
        type=int,
        help="imagenet: loader processes decoding images (default: the CPUs less one, at most 8)",
    )


def add_running_flags(g: argparse._ArgumentGroup, d: Any) -> None:
    """--device, --seed, --amp, --threads, --compile, --cuda-graphs, --accum-steps, --limit-batches, --stop-after."""
    g.add_argument("--device", help="cpu, cuda or cuda:N (default cpu; torchrun: one GPU per rank)")
    g.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    g.add_argument("--amp", help=f"mixed precision: {', '.join(AMP_MODES)} (default {d.amp}; fp16 needs CUDA)")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: 1 on the tiny embedded data sets, where more only add overhead; else torch's)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the network: a supernet each kind of cell once (every op computed), "
        "any other network whole (default off)",
    )
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="CUDA, one process: replay each kind of training step as a captured CUDA graph (default off)",
    )
    g.add_argument("--accum-steps", type=int, help="split each batch into this many micro-batches")
    g.add_argument(
        "--limit-batches", type=int, help="at most this many steps per epoch and batches per evaluation (smoke tests)"
    )
    g.add_argument(
        "--stop-after",
        type=int,
        help="stop (resumably) after this many epochs of this invocation, e.g. for time-limited jobs",
    )


def add_pool_flags(g: argparse._ArgumentGroup) -> None:
    """--workers, --ray-address (fastnas.runs.sweep)."""
    g.add_argument(
        "--workers",
        type=int,
        help="run the independent runs on a local Ray, this many at once, each with its share of the "
        "GPUs or CPUs (needs pip install -e '.[ray]'; default: one after another in this process)",
    )
    g.add_argument(
        "--ray-address",
        help="run them on the Ray cluster at this address (default: $RAY_ADDRESS); --out and --data-dir "
        "must be on a file system every node sees",
    )


def resumed_sweep(args: argparse.Namespace, default_out: str) -> str | None:
    """The sweep (``seeds``, ``archs``) held by the folder a ``--resume`` names; None otherwise."""
    if not getattr(args, "resume", False):
        return None
    return contents(getattr(args, "out", default_out)).sweep


def add_version_flag(p: argparse.ArgumentParser) -> None:
    from fastnas import __version__

    p.add_argument("--version", action="version", version=f"fastnas {__version__}")


def main(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[Any], Any]) -> int:
    """Parse ``argv`` and call ``run(args)``; return the exit status: 0 on success, 2 (with one
    ``<prog>: error: ...`` line on stderr) on bad input or a file system that refuses a write, 130 on
    Ctrl-C."""
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return int(e.code or 0)
        run(args)
    except (UsageError, RunError, OSError) as e:
        if isinstance(e, OSError):  # a read or write the checks could not foresee (a disk that fills up)
            e = RunError(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        message = " ".join(str(e).split())  # one line
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0
