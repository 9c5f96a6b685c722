"""Straightforward eager evaluation networks: the oracle of the tests of :mod:`fastnas.networks`.

Written the way DARTS's ``cnn/model.py`` (``NetworkCIFAR``, ``NetworkImageNet``) and xautodl's ``TinyNetwork`` with
``InferCell`` compute: every op an ``nn.Module`` built on its own, ``none`` a real zero tensor that is
summed, drop path drawn and applied in place as DARTS does, architectures parsed here from their
strings. Module names are the reference code's, so these networks and :mod:`fastnas.networks` load
each other's state_dicts.
"""

from __future__ import annotations

import torch
from eager_supernets import (
    EagerDartsFactorizedReduce,
    EagerIdentity,
    EagerResBlock,
    EagerSeq,
    EagerZero,
    _dil,
    _relu_conv_bn,
    _sep,
    nb201_op,
)
from torch import Tensor, nn

# --------------------------------------------------------------------------- DARTS


def darts_eval_op(name: str, C: int, stride: int) -> nn.Module:
    """An op of DARTS's ``operations.py`` with ``affine=True``, as a genotype's cell builds it."""
    if name == "none":
        return EagerZero(stride)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "skip_connect":
        return EagerIdentity() if stride == 1 else EagerDartsFactorizedReduce(C, C, affine=True)
    if name.startswith("sep_conv_"):
        k = int(name[-1])
        return _sep(C, k, stride, k // 2, affine=True)
    if name.startswith("dil_conv_"):
        k = int(name[-1])
        return _dil(C, k, stride, k - 1, 2, affine=True)
    if name == "conv_7x1_1x7":
        return nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(C, affine=True),
        )
    raise ValueError(name)


def eager_drop_path(x: Tensor, drop_prob: float) -> Tensor:
    keep_prob = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
    x.div_(keep_prob)
    x.mul_(mask)
    return x


class EagerEvalCell(nn.Module):
    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = EagerDartsFactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = EagerSeq(_relu_conv_bn(C_prev_prev, C, 1, 1, 0, affine=True))
        self.preprocess1 = EagerSeq(_relu_conv_bn(C_prev, C, 1, 1, 0, affine=True))
        gene = genotype.reduce if reduction else genotype.normal
        self._concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList(darts_eval_op(name, C, 2 if reduction and j < 2 else 1) for name, j in gene)
        self._indices = [j for _, j in gene]

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self._ops) // 2):
            op1, op2 = self._ops[2 * i], self._ops[2 * i + 1]
            h1 = op1(states[self._indices[2 * i]])
            h2 = op2(states[self._indices[2 * i + 1]])
            if self.training and drop_prob > 0.0:
                if not isinstance(op1, EagerIdentity):
                    h1 = eager_drop_path(h1, drop_prob)
                if not isinstance(op2, EagerIdentity):
                    h2 = eager_drop_path(h2, drop_prob)
            states.append(h1 + h2)
        return torch.cat([states[i] for i in self._concat], dim=1)


class EagerAuxiliaryHead(nn.Module):
    """DARTS's AuxiliaryHeadCIFAR (``imagenet``: AuxiliaryHeadImageNet, pool stride 2 and no BatchNorm
    after the 2x2 conv); maps other than 8-10 (7-8) pixels are pooled adaptively to 2x2."""

    def __init__(self, C: int, num_classes: int, imagenet: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            *([] if imagenet else [nn.BatchNorm2d(768)]),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)
        self.sizes = (7, 8) if imagenet else (8, 9, 10)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2] in self.sizes and x.shape[3] in self.sizes:
            x = self.features(x)
        else:
            x = nn.Sequential(self.features[0], nn.AdaptiveAvgPool2d(2), *self.features[2:])(x)
        return self.classifier(x.view(x.size(0), -1))


class EagerNetworkCIFAR(nn.Module):
    def __init__(self, C, num_classes, layers, auxiliary, genotype, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        self._build(num_classes, layers, auxiliary, genotype, 3 * C, C, reduction_prev=False, imagenet=False)

    def _build(self, num_classes, layers, auxiliary, genotype, C_stem, C_curr, reduction_prev, imagenet):
        """The cells (after the stems), the auxiliary head, the pooling and the classifier."""
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = 0.0
        C_prev_prev, C_prev = C_stem, C_stem
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in [layers // 3, 2 * layers // 3]
            if reduction:
                C_curr *= 2
            cell = EagerEvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
        if auxiliary:
            self.auxiliary_head = EagerAuxiliaryHead(C_aux, num_classes, imagenet=imagenet)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def _stems(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.stem(x)
        return s, s

    def forward(self, x: Tensor):
        logits_aux = None
        s0, s1 = self._stems(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1)), logits_aux


class EagerNetworkImageNet(EagerNetworkCIFAR):
    """DARTS's NetworkImageNet: the two stems rectify in place as DARTS's do (``stem1`` the output of
    ``stem0``, which the first cell reads); global average pooling at any size (DARTS: 7x7)."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, in_channels=3):
        nn.Module.__init__(self)
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True), nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C),
        )  # fmt: skip
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        self._build(num_classes, layers, auxiliary, genotype, C, C, reduction_prev=True, imagenet=True)

    def _stems(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)  # s0 rectified in place by stem1


# --------------------------------------------------------------------------- NAS-Bench-201


def parse_nb201(arch: str) -> list[list[tuple[str, int]]]:
    return [
        [(op, int(j)) for op, j in (item.split("~") for item in node.strip("|").split("|"))] for node in arch.split("+")
    ]


class EagerInferCell(nn.Module):
    def __init__(self, arch: str, C: int):
        super().__init__()
        self.layers = nn.ModuleList()
        self.inputs: list[list[tuple[int, int]]] = []  # per node: (layer index, input node)
        for node in parse_nb201(arch):
            self.inputs.append([])
            for op, j in node:
                self.inputs[-1].append((len(self.layers), j))
                self.layers.append(nb201_op(op, C, affine=True, trs=True))
        self.out_dim = C

    def forward(self, x: Tensor) -> Tensor:
        nodes = [x]
        for node in self.inputs:
            nodes.append(sum(self.layers[k](nodes[j]) for k, j in node))
        return nodes[-1]


class EagerTinyNetwork(nn.Module):
    def __init__(self, C: int, N: int, arch: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, C_curr in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                self.cells.append(EagerResBlock(C_prev, C_curr))
            self.cells.extend(EagerInferCell(arch, C_curr) for _ in range(N))
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: Tensor):
        for m in (self.stem, *self.cells):
            x = m(x)
        out = self.global_pooling(self.lastact(x))
        out = out.view(out.size(0), -1)
        return out, self.classifier(out)
