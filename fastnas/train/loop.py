"""Training one architecture from scratch: the network, the steps, :func:`run_train`.

:func:`run_train` trains the architecture a :class:`TrainConfig` names and writes, in ``config.out``:

* ``arch.txt``: the architecture trained;
* ``history.json``: one record per epoch (learning rate, losses, accuracies, images/s);
* ``checkpoint.pt``: everything needed to continue, written atomically after every epoch;
* ``curves.png``: losses and accuracies over the epochs;
* ``config.json`` and ``result.json`` (test accuracy, parameters and multiply-adds of the network).

Networks come from :mod:`fastnas.networks`: DARTS's ``NetworkCIFAR`` (``NetworkImageNet`` on
``imagenet``; auxiliary head when ``auxiliary_weight > 0``, drop path rising linearly to
``drop_path`` over the epochs, as DARTS's ``train.py``) and NAS-Bench-201's ``TinyNetwork``. The
test accuracy is recorded as top-1 (``test_acc``) and top-5 (``test_top5``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.networks import for_space
from fastnas.runs import data as data_mod
from fastnas.runs.checkpoint import atomic_write_json, atomic_write_text, seed_everything
from fastnas.runs.config import RunError
from fastnas.runs.distributed import process_group
from fastnas.runs.engine import EpochRun, Setup, prepare, run_threads
from fastnas.runs.plots import plot_curves
from fastnas.train.recipes import TrainConfig, epoch_lr, resolve

CHECKPOINT_FORMAT = "fastnas-train-checkpoint/1"


def build_network(cfg: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The network of ``cfg.arch`` (resolved config). Its ``forward`` returns ``(logits, aux_logits)``
    (DARTS; ``aux_logits`` None in eval mode or without the head) or ``(features, logits)`` (NAS-Bench-201)."""
    return for_space(cfg.space).build(
        cfg.arch,
        channels=cfg.channels,
        cells=cfg.cells,
        num_classes=num_classes,
        in_channels=in_channels,
        auxiliary=cfg.auxiliary_weight > 0,
        imagenet=cfg.dataset == "imagenet",
    )


