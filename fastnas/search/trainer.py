"""The search loop: data, steps, checkpoints, history, plot, resume and DistributedDataParallel.

:func:`run_search` runs one search described by a :class:`SearchConfig` and writes, in
``config.out``:

* ``arch.txt``: the architecture found (DARTS genotype or NAS-Bench-201 string);
* ``history.json``: one record per epoch (losses, accuracies, entropy, images/s, weights, ...);
* ``checkpoint.pt``: everything needed to continue, written atomically (temporary file, then
  ``os.replace``) after every epoch;
* ``arch_weights.png``: the architecture weights over the epochs;
* ``config.json`` and ``result.json`` (the final summary).

Distributed runs (``torchrun``) are detected from the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``): NCCL on CUDA devices, gloo on CPU. ``batch_size`` is the *global* batch: every
rank takes its slice of the same seeded global batch. Network weights are synchronised by DDP;
architecture parameters are kept out of DDP and their gradients all-reduced by hand, so every rank
applies the same architecture update; GDAS/RS-WS samples come from ``net.generator``, seeded alike
on every rank. At every epoch's end the ranks compare their architecture parameters bit for bit
and stop with an error if they differ. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.search import data as data_mod
from fastnas.search.algorithms import MODES, Algorithm, get_algorithm, gumbel_tau, make_arch_optimizer

SPACES = ("nb201", "darts")
AMP_MODES = ("none", "bf16", "fp16")
CHECKPOINT_FORMAT = "fastnas-search-checkpoint/1"
RUN_FILES = ("config.json", "checkpoint.pt", "history.json", "arch.txt", "result.json", "arch_weights.png")

# per-data-set defaults of the network size and the epochs (paper sizes for CIFAR)
_DATASET_DEFAULTS: dict[str, dict[str, dict[str, int]]] = {
    "digits": {"nb201": dict(channels=8, cells=1, epochs=20), "darts": dict(channels=8, cells=5, epochs=10)},
    "cifar10": {"nb201": dict(channels=16, cells=5, epochs=50), "darts": dict(channels=16, cells=8, epochs=50)},
}
_DATASET_DEFAULTS["cifar100"] = _DATASET_DEFAULTS["cifar10"]


class SearchError(Exception):
    """Bad input to a search (unknown name, missing or corrupt data or checkpoint, occupied output
    directory, ...). The message is one line, meant for the user."""


@dataclass
class SearchConfig:
    """Everything that defines a search run. ``None`` fields take the algorithm's or data set's default."""

    space: str = "nb201"
    algorithm: str = "gaea-darts"
    mode: str = "bilevel"
    dataset: str = "digits"
    data_dir: str | None = None
    out: str = "runs/search"
    epochs: int | None = None
    batch_size: int = 64
    channels: int | None = None
    cells: int | None = None
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    resume: bool = False
    # network weights: SGD with cosine decay (DARTS)
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    # architecture
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    entropy_weight: float | None = None
    arch_warmup: int = 0
    train_portion: float = 0.5
    rs_samples: int = 20
    # batching and bookkeeping
    accum_steps: int = 1
    limit_batches: int | None = None
    stop_after: int | None = None
    nb201_table: str | None = None
    threads: int | None = None
    progress: bool = True
    log: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    # fields that may differ between a run and its resumption
    _RESUME_FREE = ("out", "device", "resume", "stop_after", "nb201_table", "threads", "progress", "data_dir", "log")

    def run_defining(self) -> dict[str, Any]:
        """The fields a checkpoint must agree with to be resumed by this config."""
        return {k: v for k, v in self.as_dict().items() if k not in self._RESUME_FREE}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "log"}


# --------------------------------------------------------------------------- validation


def _resolve(cfg: SearchConfig) -> tuple[SearchConfig, Algorithm]:
    """Check every field and fill in the defaults; SearchError with one line otherwise."""
    if cfg.space not in SPACES:
        raise SearchError(f"unknown space {cfg.space!r}; choose one of {', '.join(SPACES)}")
    try:
        alg = get_algorithm(cfg.algorithm)
    except ValueError as e:
        raise SearchError(str(e)) from None
    if cfg.space not in alg.spaces:
        raise SearchError(f"algorithm {alg.name} needs --space {' or '.join(alg.spaces)}, not {cfg.space}")
    if cfg.mode not in MODES:
        raise SearchError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if alg.second_order and cfg.mode != "bilevel":
        raise SearchError(f"algorithm {alg.name} (second order) needs --mode bilevel")
    if cfg.dataset not in data_mod.DATASETS:
        raise SearchError(f"unknown data set {cfg.dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
    if cfg.amp not in AMP_MODES:
        raise SearchError(f"unknown --amp {cfg.amp!r}; choose one of {', '.join(AMP_MODES)}")
    if alg.second_order and cfg.amp == "fp16":
        raise SearchError(
            f"algorithm {alg.name} (second order) does not support --amp fp16: its unrolled step runs "
            "without loss scaling; use --amp bf16 or none"
        )
    defaults = _DATASET_DEFAULTS[cfg.dataset][cfg.space]
    cfg = dataclasses.replace(
        cfg,
        epochs=defaults["epochs"] if cfg.epochs is None else cfg.epochs,
        channels=defaults["channels"] if cfg.channels is None else cfg.channels,
        cells=defaults["cells"] if cfg.cells is None else cfg.cells,
    )
    for name in ("epochs", "batch_size", "channels", "cells", "accum_steps", "rs_samples"):
        if int(getattr(cfg, name)) < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("limit_batches", "stop_after", "threads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.arch_warmup < 0:
        raise SearchError(f"--arch-warmup must be >= 0, got {cfg.arch_warmup}")
    if not 0.0 < cfg.train_portion < 1.0:
        raise SearchError(f"--train-portion must lie in (0, 1), got {cfg.train_portion}")
    for name in ("lr", "lr_min", "momentum", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise SearchError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(cfg, name)}")
    for name in ("arch_lr", "arch_weight_decay", "entropy_weight"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise SearchError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if alg.arch_optimizer == "gaea":
        lr = alg.arch_lr if cfg.arch_lr is None else cfg.arch_lr
        lam = alg.entropy_weight if cfg.entropy_weight is None else cfg.entropy_weight
        if lr * lam >= 1.0:
            raise SearchError(f"--arch-lr times --entropy-weight must be below 1 for GAEA, got {lr} * {lam}")
    if cfg.space == "darts" and cfg.cells < 3:
        raise SearchError(f"--cells (layers) of the darts space must be at least 3, got {cfg.cells}")
    if cfg.nb201_table is not None and cfg.space != "nb201":
        raise SearchError("--nb201-table needs --space nb201")
    return cfg, alg


def _check_out_dir(cfg: SearchConfig) -> None:
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise SearchError(f"--out {out} exists and is not a directory")
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if cfg.resume:
        if not os.path.isfile(os.path.join(out, "checkpoint.pt")):
            raise SearchError(f"nothing to resume: {out} holds no checkpoint.pt")
    elif present:
        raise SearchError(
            f"--out {out} already holds a search run ({present[0]}); "
            "pass --resume to continue it or choose another --out"
        )


def _device(cfg: SearchConfig, local_rank: int, world: int) -> torch.device:
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise SearchError(f"unknown --device {cfg.device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SearchError(f"--device {cfg.device}: CUDA is not available here")
        if world > 1:
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise SearchError(f"--device {dev}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise SearchError(f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    return dev


# --------------------------------------------------------------------------- small helpers


def build_network(
    cfg: SearchConfig, alg: Algorithm, num_classes: int, in_channels: int, sampler: Any = "alg"
) -> nn.Module:
    """The supernet of ``cfg.space`` in the parametrisation of ``alg`` (``sampler`` overrides its sampler)."""
    sampler = alg.sampler if sampler == "alg" else sampler
    if cfg.space == "nb201":
        from fastnas.spaces import nb201

        return nb201.Network(
            C=cfg.channels,
            N=cfg.cells,
            num_classes=num_classes,
            in_channels=in_channels,
            arch=alg.arch,
            sampler=sampler,
        )
    from fastnas.spaces import darts

    return darts.Network(
        C=cfg.channels,
        num_classes=num_classes,
        layers=cfg.cells,
        in_channels=in_channels,
        arch=alg.arch,
        sampler=sampler,
        partial_channels=alg.partial_channels,
    )


def row_entropy(weights: dict[str, Tensor]) -> dict[str, float]:
    """Mean entropy (nats) of the rows of each weight matrix (rows summing to 1)."""
    out = {}
    for name, w in weights.items():
        w = w.detach().double().clamp_min(1e-30)
        out[name] = float(-(w * w.log()).sum(-1).mean())
    return out


def _atomic_write_bytes(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _rng_state() -> dict[str, Any]:
    """The global generators' states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, not a torch file
        raise SearchError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SearchError(f"corrupt checkpoint {path}: not a fastnas search checkpoint")
    return ckpt


