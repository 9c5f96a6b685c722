"""A run's output folder: who owns it, what it holds, and what a command may do with it.

Every command claims its ``--out`` folder before writing anything (:func:`claim`):

* **an owner**: an exclusive OS lock on ``.fastnas.lock`` in the folder, held for the whole run and
  released by the kernel on any exit (a killed process leaves no stale lock), so two processes never
  write one folder (the second gets "runs/x is in use by pid N");
* **a kind**: ``config.json`` names the command that made the folder (``"command": "search"``), for a
  sweep of many runs which sweep (``"sweep": "seeds"``: ``search --seeds``; ``"archs"``: ``train
  --arch-file``), and for the parts of a ranking run or a sweep (``supernet/``, ``standalone/<k>/``,
  ``seed-<s>/``, ``arch-<k>/``) which part it is. A command refuses a folder of another kind, or a part
  it was not asked to continue (the command that owns it continues it), and names what it found;
* **resume rules**: ``--resume`` of a folder whose run wrote its settings but no checkpoint (killed in
  its first epoch) starts that run from epoch 0 with those settings; of a finished run it does nothing
  and says so; without ``--resume`` a folder holding a run is refused;
* **nothing partial survives**: temporary files of earlier processes are removed when a run claims the
  folder, and a run that fails before its first checkpoint removes what it wrote (a folder it made
  included), so the corrected command can start afresh.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastnas.runs.config import RunError, read_config_json

LOCK_FILE = ".fastnas.lock"
COMMANDS = ("search", "train", "rank")
WHAT = {"search": "search run", "train": "training run", "rank": "ranking run"}
SWEEPS = {"seeds": "sweep of searches over seeds", "archs": "sweep of trainings of many architectures"}


@dataclass(frozen=True)
class Part:
    """A part of a run of ``command`` (of its ``sweep``, if any), whose folder lies ``depth`` levels below
    the run's: what it is (``name``) and what owns it (``owner``), for messages."""

    name: str
    owner: str
    command: str
    sweep: str | None
    depth: int


PARTS = {
    "supernet": Part("the supernet", "a ranking run", "rank", None, 1),
    "standalone": Part("a standalone training", "a ranking run", "rank", None, 2),
    "seed": Part("a search", "a sweep over seeds", "search", "seeds", 1),
    "arch": Part("a training", "a sweep of many architectures", "train", "archs", 1),
}
_TEMPORARY = re.compile(r".+\.tmp\.\d+$")  # checkpoint.atomic_write_bytes's temporary files


@dataclass
class Contents:
    """What a folder holds: the ``command`` of its run (None: no run), which ``sweep`` it is (None: one
    run), which ``part`` of a ranking run or sweep it is, its settings (``config``), and whether it has
    a checkpoint and a final result."""

    command: str | None = None
    part: str | None = None
    config: dict[str, Any] | None = None
    checkpoint: bool = False
    finished: bool = False
    files: list[str] = field(default_factory=list)
    sweep: str | None = None

    def describe(self) -> str:
        """``a search run (finished)``, ``the supernet of a ranking run``, ... for messages."""
        if self.part in PARTS:
            what = f"{PARTS[self.part].name} of {PARTS[self.part].owner}"
        else:
            what = f"a {SWEEPS.get(self.sweep) or WHAT.get(self.command, 'run')}"
        if self.finished:
            state = "finished"
        elif self.checkpoint or self.command == "rank" or self.sweep:
            state = "unfinished"
        else:
            state = "begun, without a checkpoint"
        return f"{what} ({state})"


def _infer_command(config: dict[str, Any]) -> str | None:
    """The command of a ``config.json`` written before folders named it, from its settings."""
    if "count" in config and "bn_batches" in config:
        return "rank"
    if "recipe" in config or "cutout" in config:
        return "train"
    if "algorithm" in config and "rs_samples" in config:
        return "search"
    return None


def _checkpoint_command(path: str) -> str:
    """The command whose checkpoint ``path`` is (``unknown`` when it is none of fastnas's)."""
    import torch

    try:
        fmt = torch.load(path, map_location="cpu", weights_only=True).get("format", "")
    except Exception:  # unreadable, truncated, not a torch file, not a dict
        return "unknown"
    return next((c for c in ("search", "train") if fmt.startswith(f"fastnas-{c}-checkpoint")), "unknown")