def network_size(net: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Parameters and multiply-adds of one image of ``input_size`` ``(C, H, W)``, as the papers count them."""
    from fastnas import networks

    return {"params": int(networks.count_parameters(net)), "macs": int(networks.count_macs(net, input_size))}


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the architecture ``cfg`` describes; return the summary also written to ``result.json``.

    Raises :class:`~fastnas.runs.RunError` (before writing anything) for bad input.
    """
    cfg = resolve(cfg)
    with prepare(cfg, CHECKPOINT_FORMAT) as setup:
        if cfg.batch_size > len(setup.data.y_train):
            raise RunError(f"--batch-size {cfg.batch_size} exceeds the {len(setup.data.y_train)} training images")
        size = tuple(setup.data.x_train.shape[-2:])
        if cfg.auxiliary_weight > 0 and size != (32, 32) and cfg.dataset != "imagenet":
            raise RunError(
                f"--auxiliary-weight needs 32x32 images (DARTS's auxiliary head), {cfg.dataset}'s are "
                f"{size[0]}x{size[1]}"
            )
        with process_group(setup.ddp, setup.device, run_threads(cfg, setup)):
            return Train(cfg, setup).run()


class Train(EpochRun):
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, cfg: TrainConfig, setup: Setup) -> None:
        super().__init__(cfg, setup)
        seed_everything(cfg.seed)
        self.net = build_network(cfg, self.data.num_classes, self.data.in_channels)
        self.size = network_size(self.net, tuple(self.data.x_train.shape[1:]))  # counted before compiling
        self.prepare_network()
        self.weight_params = [p for p in self.net.parameters() if p.requires_grad]
        self.networks = for_space(cfg.space)
        self.model = self.wrap_ddp(frozen=[], find_unused=self.networks.unused_parameters)
        self.init_weight_optimizer(nesterov=cfg.nesterov)
        self._step = self.step_runner(lambda batches: self.weight_step(batches, self._loss))
        if setup.ckpt is not None:
            self.restore(setup.ckpt)

    # ------------------------------------------------------------------ steps

    def _outputs(self, out: Any) -> tuple[Tensor, Tensor | None]:
        """(logits, auxiliary logits or None) of the network's output."""
        return self.networks.outputs(out)

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits, aux = self._outputs(self.model(x))
        smoothing = self.cfg.label_smoothing  # DARTS's CrossEntropyLabelSmooth: (1 - e) one-hot + e / K
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if aux is not None and self.cfg.auxiliary_weight > 0:
            loss = loss + self.cfg.auxiliary_weight * F.cross_entropy(aux, y, label_smoothing=smoothing)
        return loss, logits

    def epoch_lr(self, epoch: int) -> float:
        """The recipe's schedule (:func:`~fastnas.train.recipes.epoch_lr`; cosine: the engine's)."""
        return epoch_lr(self.cfg, epoch, cosine=super().epoch_lr(epoch))

    def cutout_mask(self, x: Tensor, gen: torch.Generator) -> Tensor | None:
        """Cutout (DARTS): one ``cutout`` x ``cutout`` square per image set to 0 (the mean), clipped at the border."""
        if not self.cfg.cutout:
            return None
        b, _, h, w = x.shape
        return data_mod.cutout(torch.ones(b, 1, h, w, device=x.device), self.cfg.cutout, gen).bool()

    def augments(self) -> bool:
        return self.data.augment or bool(self.cfg.cutout)

    # ------------------------------------------------------------------ epochs

    def header(self) -> str:
        cfg = self.cfg
        size = f"{self.size['params'] / 1e6:.3f} M parameters, {self.size['macs'] / 1e6:.2f} M multiply-adds"
        return f"fastnas train: {cfg.space} network ({size}), recipe {cfg.recipe}, {cfg.dataset}"

    def epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        lr = self.set_epoch_lr(epoch)
        if self.networks.drop_path:
            self.net.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        order = data_mod.epoch_order(torch.arange(len(self.data.y_train)), cfg.seed, epoch, stream=0)
        gen = data_mod.epoch_generator(cfg.seed, epoch, stream=2) if self.augments() else None
        steps = len(order) // cfg.batch_size
        if cfg.limit_batches is not None:
            steps = min(steps, cfg.limit_batches)

        batches = self.epoch_batches(order, steps, gen)

        def step(i: int) -> tuple[Tensor, int]:
            batch = batches[i]
            return self._step(batch), sum(len(y) for _, y in batch)

        self.net.train()
        train = self.train_steps(epoch, steps, step)
        forward = lambda x: self._outputs(self.model(x))[0]
        test_loss, test_acc, test_top5 = self.evaluate(
            self.net, self.data.x_test, self.data.y_test, self.eval_limit(), forward, top5=True
        )
        test = {"test_loss": test_loss, "test_acc": test_acc, "test_top5": test_top5}
        return {"epoch": epoch + 1, "lr": lr, **train, **test}

    def epoch_line(self, record: dict[str, Any]) -> str:
        return (
            f"epoch {record['epoch']}/{self.cfg.epochs}  lr {record['lr']:.4g}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
            f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}% top-5 {record['test_top5']:.2f}%  "
            f"{record['images_per_sec']:.0f} img/s"
        )

    def save_extra(self) -> None:
        atomic_write_text(os.path.join(self.cfg.out, "arch.txt"), self.cfg.arch + "\n")

    def on_stop(self) -> None:
        plot_curves(self.history, os.path.join(self.cfg.out, "curves.png"), f"{self.cfg.space}: {self.cfg.arch}")

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        last = self.history[-1]
        result: dict[str, Any] = {
            "arch": cfg.arch,
            "space": cfg.space,
            "dataset": cfg.dataset,
            "epochs_done": cfg.epochs,
            "finished": True,
            "test_acc": last["test_acc"],
            "test_top5": last.get("test_top5"),  # None for a run begun before top-5 was recorded
            "best_test_acc": max(h["test_acc"] for h in self.history),
            "train_acc": last["train_acc"],
            **self.size,
            "train_seconds": self.elapsed_seconds,
        }
        if self.is_main:
            self.log(
                f"test accuracy {result['test_acc']:.2f}% after {cfg.epochs} epochs "
                f"(best {result['best_test_acc']:.2f}%), {result['params']:,} parameters, "
                f"{result['macs']:,} multiply-adds"
            )
            atomic_write_json(os.path.join(cfg.out, "result.json"), result)
            self.on_stop()
        result["history"] = self.history
        return result
