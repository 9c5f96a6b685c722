"""One executor for the cells of every search space.

A search space describes its cell as a :class:`CellDAG`: the cell's input states, its nodes, each
edge's ``(target node, source state, stride)`` in the row order of the op weights, the states whose
concatenation is the output, and a function (``ops_of``) that says what each candidate op of each
edge is, as a :class:`Candidate` of one kind:

* ``ZERO`` (``none``): never computed; it adds nothing and its weight's gradient is 0;
* ``IDENTITY``: the source state itself goes into the mixed sum (no copy);
* ``POOL``: a 3x3 max or average pooling, optionally followed by an affine-free BatchNorm: computed
  once per source state and stride, the BatchNorm once for every edge that shares it;
* ``CONV``: an ``nn.Sequential`` ``ReLU -> (Conv2d | BatchNorm2d | ReLU)* -> BatchNorm2d`` (a
  convolution stage of the reference code, its ReLU shared by every op leaving the state);
* ``MODULE``: anything else, run by the candidate's own function.

The functions here run any such description, ``cell`` being the module that holds the candidate
ops (a fastnas cell, or an existing model's cell bound by :func:`fastnas.patch`):

* per source state, ops of one kind and index on all the edges leaving it run together: each
  convolution stage as ONE convolution over the edges' concatenated weights (the first over the
  state's ReLU, repeated once per edge unless the convolution is dense; the later ones grouped by
  edge), each BatchNorm as ONE BatchNorm over the edges' channels, the last writing one dense tensor
  per edge (:func:`fastnas.spaces.ops.batch_norm`). The groups' weights, biases and running
  statistics lie side by side in memory (:func:`pack_groups`), so that their concatenation is a
  view and one kernel updates the statistics;
* each node is ONE :func:`fastnas.mixed_sum` over its incoming ``(edge, op)`` pairs, in edge then op
  order, weighted by :func:`node_weights` (the network picks them once per kind of cell and forward);
  a node whose ops are all ``none`` is zero;
* ``selected`` (per edge, the op indices to compute: GDAS, uniform sampling, a fixed architecture)
  computes only those ops; ``unselected`` adds xautodl's GDAS scalars (the hard weights of the ops
  not sampled) to each node; PC-DARTS's partial channels (``partial_channels = k``) send ``1/k`` of
  each state's channels through the ops and bypass the rest;
* :class:`FusedCell` compiles the nodes (``compile_nodes``): the weights concatenation and each
  node's op weights come in as arguments, the running statistics are updated after the graph
  (:class:`fastnas.spaces.ops.StatUpdates`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnas.ops.batch_norm import bn_constants
from fastnas.ops.depthwise_conv import depthwise_conv2d
from fastnas.ops.max_pool import max_pool2d
from fastnas.ops.mixed_sum import mixed_sum
from fastnas.spaces._arch import pick_weights
from fastnas.spaces.ops import (
    BatchNormGroup,
    Identity,
    StatUpdates,
    Zero,
    avg_pool_3x3,
    batch_norm,
    cached_plan,
    can_leave_out_biases,
    cat_parameters,
    lean_bn_eligible,
    max_pool_3x3,
    pack_parameters,
    pack_running_stats,
    preferred_memory_format,
    repeat_channels,
    run_tail,
    shared_batch_norm,
)

__all__ = [
    "ZERO",
    "IDENTITY",
    "POOL",
    "CONV",
    "MODULE",
    "Candidate",
    "CellDAG",
    "cell_dag",
    "classify",
    "is_conv_chain",
    "candidates",
    "module_candidate",
    "FusedCell",
    "run_cell",
    "node_weights",
    "pack_groups",
    "channel_shuffle",
]

ZERO, IDENTITY, POOL, CONV, MODULE = "zero", "identity", "pool", "conv", "module"

Runner = Callable[[Tensor, Callable[..., Tensor], "Tensor | None", StatUpdates], Tensor]


class Candidate(NamedTuple):
    """What one candidate op of one edge is (see the module docstring for the kinds).

    * ``seq``: ``CONV``: the ``nn.Sequential`` whose ``[0]`` is the ReLU the state's ops share;
    * ``pool``: ``POOL``: ``("max" | "avg", stride)``; ``bn``: the BatchNorm after it, or None;
    * ``run``: ``MODULE``: ``run(x, relu_x, unit, updates)`` returns the op's output for the source
      state ``x`` (``relu_x()``: ``relu(x)``, shared; ``unit``, ``updates``: as in
      :func:`fastnas.spaces.ops.batch_norm`).
    """

    kind: str
    module: nn.Module
    seq: nn.Sequential | None = None
    pool: tuple[str, int] | None = None
    bn: nn.BatchNorm2d | None = None
    run: Runner | None = None
    group: int | None = None  # set by candidates(): ops of one index with equal groups run together


class CellDAG(NamedTuple):
    """A cell's description (build it with :func:`cell_dag`). States ``0 .. inputs-1`` are the cell's
    inputs, state ``inputs + i`` is node ``i``."""

    inputs: int
    edges: tuple[tuple[int, int, int], ...]  # (target node, source state, stride), in weight-row order
    output: tuple[int, ...]  # states concatenated (along the channels) as the output
    channels: int  # of every node (before partial channels)
    op_names: tuple[str, ...]  # the candidate ops, the weights' columns
    labels: tuple  # how ``last_computed`` names each edge
    ops_of: Callable[[nn.Module], Sequence[Sequence[Candidate]]]  # per edge and op, from the cell
    partial_channels: int
    into: tuple[tuple[int, ...], ...]  # per node, its incoming edges in row order
    out_of: tuple[tuple[int, ...], ...]  # per state, the edges leaving it by target node
    into_range: tuple[tuple[int, int] | None, ...]  # per node, (first, last + 1) when its rows are a range


def cell_dag(
    inputs: int,
    edges: Sequence[tuple[int, int, int]],
    output: Sequence[int],
    channels: int,
    op_names: Sequence[str],
    ops_of: Callable[[nn.Module], Sequence[Sequence[Candidate]]],
    labels: Sequence | None = None,
    partial_channels: int = 1,
) -> CellDAG:
    """The :class:`CellDAG` of a cell: ``edges`` ``(target node, source state, stride)`` (a node's
    sources are inputs or earlier nodes), ``output`` the states concatenated as the cell's output,
    ``ops_of(cell)`` one row of :class:`Candidate` per edge (``len(op_names)`` each); ``labels``:
    the edges' names in ``last_computed`` (default: their indices)."""
    edges = tuple((int(i), int(j), int(s)) for i, j, s in edges)
    nodes = 1 + max(i for i, _, _ in edges)
    for i, j, s in edges:
        if not 0 <= j < inputs + i or s < 1:
            raise ValueError(f"edges: ({i}, {j}, {s}) is not (node, an earlier state, stride >= 1)")
    states = inputs + nodes
    if not output or any(not 0 <= t < states for t in output):
        raise ValueError(f"output must name states of 0..{states - 1}, got {tuple(output)}")
    into = tuple(tuple(e for e, (i, _, _) in enumerate(edges) if i == n) for n in range(nodes))
    if not all(into):
        raise ValueError("edges: every node needs an incoming edge")
    out_of = tuple(
        tuple(sorted((e for e, (_, j, _) in enumerate(edges) if j == t), key=lambda e: edges[e][0]))
        for t in range(states)
    )
    labels = tuple(range(len(edges))) if labels is None else tuple(labels)
    ranges = tuple((r[0], r[-1] + 1) if list(r) == list(range(r[0], r[-1] + 1)) else None for r in into)
    return CellDAG(
        inputs, edges, tuple(output), channels, tuple(op_names), labels, ops_of, partial_channels, into, out_of, ranges
    )


