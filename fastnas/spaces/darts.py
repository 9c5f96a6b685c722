"""The DARTS search space (Liu et al., ICLR 2019) as a slim supernet.

Mathematics, parameters and state_dict keys are those of DARTS's search code (``cnn/model_search.py``,
``cnn/operations.py`` and ``cnn/genotypes.py`` of quark0/darts), and of PC-DARTS (Xu et al., ICLR 2020)
for partial channels. What differs is the execution:

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

A training step at C=16, 8 layers dispatches 3,030 kernels (non-view ATen operators, forward and
backward) against 13,612 for DARTS's ``model_search.Network`` (``benchmarks/bench_step_kernels.py``).

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
import torch.nn.functional as F
from torch import Tensor, nn

import fastnas
from fastnas.ops.batch_norm import bn_constants
from fastnas.ops.depthwise_conv import depthwise_conv2d
from fastnas.ops.max_pool import max_pool2d
from fastnas.spaces import _arch
from fastnas.spaces._arch import pick_weights, sharing_picks
from fastnas.spaces.ops import (
    BatchNormGroup,
    CachedPlans,
    Identity,
    StatUpdates,
    Zero,
    avg_pool_3x3,
    batch_norm,
    cat_parameters,
    lean_bn_eligible,
    max_pool_3x3,
    pack_parameters,
    pack_running_stats,
    preferred_memory_format,
    repeat_channels,
    run_tail,
    shared_batch_norm,
    to_preferred_layout,
)

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
_REAL_OPS = [q for q in range(len(PRIMITIVES)) if q != _NONE]
_POOLS = {"max_pool_3x3", "avg_pool_3x3"}
_CONV_OPS = [PRIMITIVES.index(n) for n in ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")]
_BN_INDICES = {"sep_conv_3x3": (3, 7), "sep_conv_5x5": (3, 7), "dil_conv_3x3": (3,), "dil_conv_5x5": (3,)}


def _pool(name: str, x: Tensor, stride: int) -> Tensor:
    if name == "max_pool_3x3":
        return max_pool_3x3(x, stride)
    return avg_pool_3x3(x, stride)


# --------------------------------------------------------------------------- the mixed op


class MixedOp(nn.Module):
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
            if primitive in _POOLS:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """``sum_k weights[k] * op_k(x)``: ``x`` ``[B, C, H, W]``, ``weights`` ``[len(PRIMITIVES)]``
        (differentiable); returns ``[B, C, H/stride, W/stride]``."""
        if weights.dim() != 1 or weights.shape[0] != len(self._ops):
            raise ValueError(f"weights must have shape [{len(self._ops)}], got {tuple(weights.shape)}")
        r = torch.relu(x)
        outs = []
        for name, op in zip(PRIMITIVES[1:], list(self._ops)[1:]):  # every op but 'none', in order
            if name in _POOLS:
                outs.append(batch_norm(_pool(name, x, self.stride), op[1]))
            elif name == "skip_connect" and self.stride == 1:
                outs.append(x)
            elif isinstance(op, FactorizedReduce):
                outs.append(op.forward_relu(r))
            else:
                outs.append(run_tail(op.op, r, start=1))
        return fastnas.mixed_sum(outs, weights[1:])


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """PC-DARTS's channel shuffle: ``[B, g*c, H, W]`` viewed as ``[B, g, c, H, W]``, transposed to
    ``[B, c, g, H, W]`` and flattened back."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


# --------------------------------------------------------------------------- the cell