def read_json(path: str) -> Any:
    """The JSON in ``path``; RunError naming it when it is unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"corrupt {path}: {e}") from None


def contents(out: str) -> Contents:
    """What ``out`` holds (nothing, for a missing folder); RunError for a corrupt ``config.json``."""
    if not os.path.isdir(out):
        return Contents()
    files = sorted(os.listdir(out))
    found = Contents(files=files, checkpoint="checkpoint.pt" in files)
    config = read_config_json(out)
    if config is not None:
        found.config = config
        found.command = config.get("command") or _infer_command(config)
        found.part = config.get("part")
        found.sweep = config.get("sweep")
    elif {"shared.json", "supernet", "standalone"} & set(files):
        found.command = "rank"
    elif found.checkpoint:
        found.command = _checkpoint_command(os.path.join(out, "checkpoint.pt"))
    final = "summary.json" if found.sweep else "result.json"
    if final in files:
        result = read_json(os.path.join(out, final))
        found.finished = isinstance(result, dict) and bool(result.get("finished"))
    return found


def check_path(out: str) -> None:
    """``out`` can name a folder: not empty, not a file, no file on the way to it."""
    if not out or not out.strip():
        raise RunError("--out must name a folder, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise RunError(f"--out {out}: {parent} is a file, not a folder")


def owner_folder(out: str, part: str) -> str:
    """The folder of the run that ``out``, its ``part``, belongs to: ``R`` of ``R/supernet``,
    ``R/standalone/<k>``, ``R/seed-<s>``, ``R/arch-<k>``."""
    path = os.path.normpath(out)
    for _ in range(PARTS[part].depth):
        path = os.path.dirname(path)
    return path


@dataclass
class Decision:
    """What :func:`decide` allows: a fresh run, or a resumption (``checkpoint``: from it, else from
    epoch 0 with the folder's settings; ``finished``: the run is done)."""

    resume: bool
    checkpoint: bool = False
    finished: bool = False


def decide(
    out: str, found: Contents, command: str, resume: bool, part: str | None = None, sweep: str | None = None
) -> Decision:
    """Whether ``command`` (as ``part`` of a ranking run or sweep, as the ``sweep`` itself, or as one
    run) may run in ``out``, which holds ``found``; RunError naming what the folder holds otherwise."""
    if found.command is None:
        if resume:
            raise RunError(f"nothing to resume: {out} holds no run")
        return Decision(resume=False)
    asked = f"a {SWEEPS[sweep]}" if sweep else f"a {WHAT[command]}"
    if found.command != command:
        if found.command == "unknown":
            raise RunError(f"--out {out} holds a checkpoint.pt of no fastnas run; choose another --out")
        raise RunError(f"--out {out} holds {found.describe()}, not {asked}; choose another --out")
    if found.part != part:
        if found.part in PARTS:
            owner = owner_folder(out, found.part)
            again = f"fastnas {PARTS[found.part].command} --out {owner} --resume"
            raise RunError(f"--out {out} is {found.describe()} in {owner}: continue it with {again}")
        raise RunError(f"{out} holds {found.describe()}, not a part of a ranking run or sweep")
    if found.sweep != sweep:
        raise RunError(f"--out {out} holds {found.describe()}, not {asked}; choose another --out")
    if not resume:
        again = "pass --resume to continue it" if not found.finished else "pass --resume --epochs N to extend it"
        if not found.checkpoint and not found.finished and command != "rank" and not sweep:
            again = "pass --resume to start it again with its settings"
        whole = command == "rank" or sweep  # resumed as a whole; a finished one is not extended
        again = "choose another --out" if found.finished and whole else f"{again} or choose another --out"
        raise RunError(f"--out {out} already holds {found.describe()}; {again}")
    return Decision(resume=True, checkpoint=found.checkpoint, finished=found.finished)


class RunFolder:
    """A claimed output folder (see :func:`claim`): the lock, and what this process wrote there."""

    def __init__(self, out: str, decision: Decision, created: list[str], before: list[str]) -> None:
        self.out = out
        self.decision = decision
        self._created = created  # folders this claim made, outermost first
        self._before = set(before)  # what the folder held when it was claimed
        self._lock_fd: int | None = None

    def lock(self) -> None:
        path = os.path.join(self.out, LOCK_FILE)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunError(f"cannot write in --out {self.out}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise RunError(f"cannot lock --out {self.out}: {e.strerror}") from None
                raise RunError(f"{self.out} is in use by {owner_of(self.out) or 'another process'}") from None
            # another process may have removed the file between our open and our lock: lock the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise RunError(f"cannot write in --out {self.out}: {e.strerror}") from None
        self._lock_fd = fd

    def remove_temporary_files(self) -> None:
        """Temporary files a killed process left (no live process writes here: we hold the lock)."""
        for dirpath, _, files in os.walk(self.out):
            for name in files:
                if _TEMPORARY.match(name):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(dirpath, name))

    def discard(self) -> None:
        """Remove what a run that never reached its first checkpoint wrote (what the folder held when
        it was claimed stays), so the command can start afresh."""
        for name in os.listdir(self.out):
            if name in self._before or name == LOCK_FILE:
                continue
            path = os.path.join(self.out, name)
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)

    def release(self, failed_fresh: bool) -> None:
        """Drop the lock and its file (removed before it is unlocked, so that nobody can lock a file
        about to vanish); after a fresh run that failed before its first checkpoint, also the folders
        this claim made, when they are empty."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.out, LOCK_FILE))
            os.close(self._lock_fd)
            self._lock_fd = None
        if failed_fresh:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def owner_of(out: str) -> str | None:
    """``pid N`` of the process holding ``out``'s lock, or None when nobody holds it."""
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return f"pid {pid}" if pid.isdigit() else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _make_folder(out: str) -> list[str]:
    """Make ``out`` and its missing parents; return the folders made, outermost first."""
    missing = []
    path = os.path.abspath(out)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot make --out {out}: {e.strerror}") from None
    return list(reversed(missing))