# --------------------------------------------------------------------------- what an op is


def _pool_key(module: nn.Module) -> tuple[str, int] | None:
    """``("max" | "avg", stride)`` of a 3x3, padding-1 pooling module the spaces' pools compute
    (average without the padding), else None."""
    if not isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) or module.ceil_mode:
        return None
    if _pair(module.kernel_size) != (3, 3) or _pair(module.padding) != (1, 1):
        return None
    stride = _pair(module.stride)
    if stride[0] != stride[1]:
        return None
    if isinstance(module, nn.MaxPool2d):
        return ("max", stride[0]) if _pair(module.dilation) == (1, 1) and not module.return_indices else None
    if module.count_include_pad or module.divisor_override is not None:
        return None
    return ("avg", stride[0])


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def is_conv_chain(seq: nn.Module) -> bool:
    """``ReLU -> (Conv2d | BatchNorm2d | ReLU)* -> BatchNorm2d``, plain modules (out-of-place ReLUs,
    zero-padded convolutions), at least one convolution."""
    if type(seq) is not nn.Sequential or len(seq) < 3:
        return False
    layers = list(seq)
    if type(layers[0]) is not nn.ReLU or type(layers[-1]) is not nn.BatchNorm2d:
        return False
    for m in layers:
        if type(m) is nn.ReLU and m.inplace:
            return False
        if type(m) is nn.Conv2d and m.padding_mode != "zeros":
            return False
        if type(m) not in (nn.ReLU, nn.Conv2d, nn.BatchNorm2d):
            return False
    return any(type(m) is nn.Conv2d for m in layers)