def _check_resumable(ckpt: dict[str, Any], cfg: SearchConfig, path: str) -> None:
    saved = ckpt.get("config", {})
    mine = cfg.run_defining()
    for key, value in mine.items():
        if key in saved and saved[key] != value:
            raise SearchError(f"checkpoint {path} is from another run: {key} = {saved[key]!r} there, {value!r} here")
    missing = [k for k in mine if k not in saved]
    if missing:
        raise SearchError(f"checkpoint {path} is from another run: it lacks {missing[0]}")


def load_nb201_table(path: str) -> Callable[[str], dict[str, float] | None]:
    """A lookup ``arch string -> {column: value}`` from a CSV (header row; the first column holds
    architecture strings, the others numbers), or from the official NAS-Bench-201 file through
    ``nas_201_api`` when that package is installed and ``path`` is not a CSV."""
    if not os.path.isfile(path):
        raise SearchError(f"--nb201-table {path} does not exist")
    if path.endswith(".csv") or path.endswith(".txt"):
        import csv

        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SearchError(f"--nb201-table {path} is not a readable CSV: {e}") from None
        if len(rows) < 2 or len(rows[0]) < 2:
            raise SearchError(f"--nb201-table {path} needs a header and rows of 'arch,accuracy,...'")
        header = rows[0]
        table: dict[str, dict[str, float]] = {}
        for i, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise SearchError(f"--nb201-table {path} line {i}: {len(row)} fields, header has {len(header)}")
            try:
                table[row[0].strip()] = {h: float(v) for h, v in zip(header[1:], row[1:])}
            except ValueError:
                raise SearchError(f"--nb201-table {path} line {i}: non-numeric accuracy") from None
        return table.get
    try:
        from nas_201_api import NASBench201API  # optional
    except ImportError:
        raise SearchError(f"--nb201-table {path} is not a .csv and nas_201_api is not installed") from None
    try:
        api = NASBench201API(path, verbose=False)
    except Exception as e:
        raise SearchError(f"--nb201-table {path}: the NAS-Bench-201 API cannot read it ({type(e).__name__})") from None

    def lookup(arch: str) -> dict[str, float] | None:
        index = api.query_index_by_arch(arch)
        if index < 0:
            return None
        out = {}
        for name in ("cifar10", "cifar100", "ImageNet16-120"):
            info = api.get_more_info(index, name, hp="200", is_random=False)
            out[f"{name}_test_acc"] = float(info.get("test-accuracy", float("nan")))
        return out

    return lookup