@contextlib.contextmanager
def claim(
    out: str, command: str, resume: bool, part: str | None = None, lock: bool = True, sweep: str | None = None
) -> Iterator[RunFolder]:
    """Own ``out`` for a run of ``command`` for the body (see the module docstring): check the path,
    lock the folder (``lock=False``: only look, for the ranks of a torchrun job other than 0), check
    what it holds against ``command``, ``resume``, ``part`` and ``sweep``, and remove temporary files left by
    killed processes. RunError, with the folder left as it was, when the run may not go there. A fresh
    run whose body fails before any checkpoint is written leaves nothing behind."""
    check_path(out)
    if not lock:  # rank 0 of the job checks and owns the folder; before the first epoch it writes no checkpoint
        has_checkpoint = resume and os.path.isfile(os.path.join(out, "checkpoint.pt"))
        yield RunFolder(out, Decision(resume=resume, checkpoint=has_checkpoint), [], [])
        return
    created = _make_folder(out)
    folder = RunFolder(out, Decision(resume=False), created, [])
    try:
        folder.lock()
        found = contents(out)
        folder._before = set(found.files)
        folder.decision = decide(out, found, command, resume, part, sweep)
    except BaseException:
        folder.release(failed_fresh=True)
        raise
    folder.remove_temporary_files()
    failed_fresh = False
    try:
        yield folder
    except KeyboardInterrupt:  # the user stops it: what was written stays, to be resumed
        raise
    except BaseException:
        if not folder.decision.resume and not started(out):
            folder.discard()
            failed_fresh = True
        raise
    finally:
        folder.release(failed_fresh)


def started(out: str) -> bool:
    """Whether the run in ``out`` got anywhere: a checkpoint, a ranking run's shared-weight accuracies,
    or a part with a checkpoint."""
    for dirpath, _, files in os.walk(out):
        if "checkpoint.pt" in files or ("shared.json" in files and dirpath == out):
            return True
    return False


def unfinished_note(out: str, found: Contents | None = None) -> str | None:
    """``runs/x is unfinished (after epoch 3 of 40, still running as pid N)``, or None for a finished run."""
    found = contents(out) if found is None else found
    if found.finished:
        return None
    history = os.path.join(out, "history.json")
    done = len(read_json(history)) if os.path.isfile(history) else 0
    total = (found.config or {}).get("epochs")
    owner = owner_of(out)
    return (
        f"{out} is unfinished (after epoch {done}" + (f" of {total}" if total else "")
        + (f", still running as {owner}" if owner else "") + ")"
    )  # fmt: skip