def classify(module: nn.Module) -> Candidate | None:
    """The :class:`Candidate` of a reference-code op module recognised by its structure: a ``Zero``
    (``none``), an ``Identity``, a 3x3 pooling (alone, as ``nn.Sequential(pool, BatchNorm2d)``, or
    as xautodl's ``POOLING`` without preprocessing: ``op`` the pool, ``preprocess`` None), a
    convolution stage (an ``nn.Sequential`` ``ReLU -> ... -> BatchNorm2d``, itself or as ``op``);
    None for anything else."""
    name = type(module).__name__
    if isinstance(module, Zero) or name == "Zero":
        return Candidate(ZERO, module)
    plain = not module._parameters and not module._modules
    if isinstance(module, (Identity, nn.Identity)) or (name == "Identity" and plain):
        return Candidate(IDENTITY, module)
    key = _pool_key(module)
    if key is not None:
        return Candidate(POOL, module, pool=key)
    if type(module) is nn.Sequential and len(module) == 2 and type(module[1]) is nn.BatchNorm2d:
        key = _pool_key(module[0])
        if key is not None and not module[1].affine:
            return Candidate(POOL, module, pool=key, bn=module[1])
    inner = module._modules.get("op")
    if (
        inner is not None
        and getattr(module, "preprocess", False) is None
        and set(module._modules) <= {"op", "preprocess"}
    ):
        key = _pool_key(inner)
        if key is not None and not module._parameters:
            return Candidate(POOL, module, pool=key)
    if is_conv_chain(module):
        return Candidate(CONV, module, seq=module)
    if inner is not None and set(module._modules) == {"op"} and not module._parameters and is_conv_chain(inner):
        return Candidate(CONV, module, seq=inner)
    return None


def module_candidate(module: nn.Module) -> Candidate:
    """A ``MODULE`` candidate that calls ``module(x)``."""
    return Candidate(MODULE, module, run=lambda x, relu_x, unit, updates: module(x))


def candidates(cell: nn.Module, dag: CellDAG) -> Sequence[Sequence[Candidate]]:
    """The cell's :class:`Candidate` per edge and op (``dag.ops_of(cell)``, cached), with their groups."""
    return cached_plan(cell, "candidates", _grouped_candidates, cell, dag)


def _grouped_candidates(cell: nn.Module, dag: CellDAG) -> list[list[Candidate]]:
    keys: dict = {}  # group key -> a small int, cheap to hash at every call
    table = dag.ops_of(cell)
    return [
        [c._replace(group=keys.setdefault(_group_key(c, e), len(keys))) for c in row] for e, row in enumerate(table)
    ]


# --------------------------------------------------------------------------- the plans


def _group_key(c: Candidate, e: int):
    """Candidates of one op index with equal keys (on edges leaving one state) run together."""
    if c.kind == CONV:
        return (CONV, tuple(_layer_key(m) for m in c.seq))
    if c.kind == POOL:
        return (POOL, c.pool, c.bn is None)
    if c.kind == IDENTITY:
        return (IDENTITY,)
    return (MODULE, e)


