"""The DARTS search space (Liu et al., ICLR 2019) as a slim supernet.

Mathematics, parameters and state_dict keys are those of DARTS's search code (``cnn/model_search.py``,
``cnn/operations.py`` and ``cnn/genotypes.py`` of quark0/darts), and of PC-DARTS (Xu et al., ICLR 2020)
for partial channels. This module is the space's description (:func:`describe_cell`: 2 inputs,
``steps`` nodes fed by every earlier state, output the last ``multiplier`` states) and its modules in
the reference layout; :mod:`fastnas.spaces.engine` runs them:

* a node is ONE :func:`fastnas.mixed_sum` over all its incoming (edge, op) pairs (two with partial
  channels: the ops' part and the bypassed channels' part, then one concatenation and one shuffle
  per node instead of one per edge);
* ``none`` is never computed: its output is zero, so it adds nothing and its weight's gradient is 0;
* ``skip_connect`` at stride 1 hands its input itself to the mixed sum;
* one ReLU per state is shared by every op that starts with it, on every edge leaving that state;
  the parameterless pools (and their ``affine=False`` BatchNorm, with batch statistics) are computed
  once per (state, stride) and shared by the edges leaving that state;
* each conv op kind (``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3``, ``dil_conv_5x5``) runs
  for every edge leaving a state at once: each depthwise stage is ONE depthwise convolution over the
  state's ReLU repeated once per edge, each pointwise stage ONE convolution grouped by edge, each
  BatchNorm ONE BatchNorm kernel over the edges' channels, whose running statistics lie side by side
  in memory so that the kernel updates them all (every op keeps its own parameters and buffers, the
  convolutions' weights side by side too, so that their concatenation is a view); the last
  BatchNorm writes one dense tensor per edge, ready for the mixed sums;
* ``affine=False`` BatchNorms keep only their output for the backward (see :mod:`fastnas.spaces.ops`),
  and the batch counts of a cell are incremented by one foreach kernel.

Weighting modes (``Network(arch=..., sampler=...)``): softmax of logits (DARTS), weights used as given
(GAEA, ``arch="simplex"``), GDAS hard Gumbel samples with a straight-through gradient where only the
sampled op of each edge is computed (``sampler="gdas"``), uniformly sampled ops (``sampler="uniform"``),
and PC-DARTS partial channels (``partial_channels=4``).
"""

from __future__ import annotations

import ast
from collections import namedtuple
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastnas.spaces import _arch, engine
from fastnas.spaces.engine import channel_shuffle
from fastnas.spaces.ops import Identity, StatUpdates, Zero, batch_norm, run_tail, to_preferred_layout
from fastnas.spaces.space import SearchSpace

__all__ = [
    "PRIMITIVES",
    "Genotype",
    "OPS",
    "ReLUConvBN",
    "DilConv",
    "SepConv",
    "FactorizedReduce",
    "MixedOp",
    "Cell",
    "Network",
    "parse_genotype",
    "channel_shuffle",
    "describe_cell",
    "describe_mixed_op",
    "SPACE",
]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

PRIMITIVES: list[str] = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]


# --------------------------------------------------------------------------- candidate ops (reference layout)


class ReLUConvBN(nn.Module):
    """ReLU -> Conv2d(no bias) -> BatchNorm2d, as ``op`` (keys ``op.1.weight``, ``op.2.*``)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return run_tail(self.op, torch.relu(x), start=1)


class DilConv(nn.Module):
    """ReLU -> dilated depthwise conv -> pointwise conv -> BatchNorm2d, as ``op``."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool = True
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return run_tail(self.op, torch.relu(x), start=1)


