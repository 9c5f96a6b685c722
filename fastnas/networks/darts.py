"""DARTS's evaluation networks (Liu et al., ICLR 2019): a genotype's cells stacked and trained from scratch.

Drop-ins for ``NetworkCIFAR`` and ``NetworkImageNet`` of DARTS's ``cnn/model.py`` (quark0/darts;
PC-DARTS and GAEA train their genotypes with the same file): same constructors, same parameters in
the same order, same state_dict keys, so checkpoints load both ways, and the same forward
(``(logits, logits_aux)``, drop path on the non-identity ops in training mode). The candidate ops are those of
:mod:`fastnas.spaces.darts` with ``affine=True``, plus DARTS's ``sep_conv_7x7`` and
``conv_7x1_1x7`` (used by the NASNet and AmoebaNet genotypes).

Input: ``[B, in_channels, H, W]`` with ``H`` and ``W`` divisible by ``2 ** (number of reduction
cells)`` (4 for three or more layers: the factorized reductions halve the resolution twice); CIFAR's
32x32 and 8x8 digits both work. The auxiliary head is DARTS's for the 8x8 feature maps of a 32x32
input; at other resolutions it average-pools to 2x2 adaptively, with the same parameters. Float32 and
16-bit CPU inputs run in channels_last (as the supernets do: oneDNN is faster in NHWC there).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.networks.common import TrainedNetworks, check_input
from fastnas.spaces import darts as space
from fastnas.spaces.darts import FactorizedReduce, Genotype, ReLUConvBN, SepConv, parse_genotype
from fastnas.spaces.ops import Identity, to_preferred_layout

__all__ = [
    "OPS",
    "GENOTYPES",
    "Cell",
    "AuxiliaryHeadCIFAR",
    "AuxiliaryHeadImageNet",
    "NetworkCIFAR",
    "NetworkImageNet",
    "drop_path",
    "as_genotype",
]

OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    **space.OPS,
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "conv_7x1_1x7": lambda C, stride, affine: nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    ),
}

# Genotypes the papers report on CIFAR-10 (DARTS first and second order; PC-DARTS).
# fmt: off
GENOTYPES: dict[str, Genotype] = {
    "DARTS_V1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "DARTS_V2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "PC_DARTS": Genotype(
        normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
                ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        normal_concat=range(2, 6),
        reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
        reduce_concat=range(2, 6),
    ),
}
# fmt: on


def as_genotype(genotype: Any) -> Genotype:
    """A :class:`~fastnas.spaces.darts.Genotype` from a Genotype (fastnas's, DARTS's or any object with
    the fields ``normal normal_concat reduce reduce_concat``), its ``str()``, or a name of
    :data:`GENOTYPES`. Checks every op name and input index; raises ValueError naming ``genotype``."""
    if isinstance(genotype, str):
        text = genotype.strip()
        if text in GENOTYPES:
            genotype = GENOTYPES[text]
        else:
            try:
                genotype = parse_genotype(text)
            except ValueError as exc:
                raise ValueError(
                    f"genotype is neither one of {sorted(GENOTYPES)} nor a Genotype string: {exc}"
                ) from None
    try:
        fields = {name: getattr(genotype, name) for name in Genotype._fields}
    except AttributeError:
        raise TypeError(
            f"genotype must be a Genotype, its string or one of {sorted(GENOTYPES)}, got {type(genotype).__name__}"
        ) from None
    for kind in ("normal", "reduce"):
        gene = [tuple(pair) for pair in fields[kind]]
        if not gene or len(gene) % 2:
            raise ValueError(f"genotype.{kind} must list two (op, input) pairs per node, got {len(gene)} pairs")
        for k, (op, j) in enumerate(gene):
            if op not in OPS:
                raise ValueError(f"genotype.{kind} has the unknown op {op!r}; known: {sorted(OPS)}")
            if not isinstance(j, int) or not 0 <= j < 2 + k // 2:
                raise ValueError(f"genotype.{kind}: node {k // 2} takes input {j!r}, not one of its earlier states")
        concat = list(fields[f"{kind}_concat"])
        if not concat or any(not isinstance(i, int) or not 0 <= i < 2 + len(gene) // 2 for i in concat):
            raise ValueError(f"genotype.{kind}_concat must index the cell's states, got {concat}")
        fields[kind] = gene
    return Genotype(**fields)


def drop_path(x: Tensor, drop_prob: float) -> Tensor:
    """DARTS's drop path: each sample's ``x`` zeroed with probability ``drop_prob``, kept ones divided
    by ``1 - drop_prob``; the mask is ``[B, 1, 1, 1]`` Bernoulli draws from torch's default generator
    (on ``x``'s device). Out of place (DARTS scales in place; the values are identical)."""
    if drop_prob <= 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob)
    return x.div(keep_prob).mul(mask)