def _layer_key(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        geometry = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
        return ("conv", *geometry, m.bias is None)
    if isinstance(m, nn.BatchNorm2d):
        return ("bn", m.num_features)
    return ("relu",)


def _state_items(dag: CellDAG, table, j: int, selected) -> list[tuple[int, str, tuple[int, ...]]]:
    """``(op, kind, edges)`` for every group of ops computed from state ``j``, by op index."""
    groups: dict = {}
    for e in dag.out_of[j]:
        row = table[e]
        for q in range(len(row)) if selected is None else selected[e]:
            c = row[q]
            if c.kind != ZERO:
                groups.setdefault((q, c.group), []).append(e)
    items = [(q, table[edges[0]][q].kind, tuple(edges)) for (q, _), edges in groups.items()]
    return sorted(items, key=lambda item: item[0])


def _items(cell: nn.Module, dag: CellDAG, table, j: int, selected):
    if selected is None:
        return cached_plan(cell, ("items", j), _state_items, dag, table, j, None)
    return _state_items(dag, table, j, selected)


def _conv_plan(table, q: int, edges: Sequence[int]):
    """``(sequentials, stages, bn_groups)`` of op ``q`` on ``edges``: per layer after the ReLU,
    ``(index, layer of the first edge, that layer of every edge or a BatchNormGroup)``."""
    seqs = [table[e][q].seq for e in edges]
    stages = []
    for index, layers in enumerate(zip(*seqs)):
        if index == 0:
            continue
        first = layers[0]
        stages.append((index, first, BatchNormGroup(layers) if isinstance(first, nn.BatchNorm2d) else list(layers)))
    bn_groups = [group for _, first, group in stages if isinstance(first, nn.BatchNorm2d)]
    return seqs, stages, bn_groups


def node_pairs(
    cell: nn.Module, dag: CellDAG, i: int, selected: Sequence[Sequence[int]] | None
) -> list[tuple[int, int]]:
    """The ``(edge, op)`` pairs node ``i`` sums (``none`` left out), in edge then op order."""
    if selected is None:
        return cached_plan(cell, ("pairs", i), _node_pairs, dag, candidates(cell, dag), i, None)
    return _node_pairs(dag, candidates(cell, dag), i, selected)


def _node_pairs(dag: CellDAG, table, i: int, selected) -> list[tuple[int, int]]:
    rows = [(e, range(len(table[e])) if selected is None else sorted(selected[e])) for e in dag.into[i]]
    return [(e, q) for e, ops in rows for q in ops if table[e][q].kind != ZERO]


def node_weights(
    cell: nn.Module,
    dag: CellDAG,
    weights: Tensor,
    selected: Sequence[Sequence[int]] | None = None,
    picked: Tensor | None = None,
) -> list[Tensor | None]:
    """Per node, its op weights as one vector in :func:`node_pairs` order (None for a zero node): what
    :func:`run_cell` multiplies the node's ops by. Cells of one kind share them within a forward
    (their slicing and its backward run once, the cells' gradients add up in the vector first)."""
    out = []
    for i in range(len(dag.into)):
        pairs = node_pairs(cell, dag, i, selected)
        out.append(pick_weights(weights, pairs, picked) if pairs else None)
    return out


@torch.no_grad()
def pack_groups(cell: nn.Module, dag: CellDAG) -> None:
    """The convolution stages run as one convolution and one BatchNorm (every op of one index on the
    edges leaving a state) keep their weights, biases and running statistics side by side (see
    :func:`fastnas.spaces.ops.pack_parameters` and :func:`fastnas.spaces.ops.pack_running_stats`)."""
    table = candidates(cell, dag)
    for j in range(len(dag.out_of)):
        for q, kind, edges in _items(cell, dag, table, j, None):
            if kind != CONV or len(edges) < 2:
                continue
            for _, first, group in cached_plan(cell, ("conv", q, edges), _conv_plan, table, q, edges)[1]:
                if isinstance(first, nn.BatchNorm2d):
                    pack_running_stats(group.bns)
                elif isinstance(first, nn.Conv2d):
                    pack_parameters(group, "weight")
                    pack_parameters(group, "bias")


def packed_weights(cell: nn.Module, dag: CellDAG, selected: Sequence[Sequence[int]] | None) -> dict[tuple, Tensor]:
    """The weight (and bias, where the BatchNorm after it cannot leave it out) of every grouped
    convolution the nodes will run, keyed ``(op, edges, layer index[, "bias"])``: made before a
    compiled graph, they are views of the packed parameters, where inside the graph each would be a
    copy forward and a split backward."""
    table = candidates(cell, dag)
    packed = {}
    for j in range(len(dag.out_of)):
        for q, kind, edges in _items(cell, dag, table, j, selected):
            if kind != CONV:
                continue
            _, stages, bn_groups = cached_plan(cell, ("conv", q, edges), _conv_plan, table, q, edges)
            if not all(lean_bn_eligible(b) for group in bn_groups for b in group):
                continue
            for n, (index, first, group) in enumerate(stages):
                if not isinstance(first, nn.Conv2d):
                    continue
                packed[q, edges, index] = cat_parameters([c.weight for c in group])
                if first.bias is not None and not _bias_left_out(stages, n):
                    packed[q, edges, index, "bias"] = cat_parameters([c.bias for c in group])
    return packed


def _bias_left_out(stages, n: int) -> bool:
    """Whether the bias of the convolution at stage ``n`` goes to the BatchNorm right after it."""
    return (
        n + 1 < len(stages) and isinstance(stages[n + 1][1], nn.BatchNorm2d) and can_leave_out_biases(stages[n + 1][2])
    )


# --------------------------------------------------------------------------- the forward


def run_cell(
    cell: nn.Module,
    dag: CellDAG,
    states: list[Tensor],
    weights: Tensor,
    selected: Sequence[Sequence[int]] | None = None,
    picked: Tensor | None = None,
    unselected: Tensor | None = None,
    edge_weights: Tensor | None = None,
    nodes_w: list | None = None,
    updates: StatUpdates | None = None,
) -> Tensor:
    """The cell's output from its input ``states`` (``[B, C, H, W]`` each, preprocessed).

    ``weights``: ``[len(edges), len(op_names)]`` op weights; ``selected``: per edge the op indices to
    compute (None: every op); ``picked``: with ``selected`` (one op per edge), each edge's op weight
    ``[len(edges)]``, read instead of ``weights`` (see :class:`fastnas.spaces._arch.EdgeWeights`);
    ``unselected``: GDAS's hard weights of the ops not sampled, each node adding those of its edges;
    ``edge_weights``: PC-DARTS's ``[len(edges)]`` weights of the bypassed channels; ``nodes_w``:
    :func:`node_weights` of these arguments, when the caller picked them; ``updates``: the cell's
    BatchNorm bookkeeping so far (its preprocessing's), applied at the end."""
    updates = StatUpdates() if updates is None else updates
    compiled = getattr(cell, "_compiled_nodes", None)
    if compiled is None:
        return _nodes(cell, dag, states, weights, selected, picked, unselected, edge_weights, nodes_w, updates)
    deferred = StatUpdates(deferred=True, plans=cell)  # the compiled graph leaves every buffer alone
    packed = packed_weights(cell, dag, selected) if cell.training else {}
    if nodes_w is None:
        nodes_w = node_weights(cell, dag, weights, selected, picked)
    out = compiled(states, weights, selected, picked, unselected, edge_weights, nodes_w, deferred, packed)
    updates.apply()
    deferred.apply()
    return out


def _nodes(
    cell: nn.Module,
    dag: CellDAG,
    states: list[Tensor],
    weights: Tensor,
    selected,
    picked: Tensor | None,
    unselected: Tensor | None,
    edge_weights: Tensor | None,
    nodes_w: list | None,
    updates: StatUpdates,
    packed: dict | None = None,
) -> Tensor:
    """:func:`run_cell`'s nodes (``updates`` applied here unless deferred; ``packed``: see
    :func:`packed_weights`)."""
    table = candidates(cell, dag)
    tracing = torch.compiler.is_compiling()
    computed: list = []
    states = list(states)
    k = dag.partial_channels
    nodes = len(dag.into)
    queues: list[list[tuple[int, int, Tensor]]] = [[] for _ in range(nodes)]  # (edge, op, output)
    passes: list[list[Tensor]] = [[] for _ in range(nodes)]  # PC-DARTS: the bypassed channels
    unit = getattr(cell, "_bn_unit", None)
    for i in range(nodes):
        for j in range(dag.inputs) if i == 0 else (dag.inputs + i - 1,):  # the states that became known
            x, rest = states[j], None
            if k > 1:  # one split, whose backward is one concatenation
                x, rest = x.split([x.shape[1] // k, x.shape[1] - x.shape[1] // k], dim=1)
                x = x.contiguous(memory_format=preferred_memory_format(x))
            _emit(cell, dag, table, j, x, selected, queues, updates, packed, unit)
            if k > 1:
                for e in dag.out_of[j]:
                    stride = dag.edges[e][2]
                    passes[dag.edges[e][0]].append(rest if stride == 1 else max_pool2d(rest, stride, stride))
        queue = sorted(queues[i], key=lambda t: t[:2])
        if not tracing:
            computed += [(dag.labels[e], dag.op_names[q]) for e, q, _ in queue]
        if queue:
            w = nodes_w[i] if nodes_w is not None else pick_weights(weights, [(e, q) for e, q, _ in queue], picked)
            outs = [o for *_, o in queue]
            if i == nodes - 1:  # the biases left out of convolutions get their zero gradients through it
                outs[0] = updates.through(outs[0])
            node = mixed_sum(outs, w)
        else:  # every computed op of this node is 'none': the node is zero
            e = dag.into[i][0]
            B, _, H, W = states[dag.edges[e][1]].shape
            s = dag.edges[e][2]
            node = states[dag.edges[e][1]].new_zeros(B, dag.channels // k, -(-H // s), -(-W // s))
        if k > 1:
            ew = _node_rows(edge_weights, dag, i) if edge_weights is not None else None
            ones = torch.ones(len(dag.into[i]), dtype=weights.dtype, device=weights.device) if ew is None else ew
            node = channel_shuffle(torch.cat([node, mixed_sum(passes[i], ones)], dim=1), k)
        if unselected is not None:
            node = node + _node_rows(unselected, dag, i).sum()
        states.append(node)
    if not tracing:
        cell.last_computed = computed
    if not updates.deferred:
        updates.apply()
    out = [states[t] for t in dag.output]
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _node_rows(t: Tensor, dag: CellDAG, i: int) -> Tensor:
    """The rows of ``t`` of node ``i``'s incoming edges: a slice when they are a range (no index tensor)."""
    span = dag.into_range[i]
    return t[span[0] : span[1]] if span is not None else torch.stack([t[r] for r in dag.into[i]])


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """PC-DARTS's channel shuffle: ``[B, g*c, H, W]`` viewed as ``[B, g, c, H, W]``, transposed to
    ``[B, c, g, H, W]`` and flattened back."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


def _emit(cell, dag: CellDAG, table, j: int, x: Tensor, selected, queues, updates, packed, unit) -> None:
    """Compute every needed op of every edge leaving state ``j`` (input ``x``) and queue it for its
    target node."""
    relu: dict[int, Tensor] = {}  # times -> relu(x) repeated that many times along the channels

    def relu_x(times: int = 1) -> Tensor:
        if 1 not in relu:
            relu[1] = torch.relu(x)
        if times not in relu:
            relu[times] = repeat_channels(relu[1], times)
        return relu[times]

    unit = unit if unit is not None and unit.dtype == x.dtype else None
    pools: dict[tuple[str, int], Tensor] = {}
    for q, kind, edges in _items(cell, dag, table, j, selected):
        if kind == IDENTITY:
            outs = [x] * len(edges)
        elif kind == POOL:
            outs = _pool_group(cell, table, q, edges, x, pools, unit, updates)
        elif kind == CONV:
            outs = _conv_group(cell, table, q, edges, relu_x, unit, updates, packed)
        else:
            outs = [table[e][q].run(x, relu_x, unit, updates) for e in edges]
        for e, out in zip(edges, outs):
            queues[dag.edges[e][0]].append((e, q, out))


def _pool_group(cell, table, q: int, edges, x: Tensor, pools: dict, unit, updates) -> list[Tensor]:
    """Op ``q`` (a pool) of every edge in ``edges``: the pooling once per state and stride, its
    BatchNorm (if any) once for all the edges."""
    first = table[edges[0]][q]
    pooled = pools.get(first.pool)
    if pooled is None:
        mode, stride = first.pool
        pooled = pools[first.pool] = max_pool_3x3(x, stride) if mode == "max" else avg_pool_3x3(x, stride)
    if first.bn is None:
        return [pooled] * len(edges)
    bns = cached_plan(cell, ("pool bns", q, edges), lambda: [table[e][q].bn for e in edges])
    if all(lean_bn_eligible(b) for b in bns):
        return [shared_batch_norm(pooled, bns, unit, updates)] * len(edges)
    return [b(pooled) for b in bns]


def _conv_group(cell, table, q: int, edges, relu_x, unit, updates: StatUpdates, packed) -> list[Tensor]:
    """Op ``q`` (a convolution stage) of every edge in ``edges``, given ``relu_x(times)``, their
    shared input ``relu(x)`` repeated ``times`` along the channels: each convolution is ONE
    convolution over the edges' concatenated weights (the first over the input repeated once per
    edge, or over the input itself when dense; the later ones grouped by edge), each BatchNorm ONE
    BatchNorm over the edges' channels; returns one dense output per edge (``packed``: the
    concatenated weights, when :func:`packed_weights` made them)."""
    seqs, stages, bn_groups = cached_plan(cell, ("conv", q, edges), _conv_plan, table, q, edges)
    if not all(lean_bn_eligible(b) for group in bn_groups for b in group):
        return [run_tail(s, relu_x(), start=1) for s in seqs]  # running statistics in use: module by module
    m = len(edges)
    y, biases = None, None
    for n, (index, first, group) in enumerate(stages):
        if isinstance(first, nn.ReLU):
            y = torch.relu(y)
        elif isinstance(first, nn.BatchNorm2d):
            last = n == len(stages) - 1
            y = batch_norm(y, group, unit, parts=m if last else 1, updates=updates, biases=biases)
            biases = None
        else:
            if y is None:  # the first convolution reads the state's ReLU
                y, groups = (relu_x(), 1) if first.groups == 1 else (relu_x(m), m * first.groups)
            else:
                groups = m * first.groups
            weight = packed.get((q, edges, index)) if packed is not None else None
            if weight is None:
                weight = cat_parameters([c.weight for c in group])
            bias = None
            if first.bias is not None and _bias_left_out(stages, n):  # (affine=False: xautodl's convs
                biases = [c.bias for c in group]  # have biases, which the BatchNorm removes)
            elif first.bias is not None:
                bias = packed.get((q, edges, index, "bias")) if packed is not None else None
                if bias is None:
                    bias = cat_parameters([c.bias for c in group])
            depthwise = groups == y.shape[1] == weight.shape[0] and weight.shape[1] == 1
            if depthwise and bias is None and not isinstance(first.padding, str):
                y = depthwise_conv2d(y, weight, first.stride, first.padding, first.dilation)
            else:
                y = F.conv2d(y, weight, bias, first.stride, first.padding, first.dilation, groups)
    return y if m > 1 else [y]


# --------------------------------------------------------------------------- the module side


class FusedCell:
    """What a search space's cell module adds to ``nn.Module`` to run through this engine: its
    :class:`CellDAG` (``_dag``), ``last_computed`` (the ``(edge label, op)`` pairs of the last eager
    forward), the BatchNorm backward's constants, the packed groups (again after ``.to()`` /
    ``.double()``), :meth:`compile_nodes` and :meth:`node_weights`."""

    _dag: CellDAG

    def _init_engine(self, dag: CellDAG) -> None:
        self._dag = dag
        self.last_computed: list = []
        self._compiled_nodes = None
        widest = max(len(out) for out in dag.out_of)
        if widest > 1:  # constants of the BatchNorm backward (two kernels fewer per backward)
            self.register_buffer("_bn_unit", bn_constants(widest * dag.channels), persistent=False)
            pack_groups(self, dag)

    def compile_nodes(self, **options) -> None:
        """Compile the cell's nodes with ``torch.compile(**options)`` (regional compilation: cells of
        the same shapes run the same compiled code). The compiled code returns the batch statistics,
        and the running statistics are updated after it (see :class:`fastnas.spaces.ops.StatUpdates`)."""
        self._compiled_nodes = torch.compile(self._nodes, **options)

    def _nodes(self, states, weights, selected, picked, unselected, edge_weights, nodes_w, updates, packed):
        return _nodes(
            self, self._dag, states, weights, selected, picked, unselected, edge_weights, nodes_w, updates, packed
        )

    def node_weights(
        self, weights: Tensor, selected: Sequence[Sequence[int]] | None = None, picked: Tensor | None = None
    ) -> list[Tensor | None]:
        """:func:`node_weights` of this cell: pass them to every cell of its kind in one forward."""
        return node_weights(self, self._dag, weights, selected, picked)

    def _out_edges(self, j: int) -> list[int]:
        """The edges leaving state ``j``, by target node."""
        return list(self._dag.out_of[j])

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if "_bn_unit" in self._buffers:
            pack_groups(self, self._dag)  # .to() / .double() gave every tensor its own storage
        return module

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_plan_cache", None)  # it refers to modules and views of their tensors
        return state