class SepConv(nn.Module):
    """Two stacked (ReLU -> depthwise conv -> pointwise conv -> BatchNorm2d), as ``op`` (indices 0-7)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return run_tail(self.op, torch.relu(x), start=1)


class FactorizedReduce(nn.Module):
    """Halves the resolution: ReLU, two 1x1 stride-2 convs (the second one shifted by a pixel),
    concatenated, BatchNorm2d (keys ``conv_1``, ``conv_2``, ``bn``)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2 != 0:
            raise ValueError(f"C_out must be even for FactorizedReduce, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward_relu(self, r: Tensor, unit: Tensor | None = None, updates: StatUpdates | None = None) -> Tensor:
        """The op after its ReLU, given ``r = relu(x)`` (``unit``, ``updates``: see :func:`batch_norm`)."""
        y = torch.cat([self.conv_1(r), self.conv_2(r[:, :, 1:, 1:])], dim=1)
        return batch_norm(y, self.bn, unit, updates=updates)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_relu(torch.relu(x))


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}

_NONE = PRIMITIVES.index("none")


def _candidate(op: nn.Module) -> engine.Candidate:
    """What a DARTS op module is for the engine (``skip_connect`` at stride 2, a FactorizedReduce,
    shares its state's ReLU and the cell's BatchNorm bookkeeping)."""
    if hasattr(op, "conv_1") and hasattr(op, "conv_2") and hasattr(op, "bn"):  # FactorizedReduce (any class)
        return engine.Candidate(
            engine.MODULE,
            op,
            run=lambda x, relu_x, unit, updates: FactorizedReduce.forward_relu(op, relu_x(), unit, updates),
        )
    return engine.classify(op) or engine.module_candidate(op)


def _mixed_op_candidates(mixed: nn.Module) -> list[list[engine.Candidate]]:
    return [[_candidate(op) for op in mixed._ops]]


def _cell_candidates(cell: nn.Module) -> list[list[engine.Candidate]]:
    return [[_candidate(op) for op in mixed._ops] for mixed in cell._ops]


def describe_mixed_op(C: int, stride: int) -> engine.CellDAG:
    """The engine's description of a :class:`MixedOp`: one edge from its input to one node."""
    return engine.cell_dag(1, [(0, 0, stride)], [1], C, PRIMITIVES, _mixed_op_candidates)


def describe_cell(steps: int, multiplier: int, C: int, reduction: bool, partial_channels: int = 1) -> engine.CellDAG:
    """The engine's description of a DARTS cell: inputs 0 and 1 (the preprocessed outputs of the two
    previous cells), ``steps`` nodes, node ``i`` fed by every earlier state (rows node by node,
    inputs in order; stride 2 from the inputs of a reduction cell), output the last ``multiplier``
    states concatenated."""
    edges = [(i, j, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)]
    output = range(2 + steps - multiplier, 2 + steps)
    return engine.cell_dag(2, edges, output, C, PRIMITIVES, _cell_candidates, partial_channels=partial_channels)


# --------------------------------------------------------------------------- the mixed op


class MixedOp(engine.FusedCell, nn.Module):
    """All DARTS candidate ops of one edge; drop-in for ``MixedOp`` of DARTS's ``model_search.py``.

    Same constructor, same ``_ops.{k}`` state_dict keys (pools followed by an ``affine=False``
    BatchNorm as ``_ops.{k}.1``), same ``forward(x, weights)`` result and gradients, computed as one
    :func:`fastnas.mixed_sum` over the non-``none`` ops with one shared ReLU.

    Args:
        C: channels of the input and output.
        stride: 1, or 2 on the reduction cells' edges from the cell inputs.
    """

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        self._ops = nn.ModuleList()
        for primitive in PRIMITIVES:
            op = OPS[primitive](C, stride, False)
            if primitive in ("max_pool_3x3", "avg_pool_3x3"):
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)
        self._init_engine(describe_mixed_op(C, stride))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """``sum_k weights[k] * op_k(x)``: ``x`` ``[B, C, H, W]``, ``weights`` ``[len(PRIMITIVES)]``
        (differentiable); returns ``[B, C, H/stride, W/stride]``."""
        if weights.dim() != 1 or weights.shape[0] != len(self._ops):
            raise ValueError(f"weights must have shape [{len(self._ops)}], got {tuple(weights.shape)}")
        return engine.run_cell(self, self._dag, [x], weights[None])


# --------------------------------------------------------------------------- the cell


