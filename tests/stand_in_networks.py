"""A stand-in for ``fastnas.networks`` with its interface, until that package is merged: the search
supernets with fixed one-hot architecture weights (the same functions as the inferred networks, with
every op computed). Installed by the ``networks`` fixture of train_helpers only where the real package is
missing."""

from __future__ import annotations

import types

import torch
from torch import nn

from fastnas.spaces import darts as darts_space
from fastnas.spaces import nb201 as nb201_space


def _fix(net: nn.Module, rows: list[torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for p, w in zip(net.arch_parameters(), rows):
            p.copy_(w)
            p.requires_grad_(False)
    return net


class TinyNetwork(nn.Module):
    def __init__(self, C: int, N: int, genotype, num_classes: int, in_channels: int = 3):
        super().__init__()
        nodes = nb201_space.parse_arch_string(genotype) if isinstance(genotype, str) else genotype
        self.body = nb201_space.Network(C, N, num_classes, in_channels=in_channels, arch="simplex")
        w = torch.zeros(6, 5)
        for i, node in enumerate(nodes, start=1):
            for op, j in node:
                w[self.body.edge2index[f"{i}<-{j}"], nb201_space.PRIMITIVES.index(op)] = 1.0
        _fix(self.body, [w])

    def forward(self, x):
        logits = self.body(x)
        return logits, logits


class NetworkCIFAR(nn.Module):
    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype, in_channels: int = 3):
        super().__init__()
        self.body = darts_space.Network(C, num_classes, layers, in_channels=in_channels, arch="simplex")
        rows = []
        for genes in (genotype.normal, genotype.reduce):
            w = torch.zeros(14, 8)
            w[:, 0] = 1.0
            start = 0
            for node in range(4):
                for op, j in genes[2 * node : 2 * node + 2]:
                    w[start + j] = 0.0
                    w[start + j, darts_space.PRIMITIVES.index(op)] = 1.0
                start += node + 2
            rows.append(w)
        _fix(self.body, rows)
        self.auxiliary = nn.Linear(1, num_classes) if auxiliary else None
        self.drop_path_prob = 0.0

    def forward(self, x):
        logits = self.body(x)
        aux = self.auxiliary(logits[:, :1]) if self.auxiliary is not None and self.training else None
        return logits, aux


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "auxiliary" not in n and p.requires_grad)


def count_macs(model: nn.Module, input_size) -> int:
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() // output.shape[0] * module.in_channels // module.groups * module.kernel_size[0] ** 2
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


module = types.ModuleType("fastnas.networks")
module.darts = types.SimpleNamespace(NetworkCIFAR=NetworkCIFAR)
module.nb201 = types.SimpleNamespace(TinyNetwork=TinyNetwork)
module.count_parameters = count_parameters
module.count_macs = count_macs