class Cell(nn.Module):
    """A cell of a genotype: drop-in for ``Cell`` of DARTS's ``model.py``.

    Two preprocessed inputs (``preprocess0``: a FactorizedReduce after a reduction cell, else a 1x1
    ReLUConvBN; ``preprocess1``: a 1x1 ReLUConvBN), then per node the sum of two ops
    (``_ops.{2i}``, ``_ops.{2i+1}``) on the states ``_indices``; the output concatenates the states
    of the genotype's concat list (``multiplier`` of them). In a reduction cell the ops reading
    the cell inputs have stride 2.
    """

    def __init__(
        self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool
    ):
        super().__init__()
        genotype = as_genotype(genotype)
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        gene, concat = (
            (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        )
        self._steps = len(gene) // 2
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList(OPS[name](C, 2 if reduction and j < 2 else 1, True) for name, j in gene)
        self._indices = tuple(j for _, j in gene)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float) -> Tensor:
        """``s0``, ``s1``: the two previous cells' outputs; ``drop_prob``: drop-path probability, used in
        training mode on every op that is not an identity. Returns ``[B, multiplier * C, H', W']``."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        drop = self.training and drop_prob > 0.0
        for i in range(self._steps):
            node = None
            for k in (2 * i, 2 * i + 1):  # the two ops in DARTS's order (their drop masks drawn in it)
                op = self._ops[k]
                h = op(states[self._indices[k]])
                if drop and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                node = h if node is None else node + h
            states.append(node)
        return torch.cat([states[i] for i in self._concat], dim=1)


class _AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifiers: ReLU, 5x5 average pool at ``stride``, 1x1 conv to 128 channels,
    BatchNorm, ReLU, 2x2 conv to 768, (BatchNorm,) ReLU, linear (``features.*``, ``classifier``).

    DARTS's pool turns the map it was written for into 2x2. At a size it does not, the map is
    average-pooled adaptively to 2x2 instead, so the parameters and the output ``[B, num_classes]``
    are the same for every input size.
    """

    def __init__(self, C: int, num_classes: int, stride: int, batchnorm_768: bool):
        super().__init__()
        layers = [
            nn.ReLU(inplace=False),  # DARTS rectifies its input in place; not here (see NetworkCIFAR)
            nn.AvgPool2d(5, stride=stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *([nn.BatchNorm2d(768)] if batchnorm_768 else []),
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features[0](x)
        H, W = x.shape[-2:]
        stride = self.features[1].stride
        if (H - 5) // stride + 1 == 2 and (W - 5) // stride + 1 == 2:
            x = self.features[1](x)
        else:
            x = F.adaptive_avg_pool2d(x, 2)
        for m in self.features[2:]:
            x = m(x)
        return self.classifier(x.flatten(1))


class AuxiliaryHeadCIFAR(_AuxiliaryHead):
    """DARTS's CIFAR auxiliary classifier, for the 8x8 map of a 32x32 input (pool stride 3; 8 to 10
    pixel maps pool to 2x2 so, any other size adaptively): see :class:`_AuxiliaryHead`."""

    def __init__(self, C: int, num_classes: int):
        super().__init__(C, num_classes, stride=3, batchnorm_768=True)


class AuxiliaryHeadImageNet(_AuxiliaryHead):
    """DARTS's ImageNet auxiliary classifier, for the 7x7 map of a 224x224 input (pool stride 2; 7 and
    8 pixel maps pool to 2x2 so, any other size adaptively), without the BatchNorm after the 2x2 conv
    (DARTS leaves it out, as in the paper's runs): see :class:`_AuxiliaryHead`."""

    def __init__(self, C: int, num_classes: int):
        super().__init__(C, num_classes, stride=2, batchnorm_768=False)


class _CellStack(nn.Module):
    """What DARTS's two evaluation networks share: their cells and the way they run them."""

    def _setup(self, layers: int, auxiliary: bool, genotype: Any, in_channels: int) -> Genotype:
        """The settings every network keeps; the checked genotype."""
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self._layers = layers
        self._auxiliary = auxiliary
        self.in_channels = in_channels
        self.drop_path_prob = 0.0  # set per epoch by the training loop
        return as_genotype(genotype)

    def _build_cells(
        self, genotype: Genotype, layers: int, C_prev_prev: int, C_prev: int, C_curr: int, reduction_prev: bool
    ) -> tuple[int, int]:
        """``self.cells``: ``layers`` cells, reductions (twice the channels) at ``layers // 3`` and
        ``2 * layers // 3``; returns the channels of the last cell and of cell ``2 * layers // 3``."""
        self.cells = nn.ModuleList()
        C_to_auxiliary = C_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        self._reductions = len({layers // 3, 2 * layers // 3})
        return C_prev, C_to_auxiliary

    def _run_cells(self, s0: Tensor, s1: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last cell's output and the auxiliary logits (None in eval mode or without the head)."""
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        return s1, logits_aux


class NetworkCIFAR(_CellStack):
    """DARTS's CIFAR evaluation network: drop-in for ``NetworkCIFAR`` of DARTS's ``model.py``.

    A 3x3 conv stem to ``3 * C`` channels, ``layers`` cells of ``genotype`` (reduction cells, which
    double the channels and halve the resolution, at ``layers // 3`` and ``2 * layers // 3``), global
    average pooling and a linear classifier; with ``auxiliary`` an :class:`AuxiliaryHeadCIFAR` on the
    output of cell ``2 * layers // 3``.

    Args:
        C: channels of the first cells.
        num_classes: classifier outputs.
        layers: number of cells.
        auxiliary: build the auxiliary head (its logits are returned in training mode).
        genotype: a :class:`~fastnas.spaces.darts.Genotype` (or any object with its fields), its string,
            or a name of :data:`GENOTYPES` (``"DARTS_V2"``, ...).
        in_channels: image channels (keyword only; DARTS's is 3).

    ``drop_path_prob`` (0 until set, as DARTS's training script sets it every epoch) is the drop-path
    probability used in training mode.

    ``forward(x)`` takes ``[B, in_channels, H, W]`` (``H``, ``W`` divisible by ``2 ** len(reduction
    cells)``, see the module docstring) and returns ``(logits, logits_aux)``, both ``[B, num_classes]``;
    ``logits_aux`` is None in evaluation mode or without the auxiliary head.

    One difference from DARTS, for ``layers <= 3`` only: DARTS's auxiliary head rectifies its input
    in place, which there (the head on the last cell) also rectifies the classifier's input in
    training mode; here the head leaves its input alone.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Any, *, in_channels: int = 3):
        super().__init__()
        genotype = self._setup(layers, auxiliary, genotype, in_channels)

        stem_multiplier = 3
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev, C_to_auxiliary = self._build_cells(genotype, layers, C_curr, C_curr, C, reduction_prev=False)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_to_auxiliary, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        check_input(input, self.in_channels, 2**self._reductions)
        s = to_preferred_layout(self.stem(to_preferred_layout(input)))
        s, logits_aux = self._run_cells(s, s)
        return self.classifier(self.global_pooling(s).flatten(1)), logits_aux


class NetworkImageNet(_CellStack):
    """DARTS's ImageNet evaluation network (the mobile setting): drop-in for ``NetworkImageNet`` of
    DARTS's ``model.py``.

    Two stems: ``stem0``, 3x3 convolutions at stride 2 to ``C // 2`` and then ``C`` channels (with
    BatchNorm, a ReLU between), and ``stem1``, ReLU, a third stride-2 3x3 convolution and BatchNorm:
    224x224 images reach the cells at 28x28, the first cell reading ``stem0``'s 56x56 output through
    a factorized reduction. Then ``layers`` cells of ``genotype`` (reductions at ``layers // 3`` and
    ``2 * layers // 3``), global average pooling (DARTS's 7x7 pool on the 7x7 map of a 224 input;
    adaptive, the same there, at other sizes) and a linear classifier; with ``auxiliary`` an
    :class:`AuxiliaryHeadImageNet` on the 7x7 output of cell ``2 * layers // 3``.

    Args, ``drop_path_prob`` and ``forward`` as :class:`NetworkCIFAR`'s; ``H`` and ``W`` must be
    divisible by ``8 * 2 ** len(reduction cells)`` (32: 224 is 7 times that). DARTS's stems rectify
    their input in place, which changes nothing but DARTS's copy of ``stem0``'s output, rectified
    again by the first cell; here nothing is done in place.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Any, *, in_channels: int = 3):
        super().__init__()
        genotype = self._setup(layers, auxiliary, genotype, in_channels)

        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=False),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        C_prev, C_to_auxiliary = self._build_cells(genotype, layers, C, C, C, reduction_prev=True)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_to_auxiliary, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        check_input(input, self.in_channels, 8 * 2**self._reductions)
        s0 = to_preferred_layout(self.stem0(to_preferred_layout(input)))
        s1 = to_preferred_layout(self.stem1(s0))
        s, logits_aux = self._run_cells(s0, s1)
        return self.classifier(self.global_pooling(s).flatten(1)), logits_aux


class DartsNetworks(TrainedNetworks):
    """The DARTS space's trained networks: :class:`NetworkCIFAR`, and :class:`NetworkImageNet` on ImageNet."""

    space = "darts"
    drop_path = True
    imagenet = True

    def build(self, arch, *, channels, cells, num_classes, in_channels, auxiliary, imagenet=False) -> nn.Module:
        cls = NetworkImageNet if imagenet else NetworkCIFAR
        return cls(channels, num_classes, cells, auxiliary, parse_genotype(arch), in_channels=in_channels)

    def outputs(self, out) -> tuple[Tensor, Tensor | None]:
        return out[0], out[1]


TRAINED = DartsNetworks()