class Cell(engine.FusedCell, nn.Module):
    """A DARTS search cell: two preprocessed inputs, ``steps`` nodes, each the sum over all earlier
    states of a mixed op, output the concatenation of the last ``multiplier`` states.

    Parameters and state_dict keys are those of DARTS's ``Cell`` (``preprocess0``, ``preprocess1``,
    ``_ops.{e}._ops.{k}``); with ``partial_channels = k > 1`` those of PC-DARTS's cell (its mixed ops
    work on ``C // k`` channels). The nodes run through :mod:`fastnas.spaces.engine`
    (:func:`describe_cell`).
    """

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        partial_channels: int = 1,
    ):
        super().__init__()
        if partial_channels < 1 or C % partial_channels != 0:
            raise ValueError(f"partial_channels must be >= 1 and divide C={C}, got {partial_channels}")
        self.reduction = reduction
        self.partial_channels = partial_channels
        self.C = C
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        self.edges: list[tuple[int, int]] = []  # (node i, state j) per edge, in DARTS's order
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C // partial_channels, stride))
                self.edges.append((i, j))
        self._init_engine(describe_cell(steps, multiplier, C, reduction, partial_channels))

    def forward(
        self,
        s0: Tensor,
        s1: Tensor,
        weights: Tensor,
        selected: Sequence[Sequence[int]] | None = None,
        edge_weights: Tensor | None = None,
        picked: Tensor | None = None,
        node_weights: list | None = None,
    ) -> Tensor:
        """Args:
            s0, s1: the outputs of the two previous cells, ``[B, C_prev_prev, H0, W0]``, ``[B, C_prev, H, W]``.
            weights: ``[num_edges, len(PRIMITIVES)]`` op weights (differentiable), e.g. a softmax.
            selected: per edge, the op indices to compute (GDAS: the sampled one); None: every op.
                ``none`` is skipped either way.
            edge_weights: ``[num_edges]`` PC-DARTS edge weights (normalised per node), or None (all 1).
            picked: with ``selected`` (one op per edge), the weight of each edge's op, edge weights
                included (see :class:`fastnas.spaces._arch.EdgeWeights`): then ``weights`` is not read.
            node_weights: :meth:`node_weights` of the op weights (edge weights multiplied in),
                ``selected`` and ``picked``, picked once for every cell of this kind; then ``weights``
                is not read.

        Returns ``[B, multiplier * C, H', W']`` (``H' = H/2`` in a reduction cell).
        """
        if edge_weights is not None and picked is None and node_weights is None:
            weights = weights * edge_weights[:, None]
        updates = StatUpdates()  # BatchNorm bookkeeping, applied at the end in a few foreach kernels
        unit = getattr(self, "_bn_unit", None)
        unit = unit if unit is not None and unit.dtype == s1.dtype else None
        s0 = _preprocess(self.preprocess0, s0, unit, updates)
        s1 = _preprocess(self.preprocess1, s1, unit, updates)
        dag = self._dag
        return engine.run_cell(
            self, dag, [s0, s1], weights, selected, picked, None, edge_weights, node_weights, updates
        )


def _preprocess(module: nn.Module, s: Tensor, unit: Tensor | None, updates: StatUpdates) -> Tensor:
    """A cell input's ReLUConvBN or FactorizedReduce (any class with those attributes)."""
    r = torch.relu(s)
    if hasattr(module, "conv_1"):
        return FactorizedReduce.forward_relu(module, r, unit, updates)
    return run_tail(module.op, r, start=1, unit=unit, updates=updates)


# --------------------------------------------------------------------------- the network