# --------------------------------------------------------------------------- the search


class _Dist:
    """Who we are in a torchrun job (world 1 when not distributed)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = False

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.active = True

    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def check_same(self, tensors: list[Tensor], what: str) -> None:
        """Raise if the ranks' ``tensors`` differ in any bit."""
        if not self.active:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        for r, g in enumerate(gathered):
            if not torch.equal(g, gathered[0]):
                raise RuntimeError(f"{what} differ between rank 0 and rank {r}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Run the search ``cfg`` describes; return the summary also written to ``result.json``.

    Raises :class:`SearchError` (before writing anything) for bad input.
    """
    cfg, alg = _resolve(cfg)
    ddp = _Dist()
    if cfg.batch_size % (ddp.world * cfg.accum_steps) != 0:
        raise SearchError(
            f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({ddp.world}) "
            f"times --accum-steps ({cfg.accum_steps})"
        )
    _check_out_dir(cfg)
    device = _device(cfg, ddp.local_rank, ddp.world)
    if cfg.amp == "fp16" and device.type == "cpu":
        raise SearchError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    try:
        data = data_mod.load_dataset(cfg.dataset, cfg.data_dir)
    except data_mod.DataError as e:
        raise SearchError(str(e)) from None
    table = load_nb201_table(cfg.nb201_table) if cfg.nb201_table else None
    ckpt = None
    if cfg.resume:
        ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        ckpt = _load_checkpoint(ckpt_path)
        _check_resumable(ckpt, cfg, ckpt_path)
    w_idx, a_idx = data_mod.search_split(len(data.y_train), cfg.mode, cfg.train_portion)
    if len(w_idx) < cfg.batch_size or len(a_idx) < cfg.batch_size:
        raise SearchError(
            f"--batch-size {cfg.batch_size} exceeds the {min(len(w_idx), len(a_idx))} images of a "
            f"{cfg.mode} split of {cfg.dataset}"
        )

    threads_before = torch.get_num_threads()
    threads = cfg.threads or (1 if cfg.dataset == "digits" else None)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    ddp.init(device)
    try:
        result = _Search(cfg, alg, ddp, device, data, w_idx, a_idx, table, ckpt).run()
        # every rank finishes before any tears its connections down: without this, a rank that left
        # first sometimes made another abort in gloo's teardown ("terminate called without an active
        # exception", about 1 run in 6 of tests/test_search_distributed.py on a 2-core machine)
        ddp.barrier()
        return result
    finally:
        torch.set_num_threads(threads_before)
        if ddp.active:
            dist.destroy_process_group()


class _Search:
    def __init__(self, cfg, alg, ddp, device, data, w_idx, a_idx, table, ckpt) -> None:
        self.cfg, self.alg, self.ddp, self.device = cfg, alg, ddp, device
        self.data = data.to(device)
        self.w_idx, self.a_idx = w_idx, a_idx
        self.table = table
        self.is_main = ddp.rank == 0
        self.log = cfg.log or (lambda s: print(s, flush=True))

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self.net = build_network(cfg, alg, data.num_classes, data.in_channels).to(device)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.net.generator = self.generator
        self.arch_params = list(self.net.arch_parameters())
        self.weight_params = list(self.net.weight_parameters())
        self.model: nn.Module = self.net
        if ddp.active:
            # DDP registers only the parameters that require grad when it is built: the architecture
            # parameters stay out of its buckets (their gradients are all-reduced by hand)
            for p in self.arch_params:
                p.requires_grad_(False)
            self.model = nn.parallel.DistributedDataParallel(
                self.net,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=alg.sampler is not None,
            )
            for p in self.arch_params:
                p.requires_grad_(True)
        self.w_opt = torch.optim.SGD(
            self.weight_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=cfg.epochs, eta_min=cfg.lr_min)
        self.a_opt = make_arch_optimizer(alg, self.net, cfg.arch_lr, cfg.arch_weight_decay, cfg.entropy_weight)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        use_scaler = cfg.amp == "fp16"
        self.w_scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.a_scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if ckpt is not None:
            self._restore(ckpt)

    # ------------------------------------------------------------------ state

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.run_defining(),
            "epoch": epoch,
            "model": self.net.state_dict(),
            "weight_optimizer": self.w_opt.state_dict(),
            "arch_optimizer": self.a_opt.state_dict() if self.a_opt is not None else None,
            "scheduler": self.sched.state_dict(),
            "weight_scaler": self.w_scaler.state_dict(),
            "arch_scaler": self.a_scaler.state_dict(),
            "rng": _rng_state(),
            "sampler_rng": self.generator.get_state(),
            "history": self.history,
            "arch": self.net.export(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        path = os.path.join(self.cfg.out, "checkpoint.pt")
        try:
            self.net.load_state_dict(ckpt["model"])
            self.w_opt.load_state_dict(ckpt["weight_optimizer"])
            if self.a_opt is not None:
                self.a_opt.load_state_dict(ckpt["arch_optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.w_scaler.load_state_dict(ckpt["weight_scaler"])
            self.a_scaler.load_state_dict(ckpt["arch_scaler"])
            _set_rng_state(ckpt["rng"])
            self.generator.set_state(ckpt["sampler_rng"])
            self.history = list(ckpt["history"])
            self.start_epoch = int(ckpt["epoch"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise SearchError(f"checkpoint {path} does not fit this run: {str(e).splitlines()[0]}") from None

    def _save(self, epoch: int) -> None:
        if not self.is_main:
            return
        out = self.cfg.out
        _atomic_torch_save(self._state(epoch), os.path.join(out, "checkpoint.pt"))
        _atomic_write_text(os.path.join(out, "history.json"), json.dumps(self.history, indent=1))
        _atomic_write_text(os.path.join(out, "arch.txt"), self.net.export() + "\n")

    # ------------------------------------------------------------------ batches

    def _micro_batches(self, idx: Tensor, gen: torch.Generator | None) -> list[tuple[Tensor, Tensor]]:
        """This rank's micro-batches (normalised images, labels) of the global batch ``idx``. The
        augmentation is drawn for the whole global batch, so every rank draws the same numbers."""
        idx = idx.to(self.device)
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if gen is not None:
            x = data_mod.augment_batch(x, gen)
        per_rank = len(idx) // self.ddp.world
        mine = slice(self.ddp.rank * per_rank, (self.ddp.rank + 1) * per_rank)
        xs, ys = x[mine].chunk(self.cfg.accum_steps), y[mine].chunk(self.cfg.accum_steps)
        return [(self.data.normalize(xx), yy) for xx, yy in zip(xs, ys)]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ steps

    def _arch_grads_allreduce(self) -> None:
        grads = [p.grad for p in self.arch_params if p.grad is not None]
        self.ddp.all_reduce_mean_(grads)

    def _arch_step(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        """First-order architecture step on held-out micro-batches (the network is called without
        DDP and differentiated with respect to the architecture only; gradients all-reduced by hand)."""
        grads = [torch.zeros_like(p) for p in self.arch_params]
        for x, y in batches:
            with self._autocast():
                loss = F.cross_entropy(self.net(x), y) / len(batches)
            gs = torch.autograd.grad(self.a_scaler.scale(loss), self.arch_params, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc += g
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        self._arch_grads_allreduce()
        self.a_scaler.step(self.a_opt)
        self.a_scaler.update()
        self.a_opt.zero_grad(set_to_none=True)

    def _arch_step_second_order(self, train: list[tuple[Tensor, Tensor]], val: list[tuple[Tensor, Tensor]]) -> None:
        """DARTS' unrolled architecture gradient: grad_a L_val(w', a) - eta * (finite-difference
        Hessian-vector product), with w' = w - eta * (momentum * buf + grad_w L_train + wd * w)."""
        xt = torch.cat([b[0] for b in train])
        yt = torch.cat([b[1] for b in train])
        xv = torch.cat([b[0] for b in val])
        yv = torch.cat([b[1] for b in val])
        eta = self.w_opt.param_groups[0]["lr"]
        wd, mom = self.cfg.weight_decay, self.cfg.momentum
        ws = self.weight_params
        backup = [w.detach().clone() for w in ws]

        def loss_on(x, y):
            with self._autocast():
                return F.cross_entropy(self.net(x), y)

        g_train = torch.autograd.grad(loss_on(xt, yt), ws, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(ws, g_train):
                step = (g if g is not None else torch.zeros_like(w)) + wd * w
                buf = self.w_opt.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    step = step + mom * buf
                w.sub_(eta * step)
        grads = torch.autograd.grad(loss_on(xv, yv), self.arch_params + ws, allow_unused=True)
        d_arch = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads[: len(self.arch_params)], self.arch_params)
        ]
        d_w = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[len(self.arch_params) :], ws)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in d_w)).item()
        r = 0.01 / max(norm, 1e-12)
        hv = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b, g in zip(ws, backup, d_w):
                    w.copy_(b + sign * r * g)
            gs = torch.autograd.grad(loss_on(xt, yt), self.arch_params, allow_unused=True)
            hv.append([g if g is not None else torch.zeros_like(p) for g, p in zip(gs, self.arch_params)])
        with torch.no_grad():
            for w, b in zip(ws, backup):
                w.copy_(b)
        for p, da, gp, gn in zip(self.arch_params, d_arch, hv[0], hv[1]):
            p.grad = da - eta * (gp - gn) / (2 * r)
        self._arch_grads_allreduce()
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)

    def _weight_step(self, batches: list[tuple[Tensor, Tensor]], joint: bool) -> tuple[float, int, int]:
        """SGD step of the weights on this rank's micro-batches (DDP all-reduces their gradients);
        with ``joint`` (ERM) the same backward also gives the architecture its gradient and both
        optimizers step. Returns (sum of losses, correct, images) over this rank's images."""
        self.w_opt.zero_grad(set_to_none=True)
        if not joint:
            for p in self.arch_params:
                p.requires_grad_(False)  # no dL/dalpha work in a pure weight step
        loss_sum, correct, seen = 0.0, 0, 0
        try:
            for i, (x, y) in enumerate(batches):
                sync = self.ddp.active and i == len(batches) - 1
                ctx = contextlib.nullcontext() if (sync or not self.ddp.active) else self.model.no_sync()
                with ctx:
                    with self._autocast():
                        logits = self.model(x)
                        loss = F.cross_entropy(logits, y)
                    self.w_scaler.scale(loss / len(batches)).backward()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(-1) == y).sum())
                seen += len(y)
        finally:
            if not joint:
                for p in self.arch_params:
                    p.requires_grad_(True)
        self.w_scaler.unscale_(self.w_opt)
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.weight_params, self.cfg.grad_clip)
        if joint:
            self._arch_grads_allreduce()
            self.w_scaler.unscale_(self.a_opt)
            self.w_scaler.step(self.a_opt)
            self.a_opt.zero_grad(set_to_none=True)
        self.w_scaler.step(self.w_opt)
        self.w_scaler.update()
        return loss_sum, correct, seen

    # ------------------------------------------------------------------ epochs

    def _eval_limit(self, default: int | None = None) -> int | None:
        """Images to evaluate: ``--limit-batches`` batches in a smoke run, else ``default``."""
        if self.cfg.limit_batches is None:
            return default
        cap = self.cfg.limit_batches * self.cfg.batch_size
        return cap if default is None else min(cap, default)

    @torch.no_grad()
    def _evaluate(self, x_all: Tensor, y_all: Tensor, limit: int | None = None) -> tuple[float, float]:
        """Loss and accuracy on (a shard per rank of) the given images, the sampler's generator left untouched."""
        saved = self.generator.get_state()
        self.net.eval()
        n = len(y_all) if limit is None else min(limit, len(y_all))
        idx = torch.arange(self.ddp.rank, n, self.ddp.world)
        loss_sum, correct = 0.0, 0
        for chunk in idx.split(256):
            chunk = chunk.to(self.device)
            with self._autocast():
                logits = self.net(self.data.normalize(x_all[chunk]))
            loss_sum += float(F.cross_entropy(logits.float(), y_all[chunk], reduction="sum"))
            correct += int((logits.argmax(-1) == y_all[chunk]).sum())
        self.net.train()
        self.generator.set_state(saved)
        loss_sum, correct = self.ddp.all_reduce_sum([loss_sum, float(correct)], self.device)
        return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, alg = self.cfg, self.alg
        tau = gumbel_tau(alg, epoch, cfg.epochs)
        if tau is not None:
            self.net.tau = tau
        arch_active = self.a_opt is not None and epoch >= cfg.arch_warmup
        w_order = data_mod.epoch_order(self.w_idx, cfg.seed, epoch, stream=0)
        a_order = data_mod.epoch_order(self.a_idx, cfg.seed, epoch, stream=1)
        aug_gen = data_mod.epoch_generator(cfg.seed, epoch, stream=2) if self.data.augment else None
        steps = len(w_order) // cfg.batch_size
        if cfg.mode == "bilevel":
            steps = min(steps, len(a_order) // cfg.batch_size)
        if cfg.limit_batches is not None:
            steps = min(steps, cfg.limit_batches)
        lr = self.w_opt.param_groups[0]["lr"]
        bar = None
        if cfg.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr, dynamic_ncols=True
            )
        self.net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for step in range(steps):
            w_batch = self._micro_batches(w_order[step * cfg.batch_size : (step + 1) * cfg.batch_size], aug_gen)
            joint = arch_active and cfg.mode == "erm"
            if arch_active and cfg.mode == "bilevel":
                a_batch = self._micro_batches(a_order[step * cfg.batch_size : (step + 1) * cfg.batch_size], aug_gen)
                if alg.second_order:
                    self._arch_step_second_order(w_batch, a_batch)
                else:
                    self._arch_step(a_batch)
            ls, c, n = self._weight_step(w_batch, joint)
            loss_sum, correct, seen = loss_sum + ls, correct + c, seen + n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{100.0 * correct / max(seen, 1):.1f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        self.sched.step()
        loss_sum, correct, seen = self.ddp.all_reduce_sum([loss_sum, float(correct), float(seen)], self.device)
        test_loss, test_acc = self._evaluate(self.data.x_test, self.data.y_test, limit=self._eval_limit())
        self.ddp.check_same(self.arch_params, "architecture parameters")
        weights = self.net.arch_weights()
        ent = row_entropy(weights)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "tau": tau,
            "arch_updates": arch_active,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "entropy": float(np.mean(list(ent.values()))),
            "entropy_per_cell": ent,
            "images_per_sec": seen / max(train_time, 1e-9),
            "train_seconds": train_time,
            "arch": self.net.export(),
            "arch_weights": {k: v.detach().float().cpu().tolist() for k, v in weights.items()},
        }
        return record

    def _random_search(self) -> tuple[str, float]:
        """RS-WS selection: score ``rs_samples`` uniformly random architectures with the shared
        weights on the architecture data; set the best one (one-hot weights) and return it."""
        from fastnas.search.selection import random_architectures

        cfg = self.cfg
        eval_net = build_network(cfg, self.alg, self.data.num_classes, self.data.in_channels, sampler=None).to(
            self.device
        )
        eval_net.load_state_dict(self.net.state_dict())
        gen = data_mod.epoch_generator(cfg.seed, cfg.epochs, stream=3)
        candidates = random_architectures(cfg.space, eval_net, cfg.rs_samples, gen)
        x_sel, y_sel = self.data.x_train[self.a_idx.to(self.device)], self.data.y_train[self.a_idx.to(self.device)]
        best, best_acc = None, -1.0
        saved_net = self.net
        self.net = eval_net
        try:
            for cand in candidates:
                with torch.no_grad():
                    for p, w in zip(eval_net.arch_parameters(), cand):
                        p.copy_(w)
                _, acc = self._evaluate(x_sel, y_sel, limit=self._eval_limit(1024))
                if acc > best_acc:
                    best, best_acc = cand, acc
        finally:
            self.net = saved_net
        with torch.no_grad():
            for p, w in zip(self.net.arch_parameters(), best):
                p.copy_(w)
        return self.net.export(), best_acc

    def _op_names(self) -> list[str]:
        if self.cfg.space == "nb201":
            from fastnas.spaces.nb201 import PRIMITIVES
        else:
            from fastnas.spaces.darts import PRIMITIVES
        return list(PRIMITIVES)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            if not cfg.resume:
                _atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(cfg.as_dict(), indent=1))
        self.ddp.barrier()
        if self.is_main:
            where = f"{self.ddp.world} processes" if self.ddp.active else str(self.device)
            self.log(
                f"fastnas search: {self.alg.name} ({cfg.mode}) on {cfg.space}, {cfg.dataset}, {cfg.epochs} epochs, "
                f"batch {cfg.batch_size}, {where}"
                + (f", resuming after epoch {self.start_epoch}" if self.start_epoch else "")
            )
        t_start = time.perf_counter()
        done_now = 0
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._epoch(epoch)
            self.history.append(record)
            if self.is_main:
                tau = f"  tau {record['tau']:.2f}" if record["tau"] is not None else ""
                self.log(
                    f"epoch {epoch + 1}/{cfg.epochs}  "
                    f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
                    f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%  "
                    f"entropy {record['entropy']:.4f}  {record['images_per_sec']:.0f} img/s{tau}"
                )
            self._save(epoch + 1)
            done_now += 1
            if cfg.stop_after is not None and done_now >= cfg.stop_after and epoch + 1 < cfg.epochs:
                if self.is_main:
                    self.log(f"stopping after {done_now} epochs as asked; continue with --resume")
                    plot_arch_weights(self.history, os.path.join(cfg.out, "arch_weights.png"), self._op_names())
                return {"arch": self.net.export(), "epochs_done": epoch + 1, "finished": False, "history": self.history}
        result: dict[str, Any] = {"arch": self.net.export(), "epochs_done": cfg.epochs, "finished": True}
        if self.alg.sampler == "uniform":
            arch, acc = self._random_search()
            result.update(arch=arch, rs_ws_selection_acc=acc)
            if self.is_main:
                self.log(f"random search with shared weights: best of {cfg.rs_samples} scored {acc:.2f}%")
        if self.history:
            last = self.history[-1]
            result.update({k: last[k] for k in ("train_acc", "test_acc", "entropy")})
        result["search_seconds"] = time.perf_counter() - t_start
        if self.table is not None:
            bench = self.table(result["arch"])
            result["benchmark"] = bench
            if self.is_main:
                self.log(
                    "benchmark: "
                    + (
                        ", ".join(f"{k} {v:.2f}" for k, v in bench.items())
                        if bench
                        else "architecture not in the table"
                    )
                )
        if self.is_main:
            self.log(f"architecture: {result['arch']}")
            _atomic_write_text(os.path.join(cfg.out, "arch.txt"), result["arch"] + "\n")
            _atomic_write_text(os.path.join(cfg.out, "result.json"), json.dumps(result, indent=1))
            plot_arch_weights(self.history, os.path.join(cfg.out, "arch_weights.png"), self._op_names())
        result["history"] = self.history
        return result


