"""The epoch loop every command runs: batches, the weight step, evaluation, history, checkpoints, resume.

:class:`EpochRun` holds what ``search`` and ``train`` share; a command subclasses it with its
network, its steps and its epoch record. Its checkpoint holds the model, the weight optimizer, the
gradient scaler, every RNG, the history and the time spent (plus what the command adds), written
atomically after every epoch; a resumed run continues bit-identically on CPU because every epoch's
batch order and augmentation come from generators seeded by ``(seed, epoch)`` (:mod:`fastnas.runs.data`)
and its learning rate from the closed-form cosine of ``(epoch, epochs)``.

Under ``torchrun`` the network goes through DistributedDataParallel; each rank trains on its slice
of the global batch and rank 0 writes the files.

A step reads nothing on the host: its batch comes from the epoch's images on the device
(:mod:`fastnas.runs.batches`), its loss and accuracy stay there (:func:`~fastnas.runs.steps.step_stats`)
and are read once per epoch, or when the progress bar refreshes (at most every
``PROGRESS_REFRESH_S`` seconds). ``--compile`` compiles the network and ``--cuda-graphs`` replays
each kind of step as a CUDA graph (:mod:`fastnas.runs.steps`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.runs import data as data_mod
from fastnas.runs.batches import EpochBatches, Normalizer, epoch_batches, eval_batches
from fastnas.runs.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_resumable,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from fastnas.runs.config import AMP_DTYPES, RunError, config_json
from fastnas.runs.distributed import Dist, resolve_device
from fastnas.runs.folder import WHAT, RunFolder, claim, read_json
from fastnas.runs.steps import CapturedStep, check_cuda_graphs, compile_network, eager, step_stats

Batches = list[tuple]  # micro-batches: (images, labels, what else the step's loss takes)
PROGRESS_REFRESH_S = 2.0  # the progress bar's loss and accuracy: a host read at most this often


@dataclass
class Setup:
    """What :func:`prepare` found: the processes, the device, the data, the claimed output folder and
    the checkpoint to resume (None: start at epoch 0)."""

    ddp: Dist
    device: torch.device
    data: data_mod.ImageData
    folder: RunFolder
    ckpt: dict[str, Any] | None


@contextlib.contextmanager
def prepare(cfg: Any, fmt: str) -> Iterator[Setup]:
    """The checks and loads every run starts with, holding the claim on ``cfg.out`` for the body
    (:func:`fastnas.runs.folder.claim`): RunError, before anything is written, for bad input.

    ``cfg`` has the fields ``out``, ``resume``, ``part``, ``device``, ``amp``, ``batch_size``,
    ``accum_steps``, ``dataset``, ``data_dir`` and ``cuda_graphs``; ``fmt`` is its checkpoint format.
    """
    if cfg.SWEEP:
        raise RunError(f"a {cfg.SWEEP} sweep is many runs: fastnas.runs.sweep runs it, not one {cfg.COMMAND} run")
    ddp = Dist()
    ddp.check_batch(cfg.batch_size, cfg.accum_steps)
    with claim(cfg.out, cfg.COMMAND, cfg.resume, cfg.part, lock=ddp.is_main) as folder:
        device, data = device_and_data(cfg, ddp)
        if cfg.cuda_graphs:
            check_cuda_graphs(device, ddp.world, cfg.amp)
        ckpt = None
        if folder.decision.checkpoint:
            path = os.path.join(cfg.out, "checkpoint.pt")
            ckpt = load_checkpoint(path, fmt, f"fastnas {WHAT[cfg.COMMAND].split()[0]} checkpoint")
            check_resumable(ckpt, cfg.run_defining(), path)
        yield Setup(ddp, device, data, folder, ckpt)


def device_and_data(cfg: Any, ddp: Dist) -> tuple[torch.device, data_mod.ImageData]:
    """The device of ``cfg.device`` (which ``cfg.amp`` must suit) and the data set ``cfg.dataset``."""
    device = resolve_device(cfg.device, ddp)
    if cfg.amp == "fp16" and device.type == "cpu":
        raise RunError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    try:
        return device, data_mod.load_dataset(cfg.dataset, cfg.data_dir, options=cfg)
    except data_mod.DataError as e:
        raise RunError(str(e)) from None


def default_threads(cfg: Any) -> int | None:
    """``--threads``, else 1 on the tiny embedded data sets (more threads only add overhead there)."""
    return cfg.threads or (1 if data_mod.is_embedded(cfg.dataset) else None)


def run_threads(cfg: Any, setup: Setup) -> int | None:
    """The CPU threads of this invocation: a resumed run keeps the count it ran with (a different
    count changes floating-point sums, so the run would not continue bit-identically); a ``--threads``
    that changes it is obeyed, with a warning."""
    saved = setup.ckpt.get("cpu_threads") if setup.ckpt is not None else None
    if saved is None or setup.device.type != "cpu":
        return default_threads(cfg)
    if cfg.threads is not None and cfg.threads != saved:
        if setup.ddp.is_main:
            print(
                f"fastnas {cfg.COMMAND}: warning: {cfg.out} ran with {saved} CPU threads, this resumption with "
                f"{cfg.threads}: floating-point sums change, so the result will not be bit-identical to an "
                f"uninterrupted run (resume with --threads {saved} for that)",
                file=sys.stderr,
            )
        return cfg.threads
    return saved


class EpochRun:
    """The shared part of a run of ``cfg.epochs`` epochs (see the module docstring).

    A subclass sets ``self.net`` (the network; :meth:`prepare_network` compiles it), ``self.model``
    (the network or its DDP wrapper), ``self.weight_params`` and calls :meth:`init_weight_optimizer`
    before :meth:`restore`; it implements :meth:`epoch` (one epoch, returning its history record),
    :meth:`epoch_line` and :meth:`finish`, and may add to the checkpoint with :meth:`extra_state` /
    :meth:`restore_extra`. Its step functions go through :meth:`step_runner` (CUDA graphs).
    """

    checkpoint_format = ""
    command = ""

    net: nn.Module
    model: nn.Module
    weight_params: list[nn.Parameter]

    def __init__(self, cfg: Any, setup: Setup) -> None:
        self.cfg = cfg
        self.ddp = setup.ddp
        self.device = setup.device
        self.data = setup.data.to(setup.device)
        self.normalize = Normalizer(self.data, setup.device)
        self.is_main = self.ddp.is_main
        self.log: Callable[[str], None] = cfg.log or (lambda s: print(s, flush=True))
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.w_scaler = torch.amp.GradScaler(setup.device.type, enabled=cfg.amp == "fp16")
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.elapsed_seconds = 0.0  # wall time of the epochs so far, over every invocation
        self.captured: list[CapturedStep] = []

    # ------------------------------------------------------------------ set-up

    def prepare_network(self) -> None:
        """``self.net`` on the device, compiled with ``--compile``; a supernet computing every op with
        ``--cuda-graphs`` (a graph cannot depend on the sample); before :meth:`wrap_ddp`."""
        self.net.to(self.device)
        if self.cfg.compile:
            compile_network(self.net)
        if self.cfg.cuda_graphs and hasattr(self.net, "compute_all_ops"):
            self.net.compute_all_ops = True

    def step_runner(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` itself, or with ``--cuda-graphs`` a :class:`CapturedStep` of it, captured anew every
        epoch (the learning rate is a constant of its graph). Each holds its own graph memory."""
        if not self.cfg.cuda_graphs:
            return fn
        step = CapturedStep(fn, capture=self.device.type == "cuda")
        self.captured.append(step)
        return step

    def wrap_ddp(self, frozen: list[nn.Parameter], find_unused: bool) -> nn.Module:
        """``self.net`` in DistributedDataParallel when distributed (else itself). DDP registers only
        the parameters that require grad when it is built: ``frozen`` stay out of its buckets."""
        if not self.ddp.active:
            return self.net
        for p in frozen:
            p.requires_grad_(False)
        model = nn.parallel.DistributedDataParallel(
            self.net,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
        for p in frozen:
            p.requires_grad_(True)
        return model

    def init_weight_optimizer(self, nesterov: bool = False) -> None:
        """SGD with momentum and weight decay over ``self.weight_params`` (learning rate: :meth:`set_epoch_lr`)."""
        cfg = self.cfg
        self.w_opt = torch.optim.SGD(
            self.weight_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=nesterov
        )

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``: cosine decay from ``lr`` to ``lr_min`` over ``epochs``,
        in closed form, so a run extended to more epochs follows the longer schedule."""
        cfg = self.cfg
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2

    def set_epoch_lr(self, epoch: int) -> float:
        """Set and return the learning rate of 0-based ``epoch`` (:meth:`epoch_lr`)."""
        lr = self.epoch_lr(epoch)
        for group in self.w_opt.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------ checkpoints

    def extra_state(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        pass

    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": self.checkpoint_format,
            "config": self.cfg.run_defining(),
            "epoch": epoch,
            "model": self.net.state_dict(),
            "weight_optimizer": self.w_opt.state_dict(),
            "weight_scaler": self.w_scaler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "elapsed_seconds": self.elapsed_seconds,
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            **self.extra_state(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        path = os.path.join(self.cfg.out, "checkpoint.pt")
        try:
            self.net.load_state_dict(ckpt["model"])
            self.w_opt.load_state_dict(ckpt["weight_optimizer"])
            self.w_scaler.load_state_dict(ckpt["weight_scaler"])
            self.restore_extra(ckpt)
            set_rng_state(ckpt["rng"])
            self.history = list(ckpt["history"])
            self.start_epoch = int(ckpt["epoch"])
            self.elapsed_seconds = float(ckpt["elapsed_seconds"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunError(f"checkpoint {path} does not fit this run: {str(e).splitlines()[0]}") from None
        if self.start_epoch > self.cfg.epochs:
            raise RunError(
                f"the run in {self.cfg.out} has done {self.start_epoch} epochs, more than --epochs "
                f"{self.cfg.epochs}; resume with --epochs {self.start_epoch} or more"
            )

    def save(self, epoch: int) -> None:
        """Checkpoint and history after ``epoch`` epochs, plus what :meth:`save_extra` adds (rank 0)."""
        if not self.is_main:
            return
        out = self.cfg.out
        atomic_torch_save(self.state(epoch), os.path.join(out, "checkpoint.pt"))
        atomic_write_json(os.path.join(out, "history.json"), self.history)
        self.save_extra()

    def save_extra(self) -> None:
        pass

    # ------------------------------------------------------------------ batches

    def augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """The data set's augmentation of uint8 images ``x`` (random numbers from ``gen``)."""
        return data_mod.augment_batch(x, gen, pad=self.data.crop_padding)

    def cutout_mask(self, x: Tensor, gen: torch.Generator) -> Tensor | None:
        """What a command multiplies a batch's normalised images with (bool ``[B, 1, H, W]``; None:
        nothing), drawn for uint8 images ``x`` after their augmentation."""
        return None

    def epoch_batches(self, order: Tensor, steps: int, gen: torch.Generator | None) -> EpochBatches:
        """This rank's micro-batches of the first ``steps`` global batches of training indices
        ``order`` (see :mod:`fastnas.runs.batches`). The augmentation (when ``gen`` is given) is drawn
        for whole global batches, so every rank draws the same numbers."""
        cfg = self.cfg
        return epoch_batches(
            self.data, order, steps, cfg.batch_size, self.normalize, gen,
            augment=self.augment if self.data.augment else None, cutout_mask=self.cutout_mask,
            rank=self.ddp.rank, world=self.ddp.world, accum_steps=cfg.accum_steps,
        )  # fmt: skip

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a CUDA graph must not capture autocast's cache of cast weights (its casts would not rerun)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.cfg.cuda_graphs)

    # ------------------------------------------------------------------ steps

    def weight_step(
        self,
        batches: Batches,
        loss_fn: Callable[..., tuple[Tensor, Tensor]],
        before_step: Callable[[], None] | None = None,
    ) -> Tensor:
        """One SGD step of the weights on this rank's micro-batches (DDP all-reduces the gradients).
        ``loss_fn(*micro_batch)`` returns (loss, logits) and runs under autocast; ``before_step`` runs
        after the gradients are unscaled and clipped. Returns this rank's ``[sum of losses, correct]``
        (:func:`~fastnas.runs.steps.step_stats`) on the device."""
        self.w_opt.zero_grad(set_to_none=True)
        stats = None
        for i, (x, y, *extra) in enumerate(batches):
            sync = self.ddp.active and i == len(batches) - 1
            ctx = contextlib.nullcontext() if (sync or not self.ddp.active) else self.model.no_sync()
            with ctx:
                with self.autocast():
                    loss, logits = loss_fn(x, y, *extra)
                self.w_scaler.scale(loss / len(batches)).backward()
            s = step_stats(loss, logits, y)
            stats = s if stats is None else stats + s
        self.w_scaler.unscale_(self.w_opt)
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.weight_params, self.cfg.grad_clip)
        if before_step is not None:
            before_step()
        self.w_scaler.step(self.w_opt)
        self.w_scaler.update()
        return stats

    def train_steps(self, epoch: int, steps: int, step: Callable[[int], tuple[Tensor, int]]) -> dict[str, float]:
        """Run ``step(i)`` for ``i < steps`` under a progress bar (``step`` returns this rank's
        ``[sum of losses, correct]`` on the device and its number of images); return the epoch's
        training loss, accuracy, images/s and seconds. The sums are read on the host at the end, and
        for the progress bar at most every ``PROGRESS_REFRESH_S`` seconds."""
        cfg = self.cfg
        bar = None
        if cfg.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr, dynamic_ncols=True
            )
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        seen = 0
        t0 = shown = time.perf_counter()
        for i in range(steps):
            stats, n = step(i)
            sums += stats
            seen += n
            if bar is not None:
                bar.update(1)
                if i == 0 or time.perf_counter() - shown >= PROGRESS_REFRESH_S:
                    loss_sum, correct = sums.tolist()
                    bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{100.0 * correct / max(seen, 1):.1f}")
                    shown = time.perf_counter()
        loss_sum, correct = sums.tolist()  # waits for the device: the time below is the steps'
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        loss_sum, correct, seen = self.ddp.all_reduce_sum([loss_sum, correct, float(seen)], self.device)
        return {
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "images_per_sec": seen / max(seconds, 1e-9),
            "train_seconds": seconds,
        }

    def eval_limit(self, default: int | None = None) -> int | None:
        """Images to evaluate: ``--limit-batches`` batches in a smoke run, else ``default``."""
        if self.cfg.limit_batches is None:
            return default
        cap = self.cfg.limit_batches * self.cfg.batch_size
        return cap if default is None else min(cap, default)

    @torch.no_grad()
    def evaluate(
        self,
        net: nn.Module,
        x_all: Tensor,
        y_all: Tensor,
        limit: int | None = None,
        forward: Callable[[Tensor], Tensor] | None = None,
        top5: bool = False,
    ) -> tuple[float, ...]:
        """Loss and accuracy (and with ``top5`` the top-5 accuracy) of ``net`` in eval mode on a shard
        per rank of the given uint8 images on the device, or an image folder's (streamed,
        :func:`~fastnas.runs.batches.eval_batches`); ``forward`` (default ``net``) maps normalised
        images to logits. Compiled code runs eagerly here (evaluation batches would compile graphs of
        their own); the sums are read once."""
        forward = net if forward is None else forward
        net.eval()
        n = len(y_all) if limit is None else min(limit, len(y_all))
        idx = torch.arange(self.ddp.rank, n, self.ddp.world, device=self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        try:
            with eager(self.cfg.compile):
                for x, y in eval_batches(x_all, y_all, idx, self.normalize):
                    with self.autocast():
                        logits = forward(x)
                    loss = F.cross_entropy(logits.float(), y, reduction="sum")
                    correct = (logits.argmax(-1) == y).sum().double()
                    in_top5 = (logits.topk(min(5, logits.shape[-1]), -1).indices == y[:, None]).any(-1)
                    sums += torch.stack([loss.double(), correct, in_top5.sum().double()])
        finally:
            net.train()
        loss_sum, correct, correct5 = self.ddp.all_reduce_sum(sums.tolist(), self.device)
        result = (loss_sum / max(n, 1), 100.0 * correct / max(n, 1))
        return (*result, 100.0 * correct5 / max(n, 1)) if top5 else result

    # ------------------------------------------------------------------ the loop

    def header(self) -> str:
        raise NotImplementedError

    def epoch(self, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def epoch_line(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    def on_stop(self) -> None:
        """Called on rank 0 when ``--stop-after`` ends the run early."""

    def partial_result(self, epochs_done: int) -> dict[str, Any]:
        """What :meth:`run` returns when ``--stop-after`` ends the run early (plus ``epochs_run``, the
        epochs of this invocation, as after a finished run)."""
        return {"epochs_done": epochs_done, "finished": False, "history": self.history}

    def finish(self) -> dict[str, Any]:
        """The run's result once every epoch is done (``self.elapsed_seconds``: the epochs' wall time)."""
        raise NotImplementedError

    def check_finite(self, epoch: int, record: dict[str, Any]) -> None:
        """End the run (RunError) when ``epoch`` left a non-finite training loss or parameter: nothing
        of it is saved, so the folder keeps the last finite checkpoint and exports nothing new. Under
        fp16 loss scaling an infinite loss is a skipped step, not a divergence, so only the
        parameters count there."""
        params = [p for p in self.net.parameters() if p.is_floating_point()]
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all() if params else True
        loss = record.get("train_loss")
        bad_loss = loss is not None and not math.isfinite(loss) and self.cfg.amp != "fp16"
        if bool(finite) and not bad_loss:
            return
        bad = [name for name, p in self.net.named_parameters() if not torch.isfinite(p.detach()).all()]
        what = [f"training loss {loss}"] if bad_loss else []
        if bad:
            what.append(f"{len(bad)} non-finite parameters ({bad[0]}{', ...' if len(bad) > 1 else ''})")
        kept = f"the checkpoint after epoch {epoch} is kept" if epoch else "nothing was saved"
        raise RunError(
            f"the run diverged in epoch {epoch + 1}: {' and '.join(what)}; it stops, exports nothing, and "
            f"{kept}; lower the learning rates or keep gradient clipping"
        )

    def finished_result(self) -> dict[str, Any] | None:
        """The stored result of a finished run that this invocation would not extend, else None."""
        if self.start_epoch != self.cfg.epochs:
            return None
        path = os.path.join(self.cfg.out, "result.json")
        if not os.path.isfile(path):
            return None  # killed while finishing: finish again
        result = read_json(path)
        return result if isinstance(result, dict) and result.get("finished") else None

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        done = self.finished_result()
        if done is not None:
            if self.is_main:
                self.log(
                    f"{cfg.out}: the {cfg.COMMAND} run is finished ({cfg.epochs} epochs); nothing to do "
                    f"(pass --epochs with more than {cfg.epochs} to extend it)"
                )
            return {**done, "history": self.history, "epochs_run": 0}
        if self.is_main:  # a resumed run may have changed --epochs, --device, ...: its config.json follows
            atomic_write_text(os.path.join(cfg.out, "config.json"), config_json(cfg))
        self.ddp.barrier()
        if self.is_main:
            where = f"{self.ddp.world} processes" if self.ddp.active else str(self.device)
            self.log(
                f"{self.header()}, {cfg.epochs} epochs, batch {cfg.batch_size}, {where}"
                + (f", resuming after epoch {self.start_epoch}" if self.start_epoch else "")
            )
        done_now = 0
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            for step in self.captured:  # the epoch's learning rate (and tau) are new constants
                step.reset()
            record = self.epoch(epoch)
            self.check_finite(epoch, record)
            self.history.append(record)
            if self.is_main:
                self.log(self.epoch_line(record))
            self.elapsed_seconds += time.perf_counter() - t0
            self.save(epoch + 1)
            done_now += 1
            if cfg.stop_after is not None and done_now >= cfg.stop_after and epoch + 1 < cfg.epochs:
                if self.is_main:
                    self.log(f"stopping after {done_now} epochs as asked; continue with --resume")
                    self.on_stop()
                return {**self.partial_result(epoch + 1), "epochs_run": done_now}
        t0 = time.perf_counter()
        result = self.finish()
        self.elapsed_seconds += time.perf_counter() - t0
        return {**result, "epochs_run": done_now}