class Network(_arch.ArchMixin, nn.Module):
    """The DARTS search network: stem, ``layers`` cells (reduction cells at 1/3 and 2/3 of the depth),
    global average pooling and a linear classifier.

    Args:
        C: channels of the first cells (doubled at each reduction).
        num_classes: classifier outputs.
        layers: number of cells.
        steps: intermediate nodes per cell (4: 14 edges).
        multiplier: how many of the last states a cell concatenates.
        stem_multiplier: the stem has ``stem_multiplier * C`` channels.
        in_channels: image channels.
        arch: ``"logits"`` (softmax of the architecture parameters) or ``"simplex"`` (the architecture
            parameters are the weights, used as given: GAEA).
        sampler: None, ``"gdas"`` (hard Gumbel-softmax per edge at temperature ``self.tau``,
            straight-through gradient, only the sampled op computed) or ``"uniform"`` (a random op per
            edge, no architecture gradient).
        partial_channels: 1, or PC-DARTS's ``k`` (4): ``1/k`` of the channels go through the ops and
            per-edge weights ``betas`` normalised per node weigh the edges.
        stem: ``"cifar"`` (DARTS's: one 3x3 convolution, ``stem``) or ``"imagenet"`` (PC-DARTS's
            ``model_search_imagenet.py``: ``stem0``, two stride-2 3x3 convolutions to
            ``stem_multiplier * C / 2`` and ``stem_multiplier * C`` channels, then ``stem1``, a third;
            the first cell reads both, ``stem0``'s through a factorized reduction), an 8 times smaller
            resolution before the cells.

    ``forward(x)`` maps ``[B, in_channels, H, W]`` to logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        *,
        in_channels: int = 3,
        arch: str = "logits",
        sampler: str | None = None,
        partial_channels: int = 1,
        stem: str = "cifar",
    ):
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier
        self.partial_channels = partial_channels
        self._init_arch_modes(arch, sampler)

        C_curr = stem_multiplier * C
        self._build_stem(stem, in_channels, C_curr)
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = stem == "imagenet"  # stem0's output has twice stem1's resolution
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, partial_channels)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        num_edges = sum(2 + i for i in range(steps))
        num_ops = len(PRIMITIVES)
        self.alphas_normal = nn.Parameter(self._init_rows(num_edges, num_ops))
        self.alphas_reduce = nn.Parameter(self._init_rows(num_edges, num_ops))
        self._arch_names = ["alphas_normal", "alphas_reduce"]
        if partial_channels > 1:
            self.betas_normal = nn.Parameter(self._init_segments(self._node_segments()))
            self.betas_reduce = nn.Parameter(self._init_segments(self._node_segments()))
            self._arch_names += ["betas_normal", "betas_reduce"]

    def _build_stem(self, stem: str, in_channels: int, C: int) -> None:
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        elif stem == "imagenet":
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2),
                nn.ReLU(),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
            )
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self._stem_kind = stem

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two inputs of the first cell (``s0``, ``s1``)."""
        x = to_preferred_layout(x)
        if self._stem_kind == "cifar":
            s = to_preferred_layout(self.stem(x))
            return s, s
        s0 = to_preferred_layout(self.stem0(x))  # PC-DARTS's stem1 rectifies s0 in place; the cell's ReLU does here
        return s0, to_preferred_layout(self.stem1(s0))

    def _search_cells(self) -> list[Cell]:
        return list(self.cells)

    def _node_segments(self) -> tuple[int, ...]:
        return tuple(2 + i for i in range(self._steps))

    def arch_simplex_segments(self, p: Tensor) -> tuple[int, ...] | None:
        """None for the op weights (each row one simplex); ``(2, 3, ..., steps + 1)`` for PC-DARTS's
        edge weights (one simplex per node)."""
        if p is getattr(self, "betas_normal", None) or p is getattr(self, "betas_reduce", None):
            return self._node_segments()
        if any(p is q for q in self.arch_parameters()):
            return None
        raise ValueError("p must be one of arch_parameters()")

    def _edge_weights(self, betas: Tensor) -> Tensor:
        return self._normalise_segments(betas, self._node_segments())

    def forward(self, x: Tensor, sample: dict[str, Tensor] | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x`` ``[B, in_channels, H, W]``. ``sample``: a draw of
        :meth:`sample_architecture` to use (samplers only; None: one is drawn now)."""
        b_normal = b_reduce = None
        if self.partial_channels > 1:
            b_normal, b_reduce = self._edge_weights(self.betas_normal), self._edge_weights(self.betas_reduce)
        normal = self._edge_weights_of("alphas_normal", sample, b_normal)  # edge weights multiplied in
        reduce = self._edge_weights_of("alphas_reduce", sample, b_reduce)
        s0, s1 = self._stem(x)
        shared: dict[bool, list] = {}  # each kind of cell's node weights, picked once (see node_weights)
        for cell in self.cells:
            w, b = (reduce, b_reduce) if cell.reduction else (normal, b_normal)
            if cell.reduction not in shared:
                weights = w.weights * b[:, None] if b is not None and w.picked is None else w.weights
                shared[cell.reduction] = cell.node_weights(weights, w.selected, w.picked)
            s0, s1 = s1, cell(s0, s1, w.weights, w.selected, b, w.picked, shared[cell.reduction])
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    @torch.no_grad()
    def arch_weights(self) -> dict[str, Tensor]:
        """The current op weights per cell type, detached, rows on the simplex: ``{"normal": [E, 8],
        "reduce": [E, 8]}``."""
        return {
            "normal": self._normalised(self.alphas_normal).detach().clone(),
            "reduce": self._normalised(self.alphas_reduce).detach().clone(),
        }

    @torch.no_grad()
    def genotype(self) -> Genotype:
        """DARTS's discretisation: for each node the two incoming edges whose strongest non-``none`` op
        weight is largest, each with that op (with partial channels, op weights times the node-normalised
        edge weights, as PC-DARTS does). Ties go to the earlier edge/op."""
        weights = self.arch_weights()
        genes = {}
        for kind in ("normal", "reduce"):
            W = weights[kind].double()
            if self.partial_channels > 1:
                W = W * self._edge_weights(getattr(self, f"betas_{kind}")).double()[:, None]
            genes[kind] = _parse(W.cpu().tolist(), self._steps)
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)
        return Genotype(normal=genes["normal"], normal_concat=concat, reduce=genes["reduce"], reduce_concat=concat)

    def export(self) -> str:
        """``str(self.genotype())``; :func:`parse_genotype` reads it back."""
        return str(self.genotype())

    def edge_labels(self) -> list[str]:
        """``"i<-j"`` for every row of a cell's op weights: node by node (nodes 2.. of a cell whose
        inputs are nodes 0 and 1), inputs in order."""
        return [f"{i}<-{j}" for i in range(2, self._steps + 2) for j in range(i)]


def _parse(W: list[list[float]], steps: int) -> list[tuple[str, int]]:
    gene = []
    start, n = 0, 2
    for _ in range(steps):
        rows = W[start : start + n]
        best = [max((k for k in range(len(r)) if k != _NONE), key=lambda k, r=r: (r[k], -k)) for r in rows]
        edges = sorted(range(n), key=lambda j: (-rows[j][best[j]], j))[:2]
        gene += [(PRIMITIVES[best[j]], j) for j in edges]
        start += n
        n += 1
    return gene


def parse_genotype(text: str) -> Genotype:
    """Read back ``str(genotype)`` (``Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=range(2, 6),
    ...)``); the concat fields may be ``range(a, b)`` or lists. Evaluates no code."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"text is not a Genotype(...) expression: {exc}") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
        raise ValueError(f"text must be 'Genotype(normal=..., ...)', got {text[:60]!r}")
    fields = dict(zip(Genotype._fields, tree.args))
    fields.update({kw.arg: kw.value for kw in tree.keywords})
    if set(fields) != set(Genotype._fields):
        raise ValueError(f"text must give the fields {Genotype._fields}, got {sorted(fields)}")

    def value(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            return range(*[ast.literal_eval(a) for a in node.args])
        return ast.literal_eval(node)

    try:
        out = {name: value(node) for name, node in fields.items()}
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ValueError(f"text holds a value that is not a literal: {exc}") from None
    for name in ("normal", "reduce"):
        pairs = out[name]
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"{name} must be a list of (op, input) pairs")
        out[name] = [tuple(p) for p in pairs]
        if not out[name] or len(out[name]) % 2:
            raise ValueError(f"{name} holds {len(out[name])} (op, input) pairs; each node takes 2")
        for k, (op, j) in enumerate(out[name]):
            if op not in PRIMITIVES or isinstance(j, bool) or not isinstance(j, int):
                raise ValueError(f"{name} holds an unknown (op, input) pair ({op!r}, {j!r})")
            if not 0 <= j < k // 2 + 2:
                raise ValueError(
                    f"{name}: node {k // 2 + 2} takes input {j}, which is not an earlier state (0..{k // 2 + 1})"
                )
        concat = out[f"{name}_concat"]
        states = len(out[name]) // 2 + 2
        if not isinstance(concat, (list, tuple, range)) or not concat or len(set(concat)) != len(concat):
            raise ValueError(f"{name}_concat must list distinct states")
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < states for c in concat):
            raise ValueError(f"{name}_concat {concat!r} names a state outside 0..{states - 1}")
    return Genotype(**out)


