"""The NAS-Bench-201 search space (Dong & Yang, ICLR 2020) as a slim supernet.

Mathematics, parameters and state_dict keys are those of NAS-Bench-201's reference search code
(``NAS201SearchCell`` in ``xautodl/models/cell_searchs/search_cells.py``, ``cell_operations.py`` and
``search_model_darts.py`` of the ``xautodl`` package). What differs is the execution:

* a node is ONE :func:`fastnas.mixed_sum` over all its incoming (edge, op) pairs;
* ``none`` is never computed: its output is zero, so it adds nothing and its weight's gradient is 0;
* GDAS (``forward_gdas``, ``sampler="gdas"``) computes only the sampled op of each edge and, as
  xautodl's ``forward_gdas``, adds to each node the unsampled hard weights of its edges as a scalar:
  zero in the forward, each of those weights gets ``sum(dL/dnode)`` in the backward (a sampled
  ``none`` still contributes nothing and gets no gradient);
* ``skip_connect`` hands the node itself to the mixed sums (no copy);
* what depends only on a node is computed once for every edge leaving it: its ReLU, its
  ``avg_pool_3x3`` (parameterless), and the convolutions of every ``nor_conv_kxk`` leaving it, run as
  ONE convolution whose weight is the concatenation of the edges' weights (a view: they lie side by
  side, see :func:`fastnas.spaces.ops.pack_parameters`), followed by one native
  ``affine=False`` BatchNorm (updating the edges' running statistics, which lie side by side in
  memory, in its kernel) that returns a dense tensor per edge and keeps only those outputs for the
  backward (see :mod:`fastnas.spaces.ops`); the batch counts of a cell are incremented by one
  foreach kernel.

This module is the space's description (:func:`describe_cell`) and its modules in the reference
layout; :mod:`fastnas.spaces.engine` runs them.

Architecture strings follow NAS-Bench-201: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``, one group per
node, each ``op~j`` the argmax op (``none`` included) of the edge from node ``j``.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.spaces import _arch, engine
from fastnas.spaces.ops import Identity, Zero, avg_pool_3x3, batch_norm, max_pool_3x3, run_tail, to_preferred_layout
from fastnas.spaces.space import SearchSpace

__all__ = [
    "PRIMITIVES",
    "OPS",
    "ReLUConvBN",
    "POOLING",
    "FactorizedReduce",
    "ResNetBasicblock",
    "SearchCell",
    "Network",
    "parse_arch_string",
    "format_arch_string",
    "random_arch_strings",
    "one_hot",
    "describe_cell",
    "SPACE",
]

PRIMITIVES: list[str] = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


# --------------------------------------------------------------------------- candidate ops (reference layout)


class ReLUConvBN(nn.Module):
    """ReLU -> Conv2d (with a bias when ``affine`` is False, as in xautodl) -> BatchNorm2d, as ``op``."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size,
        stride,
        padding,
        dilation,
        affine: bool,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=not affine),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats),
        )

    def forward(self, x: Tensor) -> Tensor:
        return run_tail(self.op, torch.relu(x), start=1)


class POOLING(nn.Module):
    """Average or max pooling 3x3 (``count_include_pad=False``), after a 1x1 ReLUConvBN when the channel
    count changes (``preprocess``)."""

    def __init__(
        self, C_in: int, C_out: int, stride: int, mode: str, affine: bool = True, track_running_stats: bool = True
    ):
        super().__init__()
        self.preprocess = None if C_in == C_out else ReLUConvBN(C_in, C_out, 1, 1, 0, 1, affine, track_running_stats)
        if mode == "avg":
            self.op = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        elif mode == "max":
            self.op = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
        self.mode = mode
        self.stride = stride

    def pool(self, x: Tensor) -> Tensor:
        """The pooling alone (after ``preprocess``)."""
        if self.mode == "avg":
            return avg_pool_3x3(x, self.stride)
        return max_pool_3x3(x, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x if self.preprocess is None else self.preprocess(x))


