"""NAS-Bench-201's network for one architecture (Dong & Yang, ICLR 2020), trained from scratch.

A drop-in for xautodl's ``TinyNetwork`` with its ``InferCell`` (``xautodl/models/cell_infers``), the
network NAS-Bench-201's accuracies, parameter counts and FLOPs were measured on: same constructor,
same parameters in the same order, same state_dict keys (checkpoints load both ways), same forward
(``(features, logits)``). The ops are those of :mod:`fastnas.spaces.nb201` (``affine=True``); ``none``
ops are kept as modules (no parameters) but not computed: they add zero.

Input: ``[B, in_channels, H, W]`` with ``H`` and ``W`` divisible by 4 (two residual reductions, each
needing an even size for its shortcut); CIFAR's 32x32, ImageNet16-120's 16x16 and 8x8 digits work.
Float32 and 16-bit CPU inputs run in channels_last (as the supernets do). ``avg_pool_3x3`` is the
spaces' :func:`fastnas.ops.avg_pool.avg_pool2d`: on CPU its forward equals xautodl's pooling bit for
bit, its backward up to rounding.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fastnas.networks.common import TrainedNetworks, check_input
from fastnas.spaces.nb201 import OPS, ResNetBasicblock, format_arch_string, parse_arch_string
from fastnas.spaces.ops import Zero, to_preferred_layout

__all__ = ["InferCell", "TinyNetwork", "as_nodes"]

Nodes = tuple[tuple[tuple[str, int], ...], ...]


def as_nodes(genotype: Any) -> Nodes:
    """The nodes ``((("op", j), ...), ...)`` of a NAS-Bench-201 string, of xautodl's ``Structure`` (its
    ``nodes``), or of the nodes themselves (as :func:`~fastnas.spaces.nb201.parse_arch_string` returns
    them). Raises ValueError naming ``genotype`` for an unknown op or an input that is not an earlier node."""
    if isinstance(genotype, str):
        return parse_arch_string(genotype)
    nodes = getattr(genotype, "nodes", genotype)
    try:
        nodes = tuple(tuple((str(op), int(j)) for op, j in node) for node in nodes)
    except (TypeError, ValueError):
        raise TypeError(
            f"genotype must be a NAS-Bench-201 string, a Structure or its nodes, got {type(genotype).__name__}"
        ) from None
    if not nodes:
        raise ValueError("genotype has no nodes")
    for i, node in enumerate(nodes, start=1):
        if not node:
            raise ValueError(f"genotype: node {i} has no inputs")
        for op, j in node:
            if op not in OPS:
                raise ValueError(f"genotype: node {i} has the unknown op {op!r}; known: {sorted(OPS)}")
            if not 0 <= j < i:
                raise ValueError(f"genotype: node {i} takes input {j}, which is not an earlier node")
    return nodes


class InferCell(nn.Module):
    """A NAS-Bench-201 cell of one architecture: drop-in for xautodl's ``InferCell``.

    Node ``i`` is the sum of its listed ops (``layers.{k}``, in the architecture's order) applied to
    earlier nodes; node 0 is the input, the output is the last node. ``node_IX`` / ``node_IN`` hold,
    per node, the layer indices and their input nodes, as xautodl's.

    Args:
        genotype: see :func:`as_nodes`.
        C_in, C_out: channels of the input and of every node.
        stride: of the ops reading the input.
        affine, track_running_stats: of the BatchNorms.
    """

    def __init__(
        self, genotype: Any, C_in: int, C_out: int, stride: int, affine: bool = True, track_running_stats: bool = True
    ):
        super().__init__()
        self.genotype = as_nodes(genotype)
        self.layers = nn.ModuleList()
        self.node_IN: list[list[int]] = []
        self.node_IX: list[list[int]] = []
        for node in self.genotype:
            self.node_IX.append([])
            self.node_IN.append([])
            for op_name, j in node:
                if j == 0:
                    layer = OPS[op_name](C_in, C_out, stride, affine, track_running_stats)
                else:
                    layer = OPS[op_name](C_out, C_out, 1, affine, track_running_stats)
                self.node_IX[-1].append(len(self.layers))
                self.node_IN[-1].append(j)
                self.layers.append(layer)
        self.nodes = len(self.genotype) + 1
        self.in_dim = C_in
        self.out_dim = C_out

    def extra_repr(self) -> str:
        return f"info :: nodes={self.nodes}, inC={self.in_dim}, outC={self.out_dim}, {self.arch_string()}"

    def arch_string(self) -> str:
        """The cell's NAS-Bench-201 string."""
        return format_arch_string(self.genotype)

    def forward(self, inputs: Tensor) -> Tensor:
        nodes = [inputs]
        for node_layers, node_inputs in zip(self.node_IX, self.node_IN):
            node = None
            for il, ii in zip(node_layers, node_inputs):
                if isinstance(self.layers[il], Zero):
                    continue
                h = self.layers[il](nodes[ii])
                node = h if node is None else node + h
            if node is None:  # only 'none' ops: a zero tensor of the op's output shape
                node = self.layers[node_layers[0]](nodes[node_inputs[0]])
            nodes.append(node)
        return nodes[-1]


class TinyNetwork(nn.Module):
    """NAS-Bench-201's network of one architecture: drop-in for xautodl's ``TinyNetwork``.

    A 3x3 conv stem to ``C`` channels, three stages of ``N`` :class:`InferCell` at ``C``, ``2C`` and
    ``4C`` channels separated by residual reduction blocks (stride 2), BatchNorm + ReLU, global
    average pooling and a linear classifier.

    Args:
        C: channels of the first stage (NAS-Bench-201: 16).
        N: cells per stage (NAS-Bench-201: 5).
        genotype: the architecture, see :func:`as_nodes` (a string like
            ``|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|``).
        num_classes: classifier outputs.
        in_channels: image channels (keyword only; xautodl's is 3).

    ``forward(x)`` takes ``[B, in_channels, H, W]`` (``H``, ``W`` divisible by 4) and returns
    ``(features, logits)``: the pooled features ``[B, 4C]`` and ``[B, num_classes]``, as xautodl.
    """

    def __init__(self, C: int, N: int, genotype: Any, num_classes: int, *, in_channels: int = 3):
        super().__init__()
        nodes = as_nodes(genotype)
        self._C = C
        self._layerN = N
        self.in_channels = in_channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev = C
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResNetBasicblock(C_prev, C_curr, 2, True)
            else:
                cell = InferCell(nodes, C_prev, C_curr, 1)
            self.cells.append(cell)
            C_prev = cell.out_dim
        self._Layer = len(self.cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def extra_repr(self) -> str:
        return f"{type(self).__name__}(C={self._C}, N={self._layerN}, L={self._Layer})"

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        check_input(inputs, self.in_channels, 4)
        feature = to_preferred_layout(self.stem(to_preferred_layout(inputs)))
        for cell in self.cells:
            feature = cell(feature)
        out = self.global_pooling(self.lastact(feature)).flatten(1)
        return out, self.classifier(out)


class NB201Networks(TrainedNetworks):
    """The NAS-Bench-201 space's trained network: :class:`TinyNetwork`."""

    space = "nb201"
    unused_parameters = True  # TinyNetwork keeps its 'none' edges' modules, never computed

    def build(self, arch, *, channels, cells, num_classes, in_channels, auxiliary, imagenet=False) -> nn.Module:
        if imagenet:
            raise ValueError("imagenet: NAS-Bench-201 has no network for full-size ImageNet")
        return TinyNetwork(channels, cells, arch, num_classes, in_channels=in_channels)

    def outputs(self, out) -> tuple[Tensor, Tensor | None]:
        return out[1], None  # (features, logits)


TRAINED = NB201Networks()