# --------------------------------------------------------------------------- the space, for the run side


class DartsSpace(SearchSpace):
    """The DARTS space for ``fastnas search|train|rank`` (see :class:`fastnas.spaces.space.SearchSpace`)."""

    name = "darts"
    title = "DARTS"
    notation = "a DARTS Genotype(...)"
    op_names = tuple(PRIMITIVES)
    example_arch = (
        "Genotype(normal=[('skip_connect', 0)], normal_concat=range(2, 3), "
        "reduce=[('skip_connect', 0)], reduce_concat=range(2, 3))"
    )
    min_cells = 3  # reductions at 1/3 and 2/3 of the depth
    stems = ("cifar", "imagenet")

    def build_supernet(
        self, *, channels, cells, num_classes, in_channels, arch, sampler, partial_channels=1, stem="cifar"
    ) -> Network:
        return Network(
            stem=stem,
            C=channels,
            num_classes=num_classes,
            layers=cells,
            in_channels=in_channels,
            arch=arch,
            sampler=sampler,
            partial_channels=partial_channels,
        )

    def random_weights(self, rows: int, ops: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        """Each intermediate node keeps two distinct input edges with one non-``none`` op each, all its
        other edges carry ``none`` (a genotype, read back unchanged by ``net.export()``)."""
        w = torch.zeros(rows, ops, dtype=dtype)
        real_ops = [k for k in range(ops) if k != _NONE]
        start, n_in = 0, 2
        while start < rows:
            keep = torch.randperm(n_in, generator=gen)[:2] + start
            w[start : start + n_in, _NONE] = 1.0
            for e in keep.tolist():
                w[e, _NONE] = 0.0
                w[e, real_ops[int(torch.randint(0, len(real_ops), (1,), generator=gen))]] = 1.0
            start, n_in = start + n_in, n_in + 1
        return w

    def one_hot(self, net: nn.Module, arch: str) -> list[Tensor]:
        """Per cell kind, the genotype's (op, input) pairs of each node set to 1, its other edges ``none``."""
        if getattr(net, "partial_channels", 1) > 1:
            raise ValueError("net: a partial-channel supernet cannot be restricted to one architecture")
        genotype = parse_genotype(arch)
        for kind, gene in (("normal", genotype.normal), ("reduce", genotype.reduce)):
            if len(gene) != 2 * net._steps:
                raise ValueError(
                    f"arch: {kind} has {len(gene)} (op, input) pairs, the net's cells take {2 * net._steps}"
                )
        weights = []
        for gene, p in zip((genotype.normal, genotype.reduce), net.arch_parameters()):
            w = torch.zeros(p.shape)
            w[:, _NONE] = 1.0
            for n, (op, j) in enumerate(gene):
                i = n // 2  # two (op, input) pairs per node
                e = i * (i + 3) // 2 + j  # the edges of the earlier nodes, then the input
                w[e, _NONE] = 0.0
                w[e, PRIMITIVES.index(op)] = 1.0
            weights.append(w)
        return weights

    def looks_like(self, arch: str) -> bool:
        return arch.lstrip().startswith("Genotype(")

    def parse(self, arch: str) -> Genotype:
        return parse_genotype(arch)

    def chosen_ops(self, arch: str) -> dict[str, dict[str, str]]:
        genotype = parse_genotype(arch)
        return {
            cell: {f"{k // 2 + 2}<-{j}": op for k, (op, j) in enumerate(getattr(genotype, cell))}
            for cell in ("normal", "reduce")
        }


SPACE = DartsSpace()
