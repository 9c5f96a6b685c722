"""The ImageNet recipes of ``fastnas train``: their values, their learning-rate schedules against the
papers' formulas, label smoothing against DARTS's CrossEntropyLabelSmooth, and their checks."""

from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import torch
from train_helpers import DARTS_ARCH, NB201_ARCH

from fastnas.runs.config import RunError
from fastnas.train import TrainConfig
from fastnas.train.loop import Train
from fastnas.train.recipes import RECIPES, epoch_lr, resolve


def _imagenet(**kw) -> TrainConfig:
    return resolve(TrainConfig(arch=DARTS_ARCH, dataset="imagenet", **kw))


def test_recipe_values():
    darts = _imagenet()  # the default recipe on imagenet
    assert darts.recipe == "darts-imagenet"
    assert {k: getattr(darts, k) for k in RECIPES["darts-imagenet"]} == RECIPES["darts-imagenet"]
    assert (darts.epochs, darts.batch_size, darts.lr, darts.lr_schedule, darts.lr_decay) == (
        250,
        128,
        0.1,
        "exponential",
        0.97,
    )
    assert (darts.weight_decay, darts.label_smoothing, darts.auxiliary_weight, darts.grad_clip) == (3e-5, 0.1, 0.4, 5.0)
    assert (darts.channels, darts.cells, darts.crop_size, darts.color_jitter) == (48, 14, 224, "0.4,0.4,0.4,0.2")
    pc = _imagenet(recipe="pc-darts-imagenet")
    assert (pc.batch_size, pc.lr, pc.lr_schedule, pc.warmup_epochs, pc.lr_decay) == (1024, 0.5, "linear", 5, None)
    assert (pc.label_smoothing, pc.auxiliary_weight, pc.weight_decay) == (0.1, 0.4, 3e-5)
    flags = _imagenet(recipe="pc-darts-imagenet", batch_size=256, warmup_epochs=0, color_jitter="0", crop_size=160)
    assert (flags.batch_size, flags.warmup_epochs, flags.color_jitter, flags.crop_size) == (256, 0, "0", 160)
    assert _imagenet(lr_schedule="cosine").lr_decay is None  # the recipe's decay goes with its schedule
    cifar = resolve(TrainConfig(arch=DARTS_ARCH, dataset="cifar10", recipe="darts-imagenet"))
    assert cifar.crop_size is None and cifar.color_jitter is None and cifar.label_smoothing == 0.1
    old = resolve(TrainConfig(arch=DARTS_ARCH, dataset="cifar10"))
    assert (old.lr_schedule, old.warmup_epochs, old.label_smoothing, old.lr_decay) == ("cosine", 0, 0.0, None)


def _darts_step_lr(cfg, epoch: int) -> float:
    """DARTS's train_imagenet.py: StepLR(optimizer, 1, gamma=0.97) stepped at each epoch's start."""
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=cfg.lr_decay)
    for _ in range(epoch):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def _pc_darts_lr(cfg, epoch: int) -> float:
    """PC-DARTS's train_imagenet.py: adjust_lr (linear), then the warm-up for batches above 256."""
    if cfg.epochs - epoch > 5:
        lr = cfg.lr * (cfg.epochs - 5 - epoch) / (cfg.epochs - 5)
    else:
        lr = cfg.lr * (cfg.epochs - epoch) / ((cfg.epochs - 5) * 5)
    if epoch < 5 and cfg.batch_size > 256:
        lr = cfg.lr * (epoch + 1) / 5.0
    return lr


def test_schedules_follow_the_papers():
    darts = _imagenet()
    for epoch in (0, 1, 7, 249):
        assert epoch_lr(darts, epoch, cosine=math.nan) == pytest.approx(_darts_step_lr(darts, epoch), rel=1e-12)
    pc = _imagenet(recipe="pc-darts-imagenet")
    for epoch in (0, 3, 4, 5, 100, 244, 245, 249):
        assert epoch_lr(pc, epoch, cosine=math.nan) == pytest.approx(_pc_darts_lr(pc, epoch), rel=1e-12)
    assert epoch_lr(resolve(TrainConfig(arch=DARTS_ARCH)), 3, cosine=0.123) == 0.123  # cosine: the engine's
    warm = dataclasses.replace(darts, warmup_epochs=2)
    assert [epoch_lr(warm, e, math.nan) for e in (0, 1, 2)] == [0.05, 0.1, pytest.approx(0.1 * 0.97**2)]


def test_label_smoothing_is_darts_s():
    """Train's loss: DARTS's CrossEntropyLabelSmooth on both heads, the auxiliary one weighted."""
    torch.manual_seed(0)
    logits, aux = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))

    def darts_smooth(z, eps=0.1):
        targets = (1 - eps) * torch.nn.functional.one_hot(y, 10) + eps / 10
        return (-targets * z.log_softmax(1)).mean(0).sum()

    fake = SimpleNamespace(
        cfg=SimpleNamespace(label_smoothing=0.1, auxiliary_weight=0.4),
        model=lambda x: (logits, aux),
        _outputs=lambda out: out,
    )
    loss, out = Train._loss(fake, None, y)
    assert out is logits
    torch.testing.assert_close(loss, darts_smooth(logits) + 0.4 * darts_smooth(aux), rtol=1e-6, atol=1e-6)


def test_bad_values():
    cases = {
        "--lr-schedule exponential needs --lr-decay": dict(recipe="pc-darts-imagenet", lr_schedule="exponential"),
        "unknown --lr-schedule 'step'": dict(lr_schedule="step"),
        "--lr-decay applies to --lr-schedule exponential, not linear": dict(lr_schedule="linear", lr_decay=0.9),
        "--label-smoothing must lie in [0, 1)": dict(label_smoothing=1.0),
        "--warmup-epochs must be at least 0": dict(warmup_epochs=-1),
        "--crop-size must be at least 8": dict(crop_size=4),
        "--color-jitter must be four numbers": dict(color_jitter="0.4"),
        "--cutout applies to the in-memory data sets": dict(cutout=16),
    }
    for message, kw in cases.items():
        with pytest.raises(RunError, match=re.escape(message)):
            resolve(TrainConfig(arch=DARTS_ARCH, dataset="imagenet", **kw))
    with pytest.raises(RunError, match="NetworkImageNet: give a DARTS Genotype"):
        resolve(TrainConfig(arch=NB201_ARCH, dataset="imagenet"))
    with pytest.raises(RunError, match="--color-jitter applies to --dataset imagenet"):
        resolve(TrainConfig(arch=NB201_ARCH, dataset="cifar10", color_jitter="0.4,0.4,0.4,0.1"))
