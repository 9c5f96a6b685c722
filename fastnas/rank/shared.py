"""Shared-weight accuracy: a trained supernet restricted to one architecture.

The supernet is rebuilt with architecture weights used as given (``arch="simplex"``, no sampler),
loaded with the trained weights, and its architecture parameters set to the architecture's one-hot
weights: each edge then sums only its chosen op (``none``: nothing), which is the architecture
computed with the shared weights. Before each evaluation the BatchNorm statistics may be recomputed
on a few training batches (``bn_batches``; the supernet's running statistics mix every
architecture it trained), as the weight-sharing literature does: the statistics are reset and
averaged over those batches (``momentum=None``) in training mode, without gradients.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from fastnas.runs import data as data_mod
from fastnas.search.algorithms import Algorithm
from fastnas.search.config import SearchConfig
from fastnas.search.loop import build_network
from fastnas.spaces import get_space


def restrictable_supernet(
    cfg: SearchConfig, alg: Algorithm, num_classes: int, in_channels: int, state: dict[str, Tensor]
) -> nn.Module:
    """The supernet of ``cfg`` with the trained ``state``, its architecture weights used as given."""
    net = build_network(cfg, dataclasses.replace(alg, arch="simplex", sampler=None), num_classes, in_channels)
    net.load_state_dict(state)
    for p in net.arch_parameters():
        p.requires_grad_(False)
    return net


def candidates(space: str, net: nn.Module, count: int, gen: torch.Generator, pool: list[str] | None = None):
    """``count`` distinct architectures as ``(string, one-hot weights per arch parameter)``: drawn from
    ``pool`` (strings of the space) when given, else uniformly from the space."""
    return get_space(space).candidates(net, count, gen, pool)


@torch.no_grad()
def set_architecture(net: nn.Module, weights: list[Tensor]) -> None:
    for p, w in zip(net.arch_parameters(), weights):
        p.copy_(w.to(p.device))


@torch.no_grad()
def recompute_bn_statistics(net: nn.Module, batches: list[Tensor]) -> None:
    """Reset every BatchNorm's running statistics and average them over ``batches`` (normalised images)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    try:
        for x in batches:
            net(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        net.eval()


@torch.no_grad()
def shared_accuracy(
    net: nn.Module,
    weights: list[Tensor],
    data: data_mod.ImageData,
    bn_batches: list[Tensor],
    limit: int | None = None,
) -> float:
    """Test accuracy (%) of ``net`` restricted to ``weights`` (BatchNorm statistics recomputed on
    ``bn_batches`` when there are any), on the first ``limit`` test images (all: None)."""
    set_architecture(net, weights)
    if bn_batches:
        recompute_bn_statistics(net, bn_batches)
    net.eval()
    n = len(data.y_test) if limit is None else min(limit, len(data.y_test))
    correct = 0
    for chunk in torch.arange(n, device=data.y_test.device).split(256):
        logits = net(data.normalize(data.x_test[chunk]))
        correct += int((logits.argmax(-1) == data.y_test[chunk]).sum())
    return 100.0 * correct / max(n, 1)


def bn_batches(data: data_mod.ImageData, count: int, batch_size: int, seed: int) -> list[Tensor]:
    """``count`` normalised training batches in a seeded order (the same for every architecture)."""
    order = data_mod.epoch_order(torch.arange(len(data.y_train)), seed, 0, stream=4).to(data.y_train.device)
    count = min(count, len(order) // batch_size)
    return [data.normalize(data.x_train[order[i * batch_size : (i + 1) * batch_size]]) for i in range(count)]