def plot_arch_weights(history: list[dict[str, Any]], path: str, op_names: list[str] | None = None) -> None:
    """PNG of every edge's op weights over the epochs: one panel per edge, one line per op (named by
    ``op_names``), the panels of each cell type in their own rows. Written atomically."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = list(history[0]["arch_weights"])
    epochs = [h["epoch"] for h in history]
    n_edges = max(len(history[0]["arch_weights"][c]) for c in cells)
    cols = min(n_edges, 7)
    rows_per_cell = math.ceil(n_edges / cols)
    height = 1.9 * rows_per_cell * len(cells) + 0.5
    fig, axes = plt.subplots(rows_per_cell * len(cells), cols, figsize=(2.2 * cols, height), squeeze=False)
    for ci, cell in enumerate(cells):
        w = np.array([h["arch_weights"][cell] for h in history])  # [epochs, edges, ops]
        for e in range(rows_per_cell * cols):
            ax = axes[ci * rows_per_cell + e // cols][e % cols]
            if e >= w.shape[1]:
                ax.axis("off")
                continue
            for k in range(w.shape[2]):
                ax.plot(epochs, w[:, e, k], label=op_names[k] if op_names else str(k))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1)
            ax.set_title(f"{cell} edge {e}", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=5, loc="upper left")
    fig.suptitle("architecture weights over the epochs (one panel per edge, one line per op)", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.3 / height, top=1 - 0.55 / height, wspace=0.3, hspace=0.6)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
