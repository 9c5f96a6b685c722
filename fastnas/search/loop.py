"""The search: architecture steps (first and second order), RS-WS selection, and :func:`run_search`.

:func:`run_search` runs one search described by a :class:`SearchConfig` and writes, in ``config.out``:

* ``arch.txt``: the architecture found (DARTS genotype or NAS-Bench-201 string);
* ``history.json``: one record per epoch (losses, accuracies, entropy, images/s, weights, ...);
* ``checkpoint.pt``: everything needed to continue, written atomically after every epoch;
* ``arch_weights.png``: the architecture weights over the epochs;
* ``config.json`` and ``result.json`` (the final summary).

Distributed runs (``torchrun``): network weights are synchronised by DDP; architecture parameters
are kept out of DDP and their gradients all-reduced by hand, so every rank applies the same
architecture update; GDAS/RS-WS samples come from ``net.generator``, seeded alike on every rank. At
every epoch's end the ranks compare their architecture parameters bit for bit and stop with an
error if they differ.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.runs import data as data_mod
from fastnas.runs.checkpoint import atomic_write_json, atomic_write_text, seed_everything
from fastnas.runs.config import RunError
from fastnas.runs.distributed import process_group
from fastnas.runs.engine import Batches, EpochRun, Setup, prepare, run_threads
from fastnas.runs.plots import plot_arch_weights
from fastnas.runs.tables import load_nb201_table
from fastnas.search.algorithms import Algorithm, gumbel_tau, make_arch_optimizer
from fastnas.search.config import SearchConfig, parse_subset, resolve
from fastnas.spaces import get_space

CHECKPOINT_FORMAT = "fastnas-search-checkpoint/1"


def build_network(
    cfg: SearchConfig, alg: Algorithm, num_classes: int, in_channels: int, sampler: Any = "alg"
) -> nn.Module:
    """The supernet of ``cfg.space`` in the parametrisation of ``alg`` (``sampler`` overrides its sampler)."""
    sampler = alg.sampler if sampler == "alg" else sampler
    return get_space(cfg.space).build_supernet(
        channels=cfg.channels,
        cells=cfg.cells,
        num_classes=num_classes,
        in_channels=in_channels,
        arch=alg.arch,
        sampler=sampler,
        partial_channels=alg.partial_channels,
        stem="imagenet" if cfg.dataset == "imagenet" else "cifar",
    )


def edge_labels(net: nn.Module) -> list[str]:
    """``"i<-j"`` for every row of a cell's op weights (the supernet's ``edge_labels()``)."""
    return net.edge_labels()


def row_entropy(weights: dict[str, Tensor]) -> dict[str, float]:
    """Mean entropy (nats) of the rows of each weight matrix (rows summing to 1)."""
    out = {}
    for name, w in weights.items():
        w = w.detach().double().clamp_min(1e-30)
        out[name] = float(-(w * w.log()).sum(-1).mean())
    return out


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Run the search ``cfg`` describes; return the summary also written to ``result.json``.

    Raises :class:`~fastnas.runs.RunError` (before writing anything) for bad input.
    """
    cfg, alg = resolve(cfg)
    table = load_nb201_table(cfg.nb201_table) if cfg.nb201_table else None
    with prepare(cfg, CHECKPOINT_FORMAT) as setup:
        subset = parse_subset(cfg.subset) if cfg.subset else None
        data, w_idx, a_idx = data_mod.search_split(setup.data, cfg.mode, cfg.train_portion, subset, cfg.seed)
        setup = dataclasses.replace(setup, data=data)
        if len(w_idx) < cfg.batch_size or len(a_idx) < cfg.batch_size:
            raise RunError(
                f"--batch-size {cfg.batch_size} exceeds the {min(len(w_idx), len(a_idx))} images of a "
                f"{cfg.mode} split of {cfg.dataset}"
            )
        with process_group(setup.ddp, setup.device, run_threads(cfg, setup)):
            if table is not None and table.report and setup.ddp.is_main:
                (cfg.log or print)(table.report)
            return Search(cfg, alg, setup, w_idx, a_idx, table).run()