class FactorizedReduce(nn.Module):
    """xautodl's FactorizedReduce: at stride 2 two 1x1 convs (``convs.0``, ``convs.1``, the second on
    the input shifted by a pixel), at stride 1 one 1x1 conv (``conv``); then BatchNorm2d (``bn``)."""

    def __init__(self, C_in: int, C_out: int, stride: int, affine: bool, track_running_stats: bool):
        super().__init__()
        self.stride = stride
        self.C_in = C_in
        self.C_out = C_out
        self.relu = nn.ReLU(inplace=False)
        if stride == 2:
            C_outs = [C_out // 2, C_out - C_out // 2]
            self.convs = nn.ModuleList(nn.Conv2d(C_in, c, 1, stride=stride, padding=0, bias=not affine) for c in C_outs)
            self.pad = nn.ConstantPad2d((0, 1, 0, 1), 0)
        elif stride == 1:
            self.conv = nn.Conv2d(C_in, C_out, 1, stride=stride, padding=0, bias=not affine)
        else:
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.bn = nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            x = torch.relu(x)
            y = self.pad(x)
            out = torch.cat([self.convs[0](x), self.convs[1](y[:, :, 1:, 1:])], dim=1)
        else:
            out = self.conv(x)
        return batch_norm(out, self.bn)


OPS: dict[str, Callable[[int, int, int, bool, bool], nn.Module]] = {
    "none": lambda C_in, C_out, stride, affine, trs: Zero(stride, C_out),
    "avg_pool_3x3": lambda C_in, C_out, stride, affine, trs: POOLING(C_in, C_out, stride, "avg", affine, trs),
    "max_pool_3x3": lambda C_in, C_out, stride, affine, trs: POOLING(C_in, C_out, stride, "max", affine, trs),
    "nor_conv_7x7": lambda C_in, C_out, stride, affine, trs: ReLUConvBN(
        C_in, C_out, (7, 7), (stride, stride), (3, 3), (1, 1), affine, trs
    ),
    "nor_conv_3x3": lambda C_in, C_out, stride, affine, trs: ReLUConvBN(
        C_in, C_out, (3, 3), (stride, stride), (1, 1), (1, 1), affine, trs
    ),
    "nor_conv_1x1": lambda C_in, C_out, stride, affine, trs: ReLUConvBN(
        C_in, C_out, (1, 1), (stride, stride), (0, 0), (1, 1), affine, trs
    ),
    "skip_connect": lambda C_in, C_out, stride, affine, trs: (
        Identity() if stride == 1 and C_in == C_out else FactorizedReduce(C_in, C_out, stride, affine, trs)
    ),
}


class ResNetBasicblock(nn.Module):
    """The residual reduction block between NAS-Bench-201's stages (not searched): two 3x3
    ReLUConvBN (the first at ``stride``) plus a 2x2-average-pool + 1x1-conv shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int, affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1, 1, affine, track_running_stats)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1, 1, affine, track_running_stats)
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False),
            )
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0, 1, affine, track_running_stats)
        else:
            self.downsample = None
        self.in_dim = inplanes
        self.out_dim = planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return residual + self.conv_b(self.conv_a(x))


# --------------------------------------------------------------------------- the search cell


def _candidate(op: nn.Module) -> engine.Candidate:
    """What a NAS-Bench-201 op module is for the engine (one that is neither zero, identity, a bare
    pool nor a ReLUConvBN is called as it is)."""
    return engine.classify(op) or engine.module_candidate(op)


def _cell_candidates(cell: nn.Module) -> list[list[engine.Candidate]]:
    return [[_candidate(op) for op in cell.edges[key]] for key in cell.edge_keys]


def describe_cell(max_nodes: int, C_out: int, stride: int, op_names: Sequence[str]) -> engine.CellDAG:
    """The engine's description of a NAS-Bench-201 cell: one input (node 0), node ``i`` fed by every
    earlier node (edge ``i<-j``, rows in sorted ``"i<-j"`` order; stride ``stride`` from the input),
    output the last node."""
    keys = sorted(f"{i}<-{j}" for i in range(1, max_nodes) for j in range(i))
    edges = []
    for key in keys:
        i, j = (int(n) for n in key.split("<-"))
        edges.append((i - 1, j, stride if j == 0 else 1))
    return engine.cell_dag(1, edges, [max_nodes - 1], C_out, op_names, _cell_candidates, labels=keys)


class SearchCell(engine.FusedCell, nn.Module):
    """A NAS-Bench-201 search cell; drop-in for xautodl's ``NAS201SearchCell``.

    Same constructor, ``edges["i<-j"]`` ModuleDict of candidate-op lists (state_dict keys
    ``edges.{i}<-{j}.{k}...``), ``edge_keys``, ``edge2index``, ``num_edges``, and ``forward(inputs,
    weightss)``, ``forward_gdas``, ``forward_joint``, ``forward_urs``, ``forward_select`` and
    ``forward_dynamic`` with the reference's results and gradients. Node ``i`` is the sum over
    ``j < i`` of edge ``i<-j`` applied to node ``j``; the output is the last node. The nodes run
    through :mod:`fastnas.spaces.engine` (:func:`describe_cell`).

    Args:
        C_in, C_out: channels of the input and of every node.
        stride: stride of the edges leaving the input.
        max_nodes: nodes including the input (4: 6 edges).
        op_names: the candidate ops, names of :data:`OPS`.
        affine, track_running_stats: of the BatchNorms in the candidate ops.
    """

    def __init__(
        self,
        C_in: int,
        C_out: int,
        stride: int,
        max_nodes: int,
        op_names: Sequence[str],
        affine: bool = False,
        track_running_stats: bool = True,
    ):
        super().__init__()
        unknown = [n for n in op_names if n not in OPS]
        if unknown:
            raise ValueError(f"op_names has unknown ops {unknown}; known: {sorted(OPS)}")
        self.op_names = deepcopy(list(op_names))
        self.edges = nn.ModuleDict()
        self.max_nodes = max_nodes
        self.in_dim = C_in
        self.out_dim = C_out
        self.stride = stride
        for i in range(1, max_nodes):
            for j in range(i):
                s, c = (stride, C_in) if j == 0 else (1, C_out)
                self.edges[f"{i}<-{j}"] = nn.ModuleList(
                    OPS[n](c, C_out, s, affine, track_running_stats) for n in op_names
                )
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)
        self._init_engine(describe_cell(max_nodes, C_out, stride, self.op_names))

    def extra_repr(self) -> str:
        return f"info :: {self.max_nodes} nodes, inC={self.in_dim}, outC={self.out_dim}"

    def forward(
        self,
        inputs: Tensor,
        weightss: Tensor,
        selected: Sequence[Sequence[int]] | None = None,
        *,
        unselected: Tensor | None = None,
        picked: Tensor | None = None,
        node_weights: list | None = None,
    ) -> Tensor:
        """Args:
            inputs: ``[B, C_in, H, W]``.
            weightss: ``[num_edges, len(op_names)]`` op weights, rows in ``edge_keys`` order (differentiable).
            selected: per edge (``edge_keys`` order) the op indices to compute, each once; None: all.
                ``none`` is never computed.
            unselected: GDAS semantics: ``[num_edges, len(op_names)]`` hard weights of the ops not
                sampled (0 where sampled), which each node adds as a scalar (see :meth:`forward_gdas`).
            picked: with ``selected`` (one op per edge), the weight of each edge's op (see
                :class:`fastnas.spaces._arch.EdgeWeights`).
            node_weights: :meth:`node_weights` of ``weightss``, ``selected`` and ``picked``, picked
                once for every cell of a network; then ``weightss`` is not read.

        Returns the last node, ``[B, C_out, H / stride, W / stride]``.
        """
        if weightss.dim() != 2 or tuple(weightss.shape) != (self.num_edges, len(self.op_names)):
            raise ValueError(
                f"weightss must have shape [{self.num_edges}, {len(self.op_names)}], got {tuple(weightss.shape)}"
            )
        return engine.run_cell(self, self._dag, [inputs], weightss, selected, picked, unselected, None, node_weights)

    def forward_gdas(self, inputs: Tensor, hardwts: Tensor, index: Tensor) -> Tensor:
        """GDAS: only op ``index[e]`` of each edge computed, weighted by ``hardwts[e, index[e]]``
        (straight-through: 1 forward, the soft gradient backward). ``index`` is ``[num_edges]`` or
        ``[num_edges, 1]``.

        As in xautodl, each edge is ``sum(hardwts[e, k] * op_k(x) if k == index[e] else hardwts[e, k])``:
        every node also adds the other hard weights of its edges as a scalar (0 in the forward for
        straight-through hard weights), so each of them gets ``sum(dL/dnode)`` as its gradient."""
        index = index.reshape(-1)
        unselected = hardwts * (1 - F.one_hot(index, hardwts.shape[-1]).to(hardwts.dtype))
        return self.forward(inputs, hardwts, [[k] for k in index.tolist()], unselected=unselected)

    def forward_joint(self, inputs: Tensor, weightss: Tensor) -> Tensor:
        """xautodl's ``forward_joint``: the same weighted sum as :meth:`forward`."""
        return self.forward(inputs, weightss)

    def forward_urs(self, inputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """SETN's uniform random sampling: per node, one op per incoming edge drawn uniformly at random,
        drawn again while every one is ``none``; the node is the unweighted sum of the drawn ops.

        The draws come from ``generator`` (torch's default generator when None, so ``torch.manual_seed``
        reproduces them), not from Python's ``random`` as in xautodl."""
        k = len(self.op_names)
        selected: list[list[int]] = [[] for _ in range(self.num_edges)]
        table = engine.candidates(self, self._dag)
        for i in range(1, self.max_nodes):
            edges = [self.edge2index[f"{i}<-{j}"] for j in range(i)]
            while True:
                ops = torch.randint(k, (i,), generator=generator).tolist()
                if not all(table[e][q].kind == engine.ZERO for e, q in zip(edges, ops)):
                    break
            for e, q in zip(edges, ops):
                selected[e] = [q]
        return self._forward_selected(inputs, selected)

    def forward_select(self, inputs: Tensor, weightss: Tensor) -> Tensor:
        """Only the argmax op of each edge, unweighted (no gradient to ``weightss``)."""
        return self._forward_selected(inputs, [[int(k)] for k in weightss.argmax(dim=-1).tolist()])

    def forward_dynamic(self, inputs: Tensor, structure) -> Tensor:
        """A fixed architecture, unweighted: ``structure.nodes`` (xautodl's ``Structure``) or the nodes
        themselves (as :func:`parse_arch_string` returns them), node ``i`` listing its ``(op, j)`` inputs;
        edges it does not list are not computed (an input listed twice counts twice)."""
        nodes = getattr(structure, "nodes", structure)
        counts = torch.zeros(self.num_edges, len(self.op_names))
        for i, node in enumerate(nodes, start=1):
            for op_name, j in node:
                counts[self.edge2index[f"{i}<-{j}"], self.op_names.index(op_name)] += 1
        selected = [row.nonzero().flatten().tolist() for row in counts]
        return self.forward(inputs, counts.to(dtype=inputs.dtype, device=inputs.device), selected)

    def _forward_selected(self, inputs: Tensor, selected: list[list[int]]) -> Tensor:
        """The unweighted sum of the ``selected`` ops of each edge."""
        ones = torch.ones(self.num_edges, len(self.op_names), dtype=inputs.dtype, device=inputs.device)
        return self.forward(inputs, ones, selected)


# --------------------------------------------------------------------------- the network


class Network(_arch.ArchMixin, nn.Module):
    """The NAS-Bench-201 search network: stem, three stages of ``N`` search cells at ``C``, ``2C``,
    ``4C`` channels separated by residual reduction blocks, BatchNorm + ReLU, global average pooling
    and a linear classifier; ``forward(x)`` maps ``[B, in_channels, H, W]`` to logits ``[B,
    num_classes]``. All search cells share the architecture parameters ``alphas`` ``[num_edges, 5]``
    (rows in ``edge_keys`` order: ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``).

    Args:
        C, N, num_classes, max_nodes: as in xautodl's ``TinyNetworkDarts``.
        in_channels: image channels.
        arch, sampler: weighting mode, see :class:`fastnas.spaces._arch.ArchMixin` (``"logits"`` /
            ``"simplex"``; None / ``"gdas"`` / ``"uniform"``).
        affine, track_running_stats: of the search cells' BatchNorms (``NAS201SearchCell``'s defaults).
    """

    def __init__(
        self,
        C: int = 16,
        N: int = 5,
        num_classes: int = 10,
        max_nodes: int = 4,
        *,
        in_channels: int = 3,
        arch: str = "logits",
        sampler: str | None = None,
        affine: bool = False,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self._C = C
        self._layerN = N
        self.max_nodes = max_nodes
        self._init_arch_modes(arch, sampler)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev = C
        self.cells = nn.ModuleList()
        self.edge_keys: list[str] = []
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResNetBasicblock(C_prev, C_curr, 2)
            else:
                cell = SearchCell(C_prev, C_curr, 1, max_nodes, PRIMITIVES, affine, track_running_stats)
                self.edge_keys = cell.edge_keys
            self.cells.append(cell)
            C_prev = cell.out_dim
        self.op_names = list(PRIMITIVES)
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.alphas = nn.Parameter(self._init_rows(len(self.edge_keys), len(PRIMITIVES)))
        self._arch_names = ["alphas"]

    def _search_cells(self) -> list[SearchCell]:
        return [cell for cell in self.cells if isinstance(cell, SearchCell)]

    def arch_simplex_segments(self, p: Tensor) -> tuple[int, ...] | None:
        """None: every row of ``alphas`` is one simplex."""
        if p is not self.alphas:
            raise ValueError("p must be one of arch_parameters()")
        return None

    def forward(self, x: Tensor, sample: dict[str, Tensor] | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x`` ``[B, in_channels, H, W]``. ``sample``: a draw of
        :meth:`sample_architecture` to use (samplers only; None: one is drawn now)."""
        weights, selected, unselected, picked = self._edge_weights_of("alphas", sample)
        feature = to_preferred_layout(self.stem(to_preferred_layout(x)))
        shared = None  # the cells' node weights, picked once (see SearchCell.node_weights)
        for cell in self.cells:
            if isinstance(cell, SearchCell):
                if shared is None:
                    shared = cell.node_weights(weights, selected, picked)
                feature = cell(feature, weights, selected, unselected=unselected, picked=picked, node_weights=shared)
            else:
                feature = cell(feature)
        out = self.global_pooling(self.lastact(feature))
        return self.classifier(out.flatten(1))

    @torch.no_grad()
    def arch_weights(self) -> dict[str, Tensor]:
        """``{"cell": [num_edges, 5]}``: the current op weights, detached, rows on the simplex."""
        return {"cell": self._normalised(self.alphas).detach().clone()}

    @torch.no_grad()
    def genotype(self) -> tuple[tuple[tuple[str, int], ...], ...]:
        """Per node ``i = 1..max_nodes-1`` the pairs ``(op, j)``: the argmax op (``none`` included) of
        edge ``i<-j``, as xautodl's ``genotype()``."""
        best = self.alphas.argmax(dim=-1).tolist()
        return tuple(
            tuple((self.op_names[best[self.edge2index[f"{i}<-{j}"]]], j) for j in range(i))
            for i in range(1, self.max_nodes)
        )

    def arch_string(self) -> str:
        """The NAS-Bench-201 string of :meth:`genotype`, e.g. ``|nor_conv_3x3~0|+|none~0|skip_connect~1|+...``."""
        return format_arch_string(self.genotype())

    def export(self) -> str:
        """:meth:`arch_string`; :func:`parse_arch_string` reads it back."""
        return self.arch_string()

    def edge_labels(self) -> list[str]:
        """``"i<-j"`` for every row of ``alphas``: :attr:`edge_keys`."""
        return list(self.edge_keys)


def format_arch_string(nodes: Sequence[Sequence[tuple[str, int]]]) -> str:
    """``|op~j|...|`` per node, joined by ``+``."""
    return "+".join("|" + "|".join(f"{op}~{j}" for op, j in node) + "|" for node in nodes)


def benchmark_cell_error(nodes: Sequence[Sequence[tuple[str, int]]]) -> str | None:
    """Why ``nodes`` (as :func:`parse_arch_string` returns them) is not one of NAS-Bench-201's 15,625
    cells (3 nodes, node ``i`` taking one op from each of the nodes ``0 .. i-1`` in order), or None."""
    if len(nodes) != 3:
        return f"it has {len(nodes)} nodes, NAS-Bench-201's cells have 3"
    for i, node in enumerate(nodes, start=1):
        inputs = [j for _, j in node]
        if inputs != list(range(i)):
            expected = "|".join(f"op~{j}" for j in range(i))
            return f"node {i} takes inputs {inputs}, NAS-Bench-201's takes one op from each earlier node: |{expected}|"
    return None


def parse_arch_string(text: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """The nodes of a NAS-Bench-201 string: ``((("op", 0),), (("op", 0), ("op", 1)), ...)``.

    Raises ValueError naming what is wrong (a node that is not ``|...|``, an unknown op, an input
    index that is not an earlier node)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    nodes = []
    for i, group in enumerate(text.strip().split("+"), start=1):
        if len(group) < 2 or group[0] != "|" or group[-1] != "|":
            raise ValueError(f"text: node {i} is {group!r}, expected '|op~j|...|'")
        pairs = []
        for item in group[1:-1].split("|"):
            op, sep, j = item.partition("~")
            if not sep or not j.isdigit():
                raise ValueError(f"text: node {i} has {item!r}, expected 'op~j'")
            if op not in OPS:
                raise ValueError(f"text: node {i} has the unknown op {op!r}")
            if int(j) >= i:
                raise ValueError(f"text: node {i} takes input {j}, which is not an earlier node")
            pairs.append((op, int(j)))
        nodes.append(tuple(pairs))
    return tuple(nodes)


def random_arch_strings(count: int, gen: torch.Generator) -> list[str]:
    """``count`` distinct uniformly random NAS-Bench-201 cells (one op per edge, ``none`` included),
    as architecture strings, drawn from ``gen``."""
    if not 1 <= count <= len(PRIMITIVES) ** 6:
        raise ValueError(f"count must lie in [1, {len(PRIMITIVES) ** 6}], got {count}")
    seen: dict[str, None] = {}
    while len(seen) < count:
        ops = torch.randint(0, len(PRIMITIVES), (6,), generator=gen).tolist()
        nodes = [[(PRIMITIVES[ops[i * (i - 1) // 2 + j]], j) for j in range(i)] for i in range(1, 4)]
        seen.setdefault(format_arch_string(nodes), None)
    return list(seen)


def one_hot(arch: str, edge_keys: Sequence[str]) -> Tensor:
    """The one-hot op weights ``[len(edge_keys), 5]`` (rows in ``edge_keys`` order, ``"i<-j"``) of a
    NAS-Bench-201 string: fixes a supernet's ``alphas`` (simplex mode) to that cell."""
    w = torch.zeros(len(edge_keys), len(PRIMITIVES))
    keys = list(edge_keys)
    for i, node in enumerate(parse_arch_string(arch), start=1):
        for op, j in node:
            w[keys.index(f"{i}<-{j}"), PRIMITIVES.index(op)] = 1.0
    return w


# --------------------------------------------------------------------------- the space, for the run side


class NB201Space(SearchSpace):
    """The NAS-Bench-201 space for ``fastnas search|train|rank`` (see
    :class:`fastnas.spaces.space.SearchSpace`)."""

    name = "nb201"
    title = "NAS-Bench-201"
    notation = "a NAS-Bench-201 string"
    op_names = tuple(PRIMITIVES)
    example_arch = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    size = len(PRIMITIVES) ** 6

    def build_supernet(
        self, *, channels, cells, num_classes, in_channels, arch, sampler, partial_channels=1, stem="cifar"
    ) -> Network:
        if partial_channels != 1:
            raise ValueError(f"partial_channels: the nb201 space has none, got {partial_channels}")
        if stem != "cifar":
            raise ValueError(f"stem: the nb201 space has the CIFAR stem only, got {stem!r}")
        return Network(
            C=channels, N=cells, num_classes=num_classes, in_channels=in_channels, arch=arch, sampler=sampler
        )

    def random_weights(self, rows: int, ops: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        """One op per edge, ``none`` included (the benchmark's 15,625 cells)."""
        w = torch.zeros(rows, ops, dtype=dtype)
        w[torch.arange(rows), torch.randint(0, ops, (rows,), generator=gen)] = 1.0
        return w

    def random_candidates(self, net: nn.Module, count: int, gen: torch.Generator) -> list[tuple[str, list[Tensor]]]:
        return [(a, self.one_hot(net, a)) for a in random_arch_strings(count, gen)]

    def one_hot(self, net: nn.Module, arch: str) -> list[Tensor]:
        return [one_hot(arch, net.edge_keys)]

    def looks_like(self, arch: str) -> bool:
        return arch.lstrip().startswith("|")

    def parse(self, arch: str) -> tuple[tuple[tuple[str, int], ...], ...]:
        """The nodes of one of the benchmark's 15,625 cells (a string outside them: ValueError)."""
        nodes = parse_arch_string(arch)
        reason = benchmark_cell_error(nodes)
        if reason is not None:
            raise ValueError(f"not a NAS-Bench-201 cell: {reason}")
        return nodes

    def chosen_ops(self, arch: str) -> dict[str, dict[str, str]]:
        nodes = parse_arch_string(arch)
        return {"cell": {f"{i}<-{j}": op for i, node in enumerate(nodes, start=1) for op, j in node}}


SPACE = NB201Space()