class Cell(CachedPlans, nn.Module):
    """A DARTS search cell: two preprocessed inputs, ``steps`` nodes, each the sum over all earlier
    states of a mixed op, output the concatenation of the last ``multiplier`` states.

    Parameters and state_dict keys are those of DARTS's ``Cell`` (``preprocess0``, ``preprocess1``,
    ``_ops.{e}._ops.{k}``); with ``partial_channels = k > 1`` those of PC-DARTS's cell (its mixed ops
    work on ``C // k`` channels).

    The forward runs by state: once a state is known, every op of every edge leaving it is computed
    — each convolutional op kind (``sep_conv_3x3``, ...) over all those edges at once (see
    :meth:`_conv_group`), the pools and their BatchNorm once — and queued for its target node; a
    node is then one :func:`fastnas.mixed_sum` over its queue.
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
        self.last_computed: list[tuple[int, str]] = []  # (edge, op) pairs of the last eager forward
        # constants of the BatchNorm backward (two kernels fewer per backward)
        self.register_buffer("_bn_unit", bn_constants(steps * C), persistent=False)
        self._compiled_nodes = None
        self._pack_groups()

    def _out_edges(self, j: int) -> list[int]:
        """The edges leaving state ``j``, by target node."""
        return [e for e, (_, src) in enumerate(self.edges) if src == j]

    def _pack_groups(self) -> None:
        """Per state and conv op kind, the layers run as one convolution or one BatchNorm keep their
        weights, and their statistics, side by side (see :func:`fastnas.spaces.ops.pack_parameters`
        and :func:`fastnas.spaces.ops.pack_running_stats`)."""
        for j in range(1 + self._steps):
            edges = self._out_edges(j)
            for q in _CONV_OPS:
                for index in _BN_INDICES[PRIMITIVES[q]]:
                    pack_running_stats([self._ops[e]._ops[q].op[index] for e in edges])
                for index, layer in enumerate(self._ops[edges[0]]._ops[q].op):
                    if isinstance(layer, nn.Conv2d):
                        pack_parameters([self._ops[e]._ops[q].op[index] for e in edges], "weight")

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._pack_groups()  # .to() / .double() gave every tensor its own storage
        return module

    def forward(
        self,
        s0: Tensor,
        s1: Tensor,
        weights: Tensor,
        selected: Sequence[Sequence[int]] | None = None,
        edge_weights: Tensor | None = None,
        picked: Tensor | None = None,
    ) -> Tensor:
        """Args:
            s0, s1: the outputs of the two previous cells, ``[B, C_prev_prev, H0, W0]``, ``[B, C_prev, H, W]``.
            weights: ``[num_edges, len(PRIMITIVES)]`` op weights (differentiable), e.g. a softmax.
            selected: per edge, the op indices to compute (GDAS: the sampled one); None: every op.
                ``none`` is skipped either way.
            edge_weights: ``[num_edges]`` PC-DARTS edge weights (normalised per node), or None (all 1).
            picked: with ``selected`` (one op per edge), the weight of each edge's op, edge weights
                included (see :class:`fastnas.spaces._arch.EdgeWeights`): then ``weights`` is not read.

        Returns ``[B, multiplier * C, H', W']`` (``H' = H/2`` in a reduction cell).
        """
        if edge_weights is not None and picked is None:
            weights = weights * edge_weights[:, None]
        updates = StatUpdates()  # BatchNorm bookkeeping, applied at the end in a few foreach kernels
        unit = self._bn_unit if self._bn_unit.dtype == s1.dtype else None
        s0 = self._preprocess(self.preprocess0, s0, unit, updates)
        s1 = self._preprocess(self.preprocess1, s1, unit, updates)
        if self._compiled_nodes is None:
            return self.nodes(s0, s1, weights, selected, edge_weights, picked, updates)
        deferred = StatUpdates(deferred=True, plans=self)  # the compiled graph leaves every buffer alone
        packed = self._packed_weights(selected) if self.training else {}
        for i in range(self._steps):  # each node's op weights, shared by the cells (see pick_weights)
            pairs = self._node_pairs(i, selected)
            if pairs:
                packed["node", i] = pick_weights(weights, pairs, picked)
        out = self._compiled_nodes(s0, s1, weights, selected, edge_weights, picked, deferred, packed)
        updates.apply()
        deferred.apply()
        return out

    def compile_nodes(self, **options) -> None:
        """Compile :meth:`nodes` with ``torch.compile(**options)``: every cell of the same kind and
        shapes runs the same compiled code (the preprocessing, whose input shapes differ from cell to
        cell, stays eager). The compiled code returns the batch statistics, and the running
        statistics are updated after it (see :class:`fastnas.spaces.ops.StatUpdates`)."""
        self._compiled_nodes = torch.compile(self.nodes, **options)

    def nodes(
        self,
        s0: Tensor,
        s1: Tensor,
        weights: Tensor,
        selected: Sequence[Sequence[int]] | None,
        edge_weights: Tensor | None,
        picked: Tensor | None,
        updates: StatUpdates,
        packed: dict | None = None,
    ) -> Tensor:
        """The cell after its preprocessing: ``s0``, ``s1`` ``[B, C, H, W]``, ``weights`` with the
        edge weights multiplied in (the other arguments as in :meth:`forward`; ``updates`` as in
        :func:`fastnas.spaces.ops.batch_norm`, applied here unless deferred; ``packed``: see
        :meth:`_packed_weights`, with node ``i``'s op weights under ``("node", i)``, picked before
        a compiled graph, where each node's slice of ``weights`` would be a kernel and its backward
        another)."""
        states = [s0, s1]
        k = self.partial_channels
        queues: list[list[tuple[int, int, Tensor]]] = [[] for _ in range(self._steps)]  # (edge, op, output)
        passes: list[list[Tensor]] = [[] for _ in range(self._steps)]  # PC-DARTS: the bypassed channels
        tracing = torch.compiler.is_compiling()
        if not tracing:
            self.last_computed = []
        B, _, H, W = states[1].shape
        stride = 2 if self.reduction else 1
        node_shape = (B, self.C // k, -(-H // stride), -(-W // stride))
        for i in range(self._steps):
            for j in (0, 1) if i == 0 else (i + 1,):  # the states that became known
                x, rest = states[j], None
                if k > 1:  # one split, whose backward is one concatenation
                    x, rest = x.split([x.shape[1] // k, x.shape[1] - x.shape[1] // k], dim=1)
                    x = x.contiguous(memory_format=preferred_memory_format(x))
                self._emit(j, x, selected, queues, updates, packed)
                if k > 1:
                    for e in self._out_edges(j):
                        passes[self.edges[e][0]].append(self._bypass(rest, self._ops[e].stride))
            queue = queues[i]
            if not tracing:
                self.last_computed += [(e, PRIMITIVES[q]) for e, q, _ in sorted(queue, key=lambda t: t[:2])]
            offset = i * (i + 3) // 2  # edges of the earlier nodes: 2 + 3 + ... + (i + 1)
            if queue:
                queue.sort(key=lambda t: t[:2])
                pairs = [(e, q) for e, q, _ in queue]
                w = packed.get(("node", i)) if packed and pairs == self._node_pairs(i, selected) else None
                if w is None:
                    w = pick_weights(weights, pairs, picked)
                node = fastnas.mixed_sum([o for *_, o in queue], w)
            else:  # every sampled op is 'none': the node is zero
                node = states[0].new_zeros(node_shape)
            if k > 1:
                ew = edge_weights[offset : offset + 2 + i] if edge_weights is not None else None
                ones = torch.ones(2 + i, dtype=weights.dtype, device=weights.device) if ew is None else ew
                bypass = fastnas.mixed_sum(passes[i], ones)
                node = channel_shuffle(torch.cat([node, bypass], dim=1), k)
            states.append(node)
        if not updates.deferred:
            updates.apply()
        return torch.cat(states[-self._multiplier :], dim=1)

    @staticmethod
    def _preprocess(module: nn.Module, s: Tensor, unit: Tensor | None, updates: StatUpdates) -> Tensor:
        r = torch.relu(s)
        if isinstance(module, FactorizedReduce):
            return module.forward_relu(r, unit, updates)
        return run_tail(module.op, r, start=1, unit=unit, updates=updates)

    def _emit(self, j: int, x: Tensor, selected, queues, updates: StatUpdates, packed: dict | None = None) -> None:
        """Compute every needed op of every edge leaving state ``j`` (input ``x``) and queue it for
        its target node."""
        edges, stride = self._plan(("out", j), self._out_edges_and_stride, j)
        needed = {e: [q for q in (_REAL_OPS if selected is None else selected[e]) if q != _NONE] for e in edges}
        relu: dict[int, Tensor] = {}  # times -> relu(x) repeated that many times along the channels

        def relu_x(times: int = 1) -> Tensor:
            if 1 not in relu:
                relu[1] = torch.relu(x)
            if times not in relu:
                relu[times] = repeat_channels(relu[1], times)
            return relu[times]

        unit = self._bn_unit if self._bn_unit.dtype == x.dtype else None
        for q in _REAL_OPS:
            members = tuple(e for e in edges if q in needed[e])
            if not members:
                continue
            name = PRIMITIVES[q]
            if name in _POOLS:
                pooled = _pool(name, x, stride)
                bns = self._plan((q, members), self._op_modules, q, members, 1)
                if all(lean_bn_eligible(b) for b in bns):
                    y = shared_batch_norm(pooled, bns, unit, updates)
                    outs = [y] * len(members)
                else:
                    outs = [b(pooled) for b in bns]
            elif name == "skip_connect":
                fr = self._plan((q, members), self._op_modules, q, members)
                outs = [x if stride == 1 else op.forward_relu(relu_x(), unit, updates) for op in fr]
            else:
                outs = self._conv_group(q, members, relu_x, unit, updates, packed)
            for e, out in zip(members, outs):
                queues[self.edges[e][0]].append((e, q, out))

    def _conv_group(
        self, q: int, edges: Sequence[int], relu_x, unit, updates: StatUpdates, packed: dict | None = None
    ) -> list[Tensor]:
        """Op ``q`` (a sep or dil conv) of every edge in ``edges``, given ``relu_x(times)``, their
        shared input ``relu(x)`` repeated ``times`` along the channels: each stage of the op is ONE
        convolution over the edges' concatenated weights — the depthwise ones over the input repeated
        once per edge, the pointwise ones grouped by edge — and each BatchNorm one BatchNorm over the
        edges' concatenated channels; returns one dense output per edge (``packed``: the concatenated
        weights, when :meth:`_packed_weights` made them)."""
        seqs, layers, bn_groups = self._plan((q, tuple(edges)), self._conv_group_plan, q, edges)
        if not all(lean_bn_eligible(b) for group in bn_groups for b in group):
            return [run_tail(s, relu_x(), start=1) for s in seqs]  # running statistics in use: module by module
        m, C = len(seqs), relu_x().shape[1]

        def conv(y: Tensor, index: int, groups: int) -> Tensor:
            layer = layers[index][0]
            weight = packed.get((q, tuple(edges), index)) if packed is not None else None
            if weight is None:
                weight = cat_parameters([c.weight for c in layers[index]])
            if groups == y.shape[1]:
                return depthwise_conv2d(y, weight, layer.stride, layer.padding, layer.dilation)
            return F.conv2d(y, weight, None, layer.stride, layer.padding, layer.dilation, groups)

        y = conv(conv(relu_x(m), 1, m * C), 2, m)
        if PRIMITIVES[q].startswith("sep"):
            y = torch.relu(batch_norm(y, bn_groups[0], unit, updates=updates))
            y = conv(conv(y, 5, m * C), 6, m)
        outs = batch_norm(y, bn_groups[-1], unit, parts=m, updates=updates)
        return outs if m > 1 else [outs]

    def _packed_weights(self, selected: Sequence[Sequence[int]] | None) -> dict[tuple, Tensor]:
        """The weights of every convolution :meth:`_conv_group` will run, keyed ``(op, edges, layer
        index)``, each the concatenation of its edges' weights: made before a compiled :meth:`nodes`,
        they are views of the packed parameters (see :func:`fastnas.spaces.ops.cat_parameters`),
        where inside the graph each would be a copy forward and a split backward."""
        packed = {}
        for j in range(self._steps + 1):
            edges, _ = self._plan(("out", j), self._out_edges_and_stride, j)
            for q in _CONV_OPS:
                members = tuple(e for e in edges if selected is None or q in selected[e])
                if not members:
                    continue
                _, layers, _ = self._plan((q, members), self._conv_group_plan, q, members)
                for index, stage in enumerate(layers):
                    if isinstance(stage[0], nn.Conv2d):
                        packed[q, members, index] = cat_parameters([c.weight for c in stage])
        return packed

    def _node_pairs(self, i: int, selected: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
        """The ``(edge, op)`` pairs node ``i`` sums, in :meth:`nodes`' order."""
        offset = i * (i + 3) // 2  # edges of the earlier nodes: 2 + 3 + ... + (i + 1)
        ops = [
            _REAL_OPS if selected is None else sorted(set(selected[e]) - {_NONE}) for e in range(offset, offset + 2 + i)
        ]
        return [(offset + n, q) for n, row in enumerate(ops) for q in row]

    def _out_edges_and_stride(self, j: int) -> tuple[list[int], int]:
        edges = self._out_edges(j)
        return edges, self._ops[edges[0]].stride

    def _op_modules(self, q: int, edges: Sequence[int], index: int | None = None) -> list[nn.Module]:
        """Op ``q`` of each edge (its layer ``index`` when given)."""
        ops = [self._ops[e]._ops[q] for e in edges]
        return ops if index is None else [op[index] for op in ops]

    def _conv_group_plan(self, q: int, edges: Sequence[int]):
        """``(seqs, layers, bn_groups)`` of :meth:`_conv_group`: op ``q``'s Sequential on each edge, its
        layers by index (one list per index, over the edges), a :class:`BatchNormGroup` per
        BatchNorm index."""
        seqs = [self._ops[e]._ops[q].op for e in edges]
        layers = [list(stage) for stage in zip(*seqs)]
        return seqs, layers, [BatchNormGroup(layers[i]) for i in _BN_INDICES[PRIMITIVES[q]]]

    @staticmethod
    def _bypass(rest: Tensor, stride: int) -> Tensor:
        """PC-DARTS: the channels that skip the ops (max-pooled 2x2 at stride 2)."""
        return rest if stride == 1 else max_pool2d(rest, 2, 2)


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
        with sharing_picks():
            for cell in self.cells:
                w, b = (reduce, b_reduce) if cell.reduction else (normal, b_normal)
                s0, s1 = s1, cell(s0, s1, w.weights, w.selected, b, w.picked)
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