class Search(EpochRun):
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: SearchConfig, alg: Algorithm, setup: Setup, w_idx: Tensor, a_idx: Tensor, table) -> None:
        super().__init__(cfg, setup)
        self.alg = alg
        self.w_idx, self.a_idx = w_idx, a_idx
        self.table = table
        seed_everything(cfg.seed)
        self.net = build_network(cfg, alg, self.data.num_classes, self.data.in_channels)
        self.prepare_network()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.net.generator = self.generator
        # a sampler without learnt weights (RS-WS) is judged by the cells it samples, not by the argmax
        # of its initial weights: evaluation samples too, until the selection sets the chosen cell
        self.learns_arch = alg.arch_optimizer is not None
        if alg.sampler is not None and not self.learns_arch:
            self.net.eval_arch = "sample"
        self.arch_params = list(self.net.arch_parameters())
        self.weight_params = list(self.net.weight_parameters())
        # computing only the sampled ops leaves the others without a gradient
        find_unused = alg.sampler is not None and not self.net.compute_all_ops
        self.model = self.wrap_ddp(frozen=self.arch_params, find_unused=find_unused)
        self.init_weight_optimizer()
        self.a_opt = make_arch_optimizer(alg, self.net, cfg.arch_lr, cfg.arch_weight_decay, cfg.entropy_weight)
        self._arch_optimizer_capturable()
        self.a_scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # the kinds of step; with --cuda-graphs each is replayed as a CUDA graph of its own
        self._arch_step = self.step_runner(self._arch_step_first_order)
        self._arch_step_unrolled = self.step_runner(self._arch_step_second_order)
        self._weight_only_step = self.step_runner(lambda batches: self.weight_step(batches, self._loss))
        self._joint_step = self.step_runner(
            lambda batches: self.weight_step(batches, self._loss, before_step=self._joint_arch_step)
        )
        if setup.ckpt is not None:
            self.restore(setup.ckpt)

    def _arch_optimizer_capturable(self) -> None:
        """Adam keeps its step count on the device (``capturable``) when CUDA graphs replay its steps,
        on the host otherwise; a checkpoint's setting, and where its step counts lie, are overridden
        (a run may be resumed with or without ``--cuda-graphs``)."""
        if self.a_opt is None:
            return
        capturable = self.cfg.cuda_graphs and self.device.type == "cuda"
        for group in self.a_opt.param_groups:
            if "capturable" not in group:
                continue
            group["capturable"] = capturable
            for p in group["params"]:
                state = self.a_opt.state.get(p, {})
                if isinstance(state.get("step"), Tensor):
                    state["step"] = state["step"].to(p.device if capturable else "cpu")

    # ------------------------------------------------------------------ state

    def extra_state(self) -> dict[str, Any]:
        return {
            "arch_optimizer": self.a_opt.state_dict() if self.a_opt is not None else None,
            "arch_scaler": self.a_scaler.state_dict(),
            "sampler_rng": self.generator.get_state(),
            "arch": self.exported(),
        }

    def restore_extra(self, ckpt: dict[str, Any]) -> None:
        if self.a_opt is not None:
            self.a_opt.load_state_dict(ckpt["arch_optimizer"])
            self._arch_optimizer_capturable()
        self.a_scaler.load_state_dict(ckpt["arch_scaler"])
        self.generator.set_state(ckpt["sampler_rng"])

    def exported(self) -> str | None:
        """The architecture found so far: the network's export, None for a sampler that learns no
        weights (RS-WS), whose architecture is the one its selection picks at the end."""
        return self.net.export() if self.learns_arch else None

    def save_extra(self) -> None:
        arch = self.exported()
        if arch is not None:
            atomic_write_text(os.path.join(self.cfg.out, "arch.txt"), arch + "\n")

    # ------------------------------------------------------------------ steps

    def _arch_grads_allreduce(self) -> None:
        grads = [p.grad for p in self.arch_params if p.grad is not None]
        self.ddp.all_reduce_mean_(grads)

    def _arch_step_first_order(self, batches: Batches) -> None:
        """First-order architecture step on held-out micro-batches ``(x, y, sample)`` (the network is
        called without DDP and differentiated with respect to the architecture only; gradients
        all-reduced by hand)."""
        grads = [torch.zeros_like(p) for p in self.arch_params]
        for x, y, sample in batches:
            with self.autocast():
                loss = F.cross_entropy(self.net(x, sample), y) / len(batches)
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

    def _arch_step_second_order(self, train: Batches, val: Batches) -> None:
        """DARTS' unrolled architecture gradient: grad_a L_val(w', a) - eta * (finite-difference
        Hessian-vector product), with w' = w - eta * (momentum * buf + grad_w L_train + wd * w).
        Micro-batches ``(x, y, sample)``; the finite-difference step stays on the device."""
        xt = torch.cat([b[0] for b in train])
        yt = torch.cat([b[1] for b in train])
        xv = torch.cat([b[0] for b in val])
        yv = torch.cat([b[1] for b in val])
        eta = self.w_opt.param_groups[0]["lr"]
        wd, mom = self.cfg.weight_decay, self.cfg.momentum
        ws = self.weight_params
        backup = [w.detach().clone() for w in ws]

        def loss_on(x, y):
            with self.autocast():
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
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in d_w))
        r = 0.01 / norm.clamp_min(1e-12)  # float64 on the device: no host read
        hv = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b, g in zip(ws, backup, d_w):
                    w.copy_(b + (sign * r) * g)
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

    def _joint_arch_step(self) -> None:
        """ERM: the weight step's backward also gave the architecture its gradient; step it too."""
        self._arch_grads_allreduce()
        self.w_scaler.unscale_(self.a_opt)
        self.w_scaler.step(self.a_opt)
        self.a_opt.zero_grad(set_to_none=True)

    def _loss(self, x: Tensor, y: Tensor, sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.model(x, sample)
        return F.cross_entropy(logits, y), logits

    def _with_samples(self, batch: list[tuple[Tensor, Tensor]]) -> Batches:
        """Micro-batches ``(x, y)`` with a sample of the architecture each, drawn now from
        ``net.generator`` (``{}`` without a sampler): a step's forwards read it from its arguments."""
        return [(x, y, self.net.sample_architecture()) for x, y in batch]

    def _weight_step(self, batches: Batches, joint: bool) -> Tensor:
        """SGD step of the weights; with ``joint`` (ERM) the same backward also steps the architecture."""
        if joint:
            return self._joint_step(batches)
        for p in self.arch_params:
            p.requires_grad_(False)  # no dL/dalpha work in a pure weight step
        try:
            return self._weight_only_step(batches)
        finally:
            for p in self.arch_params:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ epochs

    @torch.no_grad()
    def _evaluate(self, net: nn.Module, x_all: Tensor, y_all: Tensor, limit: int | None = None) -> tuple[float, float]:
        """Loss and accuracy of ``net`` on the given images, the sampler's generator left untouched."""
        saved = self.generator.get_state()
        try:
            return self.evaluate(net, x_all, y_all, limit)
        finally:
            self.generator.set_state(saved)

    def header(self) -> str:
        cfg = self.cfg
        return f"fastnas search: {self.alg.name} ({cfg.mode}) on {cfg.space}, {cfg.dataset}"

    def epoch(self, epoch: int) -> dict[str, Any]:
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
        lr = self.set_epoch_lr(epoch)
        bilevel_arch = arch_active and cfg.mode == "bilevel"
        w_batches = self.epoch_batches(w_order, steps, aug_gen)
        a_batches = self.epoch_batches(a_order, steps, aug_gen) if bilevel_arch else None

        def step(i: int) -> tuple[Tensor, int]:
            if a_batches is not None:  # samples drawn in the order the steps use them
                a_batch = self._with_samples(a_batches[i])
                if alg.second_order:
                    self._arch_step_unrolled(w_batches[i], a_batch)
                else:
                    self._arch_step(a_batch)
            w_batch = self._with_samples(w_batches[i])
            stats = self._weight_step(w_batch, joint=arch_active and cfg.mode == "erm")
            return stats, sum(len(y) for _, y, _ in w_batch)

        self.net.train()
        train = self.train_steps(epoch, steps, step)
        test_loss, test_acc = self._evaluate(self.net, self.data.x_test, self.data.y_test, limit=self.eval_limit())
        self.ddp.check_same(self.arch_params, "architecture parameters")
        weights = self.net.arch_weights()
        ent = row_entropy(weights)
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "tau": tau,
            "arch_updates": arch_active,
            "train_loss": train["train_loss"],
            "train_acc": train["train_acc"],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "entropy": float(np.mean(list(ent.values()))),
            "entropy_per_cell": ent,
            "images_per_sec": train["images_per_sec"],
            "train_seconds": train["train_seconds"],
            "test_acc_of": "the architecture's argmax" if self.learns_arch else "uniformly sampled cells",
            "arch": self.exported(),
            "arch_weights": {k: v.detach().float().cpu().tolist() for k, v in weights.items()},
        }

    def epoch_line(self, record: dict[str, Any]) -> str:
        tau = f"  tau {record['tau']:.2f}" if record["tau"] is not None else ""
        return (
            f"epoch {record['epoch']}/{self.cfg.epochs}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
            f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%  "
            f"entropy {record['entropy']:.4f}  {record['images_per_sec']:.0f} img/s{tau}"
        )

    def _random_search(self) -> tuple[str, float]:
        """RS-WS selection: score ``rs_samples`` uniformly random architectures with the shared
        weights on the architecture data; set the best one (one-hot weights) and return it."""
        cfg = self.cfg
        eval_net = build_network(cfg, self.alg, self.data.num_classes, self.data.in_channels, sampler=None)
        eval_net.to(self.device).load_state_dict(self.net.state_dict())
        gen = data_mod.epoch_generator(cfg.seed, cfg.epochs, stream=3)
        candidates = get_space(cfg.space).random_architectures(eval_net, cfg.rs_samples, gen)
        x_sel, y_sel = self.data.x_train[self.a_idx.to(self.device)], self.data.y_train[self.a_idx.to(self.device)]
        best, best_acc = None, -1.0
        for cand in candidates:
            with torch.no_grad():
                for p, w in zip(eval_net.arch_parameters(), cand):
                    p.copy_(w)
            _, acc = self._evaluate(eval_net, x_sel, y_sel, limit=self.eval_limit(1024))
            if acc > best_acc:
                best, best_acc = cand, acc
        with torch.no_grad():
            for p, w in zip(self.net.arch_parameters(), best):
                p.copy_(w)
        self.net.eval_arch = "argmax"  # the selected cell (one-hot weights) from now on
        self.learns_arch = True
        return self.net.export(), best_acc

    def partial_result(self, epochs_done: int) -> dict[str, Any]:
        return {"arch": self.exported(), **super().partial_result(epochs_done)}

    def on_stop(self) -> None:
        labels = {cell: edge_labels(self.net) for cell in self.net.arch_weights()}
        space = get_space(self.cfg.space)
        plot_arch_weights(
            self.history,
            os.path.join(self.cfg.out, "arch_weights.png"),
            list(space.op_names),
            labels,
            None if self.exported() is None else space.chosen_ops(self.exported()),
        )

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        result: dict[str, Any] = {"arch": self.exported(), "epochs_done": cfg.epochs, "finished": True}
        if self.history:
            last = self.history[-1]
            result.update({k: last[k] for k in ("train_acc", "test_acc", "test_acc_of", "entropy")})
        if self.alg.sampler == "uniform" and cfg.rs_samples > 0:
            arch, acc = self._random_search()
            _, test_acc = self._evaluate(self.net, self.data.x_test, self.data.y_test, limit=self.eval_limit())
            result.update(arch=arch, rs_ws_selection_acc=acc, test_acc=test_acc, test_acc_of="the selected cell")
            if self.is_main:
                self.log(
                    f"random search with shared weights: best of {cfg.rs_samples} scored {acc:.2f}%, "
                    f"test accuracy {test_acc:.2f}%"
                )
        result["search_seconds"] = self.elapsed_seconds + time.perf_counter() - t0  # every invocation
        if self.table is not None and result["arch"] is not None:
            bench = self.table(result["arch"])
            result["benchmark"] = bench
            if self.is_main:
                found = ", ".join(f"{k} {v:.2f}" for k, v in bench.items()) if bench else None
                self.log("benchmark: " + (found or "architecture not in the table"))
        if self.is_main:
            if result["arch"] is not None:
                self.log(f"architecture: {result['arch']}")
                atomic_write_text(os.path.join(cfg.out, "arch.txt"), result["arch"] + "\n")
            else:
                self.log("no architecture selected (--rs-samples 0): the run is its trained supernet")
            atomic_write_json(os.path.join(cfg.out, "result.json"), result)
            self.on_stop()
        result["history"] = self.history
        return result
