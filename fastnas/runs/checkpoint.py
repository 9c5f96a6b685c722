"""Checkpoint files: atomic writes, the global generators' states, loading and checking a checkpoint.

Every file of a run is written atomically (a temporary file in the same folder, flushed and synced,
then ``os.replace``), so a run killed at any moment leaves either the old or the new file, never a
truncated one. A write that fails (a full disk, a read-only folder) removes its temporary file,
leaves the old file as it was, and raises :class:`RunError` with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from typing import Any

import numpy as np
import torch

from fastnas.runs.config import RunError


def atomic_write_bytes(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise RunError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def atomic_write_json(path: str, value: Any) -> None:
    """``value`` as JSON, non-finite numbers written as ``null``."""
    atomic_write_text(path, json.dumps(finite_json(value), indent=1, allow_nan=False))


def atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    """The global generators' states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def load_checkpoint(path: str, fmt: str, what: str) -> dict[str, Any]:
    """The checkpoint at ``path``, which must have ``format == fmt``; RunError otherwise (``what``
    names the kind of checkpoint in the message, e.g. "fastnas search checkpoint")."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, not a torch file, or holding objects of no checkpoint
        raise RunError(f"corrupt checkpoint {path}: fastnas cannot read it ({type(e).__name__})") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != fmt:
        kinds = {"search": "search", "train": "training"}
        kind = next(
            (f"a fastnas {w} checkpoint" for c, w in kinds.items() if str(found).startswith(f"fastnas-{c}-")), None
        )
        raise RunError(
            f"checkpoint {path} is {kind}, not a {what}" if kind else f"corrupt checkpoint {path}: not a {what}"
        )
    return ckpt


def check_resumable(ckpt: dict[str, Any], run_defining: dict[str, Any], path: str) -> None:
    """The checkpoint was written by a run with the same ``run_defining`` settings."""
    saved = ckpt.get("config", {})
    for key, value in run_defining.items():
        if key in saved and saved[key] != value:
            raise RunError(f"checkpoint {path} is from another run: {key} = {saved[key]!r} there, {value!r} here")
    missing = [k for k in run_defining if k not in saved]
    if missing:
        raise RunError(f"checkpoint {path} is from another run: it lacks {missing[0]}")
