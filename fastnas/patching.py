"""``fastnas.patch(model)``: fastnas's fused cells bound into an existing model's own modules.

Given a live model built from DARTS's search code (``model_search.py``'s ``Network`` / ``Cell`` /
``MixedOp``, or a fork that keeps those attribute names) or xautodl's NAS-Bench-201 search networks
(``TinyNetworkDarts``, ``TinyNetworkGDAS``, ``TinyNetworkSETN``, ``TinyNetworkENAS``,
``TinyNetworkRANDOM``, ``GenericNAS201Model``: their ``NAS201SearchCell``), :func:`patch` binds the
forwards of fastnas's drop-ins (:class:`fastnas.spaces.darts.Cell`, :class:`~fastnas.spaces.darts.MixedOp`,
:class:`fastnas.spaces.nb201.SearchCell` with its ``forward*`` methods) into the existing instances,
``fn.__get__(module, type(module))``, as Liger-Kernel's monkey patch does: the whole cell runs through
:mod:`fastnas.spaces.engine` (each node one mixed sum, the ops of one kind on the edges leaving a
state grouped), and parameters, buffers' values, state_dict keys, optimizer references and hooks stay
as they were. :func:`unpatch` removes the bound forwards again.

A cell is patched only when everything in it is known: its forward has the reference's arguments,
every candidate op is one the engine recognises (zero, identity, 3x3 pool, a ``ReLU -> conv ... ->
BatchNorm`` stage, or a known module such as ``FactorizedReduce``), no submodule has a hook (its ops
are no longer called one by one), and, with ``verify=True``, a float64 copy of the cell gives the
same output and gradients patched as unpatched on a random probe. Anything else (an unknown op in a
fork's primitive list, a cell whose forward takes other arguments) is left alone, and the report says
why. Models that are already fastnas's (:mod:`fastnas.spaces`) need no patch.

Grouped ops keep their weights and running statistics side by side in memory (``pack=True``, as
fastnas's own cells do, again after ``.to()``): every Parameter stays the same object with the same
values, but its ``.data`` moves, and each running-statistics buffer becomes a view of one storage per
group; ``pack=False`` leaves every tensor where it is (the groups' weights are then concatenated at
every step). A deep copy of a patched model is patched; a pickled one (``torch.save(model)``) loads
unpatched (bound methods do not pickle): patch it again.
"""

from __future__ import annotations

import copy
import copyreg
import inspect
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from fastnas.ops.batch_norm import bn_constants
from fastnas.spaces import darts, engine, nb201

__all__ = ["patch", "unpatch", "PatchReport"]

LEVELS = ("cell", "mixed_op")

_MARK = "_fastnas_patched"  # the instance attributes a patch added, to remove them again


@dataclass
class PatchReport:
    """What :func:`patch` did: ``patched`` and ``left_alone`` map module names (``model.named_modules()``)
    to what each is, or why it was left alone."""

    patched: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patched {len(self.patched)} modules, left {len(self.left_alone)} alone"]
        lines += [f"  patched      {name or '(model)'}: {what}" for name, what in self.patched.items()]
        lines += [f"  left alone   {name or '(model)'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


class _Unpatchable(Exception):
    """Why a module cannot be patched (its message goes to the report)."""


# --------------------------------------------------------------------------- what is known


def _ops_known(rows, where: Callable[[int, int], str], known_modules: tuple[str, ...]) -> None:
    """Every candidate op is one the engine recognises, or a known module class."""
    for e, row in enumerate(rows):
        for q, op in enumerate(row):
            if engine.classify(op) is None and type(op).__name__ not in known_modules:
                raise _Unpatchable(f"unknown op {type(op).__name__} at {where(e, q)}")


def _arguments(cls: type, name: str) -> list[str]:
    return list(inspect.signature(getattr(cls, name)).parameters)[1:]


def _check_arguments(module: nn.Module, name: str, expected: list[str]) -> None:
    found = _arguments(type(module), name)
    if found != expected:
        raise _Unpatchable(f"{name}({', '.join(found)}) is not the reference's {name}({', '.join(expected)})")


def _check_hooks(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if sub is not module and (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks):
            raise _Unpatchable(f"{name} has hooks, which the fused forward would not run")


def _stride_of(op: nn.Module) -> int | None:
    """The stride an op module was built with, where it says."""
    for m in [op, *op.modules()]:
        stride = getattr(m, "stride", None)
        if isinstance(stride, int):
            return stride
        if isinstance(stride, tuple) and stride and isinstance(stride[0], int):
            return stride[0]
    return None


# --------------------------------------------------------------------------- DARTS's model_search.py

_DARTS_MODULES = ("FactorizedReduce",)  # candidate ops the engine runs as modules (ReLU shared)


def _darts_mixed_op(mixed: nn.Module) -> tuple[engine.CellDAG, str]:
    _check_arguments(mixed, "forward", ["x", "weights"])
    ops = getattr(mixed, "_ops", None)
    if not isinstance(ops, nn.ModuleList):
        raise _Unpatchable("no _ops ModuleList")
    _ops_known([list(ops)], lambda e, q: f"_ops.{q}", _DARTS_MODULES)
    _check_factorized_reduce(ops)
    strides = {s for s in (_stride_of(op) for op in ops) if s is not None}
    channels = {m.num_features for m in mixed.modules() if isinstance(m, nn.BatchNorm2d)}
    if len(strides) != 1 or len(channels) != 1:
        raise _Unpatchable(f"its ops disagree on stride {sorted(strides)} or channels {sorted(channels)}")
    dag = darts.describe_mixed_op(channels.pop(), strides.pop())
    return dag._replace(op_names=_op_names(mixed, len(ops))), f"DARTS MixedOp, {len(ops)} ops"


def _check_factorized_reduce(ops) -> None:
    for op in ops:
        if type(op).__name__ == "FactorizedReduce" and not all(hasattr(op, a) for a in ("conv_1", "conv_2", "bn")):
            raise _Unpatchable("a FactorizedReduce without DARTS's conv_1, conv_2 and bn")


def _op_names(module: nn.Module, count: int) -> tuple[str, ...]:
    """The reference code's PRIMITIVES where its module has them (names in ``last_computed``)."""
    found = getattr(inspect.getmodule(type(module)), "PRIMITIVES", None)
    if isinstance(found, (list, tuple)) and len(found) == count and all(isinstance(n, str) for n in found):
        return tuple(found)
    return tuple(f"op{k}" for k in range(count))


def _darts_cell(cell: nn.Module) -> tuple[engine.CellDAG, str]:
    _check_arguments(cell, "forward", ["s0", "s1", "weights"])
    try:
        steps, multiplier, reduction = int(cell._steps), int(cell._multiplier), bool(cell.reduction)
        mixed = list(cell._ops)
        pre = [cell.preprocess0, cell.preprocess1]
    except AttributeError as e:
        raise _Unpatchable(f"not DARTS's Cell layout ({e})") from None
    if len(mixed) != sum(2 + i for i in range(steps)):
        raise _Unpatchable(f"{len(mixed)} mixed ops for {steps} steps")
    for name, p in zip(("preprocess0", "preprocess1"), pre):
        is_fr = all(hasattr(p, a) for a in ("conv_1", "conv_2", "bn"))
        if not is_fr and not (isinstance(getattr(p, "op", None), nn.Sequential) and engine.is_conv_chain(p.op)):
            raise _Unpatchable(f"{name} is neither ReLUConvBN nor FactorizedReduce")
    rows = []
    for m in mixed:
        _check_arguments(m, "forward", ["x", "weights"])
        rows.append(list(m._ops))
        _check_factorized_reduce(m._ops)
    _ops_known(rows, lambda e, q: f"_ops.{e}._ops.{q}", _DARTS_MODULES)
    C = max(m.num_features for m in pre[1].modules() if isinstance(m, nn.BatchNorm2d))
    dag = darts.describe_cell(steps, multiplier, C, reduction)
    names = _op_names(cell, len(rows[0]))
    kind = "reduction" if reduction else "normal"
    return dag._replace(op_names=names), f"DARTS {kind} Cell, {len(rows)} edges, {len(rows[0])} ops"


# --------------------------------------------------------------------------- xautodl's NAS201SearchCell

_XAUTODL_MODULES = ("FactorizedReduce", "POOLING", "DualSepConv", "SepConv", "ReLUConvBN")
_XAUTODL_FORWARDS = {
    "forward": ["inputs", "weightss"],
    "forward_gdas": ["inputs", "hardwts", "index"],
    "forward_joint": ["inputs", "weightss"],
    "forward_urs": ["inputs"],
    "forward_select": ["inputs", "weightss"],
    "forward_dynamic": ["inputs", "structure"],
}


def _xautodl_cell(cell: nn.Module) -> tuple[engine.CellDAG, str]:
    for name, args in _XAUTODL_FORWARDS.items():
        if hasattr(type(cell), name):
            _check_arguments(cell, name, args)
    try:
        keys, max_nodes, op_names, C_out = list(cell.edge_keys), int(cell.max_nodes), list(cell.op_names), cell.out_dim
        rows = [list(cell.edges[key]) for key in keys]
    except (AttributeError, KeyError) as e:
        raise _Unpatchable(f"not NAS201SearchCell's layout ({e})") from None
    expected = sorted(f"{i}<-{j}" for i in range(1, max_nodes) for j in range(i))
    if keys != expected or cell.edge2index != {k: i for i, k in enumerate(keys)}:
        raise _Unpatchable("edge_keys / edge2index are not the sorted 'i<-j' of max_nodes")
    if any(len(row) != len(op_names) for row in rows):
        raise _Unpatchable("an edge's op list does not match op_names")
    _ops_known(rows, lambda e, q: f"edges.{keys[e]}.{q}", _XAUTODL_MODULES)
    strides = {_stride_of(op) for key, row in zip(keys, rows) if key.endswith("<-0") for op in row} - {None}
    if len(strides) != 1:
        raise _Unpatchable(f"the edges leaving node 0 disagree on their stride: {sorted(strides)}")
    dag = nb201.describe_cell(max_nodes, C_out, strides.pop(), op_names)
    return dag, f"NAS201SearchCell, {len(keys)} edges, ops {', '.join(op_names)}"


def _xautodl_forward_urs(self: nn.Module, inputs: Tensor) -> Tensor:
    """xautodl's ``forward_urs`` with its own draws (Python's ``random``: the patched model samples as
    the unpatched one), the selected ops run by the engine."""
    selected: list[list[int]] = [[] for _ in range(self.num_edges)]
    table = engine.candidates(self, self._dag)
    for i in range(1, self.max_nodes):
        edges = [self.edge2index[f"{i}<-{j}"] for j in range(i)]
        while True:
            ops = [random.choice(range(len(table[e]))) for e in edges]
            if not all(table[e][q].kind == engine.ZERO for e, q in zip(edges, ops)):
                break
        for e, q in zip(edges, ops):
            selected[e] = [q]
    return nb201.SearchCell._forward_selected(self, inputs, selected)


# --------------------------------------------------------------------------- binding


def _bind(module: nn.Module, dag: engine.CellDAG, methods: dict[str, Callable], pack: bool) -> None:
    methods = {**methods, "__reduce_ex__": _reduce_unpatched, "__deepcopy__": _deepcopy_patched}
    added = list(methods) + ["_dag", "_apply"]
    for name, fn in methods.items():
        module.__dict__[name] = fn.__get__(module, type(module))
    module.__dict__["_dag"] = dag
    if pack and max(len(out) for out in dag.out_of) > 1:
        module.__dict__["_apply"] = _repacking_apply.__get__(module, type(module))
        _refresh_unit(module)
        added.append("_bn_unit")
        engine.pack_groups(module, dag)
    else:
        added.remove("_apply")
    module.__dict__[_MARK] = added


def _refresh_unit(module: nn.Module) -> None:
    """The BatchNorm backward's constants, a plain attribute (no new buffer) on the module's device."""
    first = next(module.parameters(), None)
    widest = max(len(out) for out in module._dag.out_of)
    unit = bn_constants(widest * module._dag.channels)
    if first is not None:
        unit = unit.to(device=first.device, dtype=first.dtype)
    module.__dict__["_bn_unit"] = unit


def _repacking_apply(self: nn.Module, fn, recurse=True):
    out = type(self)._apply(self, fn, recurse)
    engine.pack_groups(self, self._dag)  # .to() / .double() gave every tensor its own storage
    _refresh_unit(self)
    return out


def _reduce_unpatched(self: nn.Module, protocol: int):
    """Pickling (``torch.save(model)``): the module without what the patch added (its bound methods
    cannot be pickled); it loads unpatched."""
    added = set(self.__dict__[_MARK]) | {_MARK, "_plan_cache", "last_computed"}
    state = {k: v for k, v in self.__dict__.items() if k not in added}
    return copyreg.__newobj__, (type(self),), state


def _deepcopy_patched(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy``: a patched copy (the bound methods bound to the copy), as for any module."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    for k, v in self.__dict__.items():
        if k != "_plan_cache":
            new.__dict__[k] = copy.deepcopy(v, memo)
    return new


def _unbind(module: nn.Module) -> None:
    for name in module.__dict__.pop(_MARK, ()):
        module.__dict__.pop(name, None)
    for name in ("_plan_cache", "last_computed"):
        module.__dict__.pop(name, None)


# --------------------------------------------------------------------------- the probe


def _probe_inputs(module: nn.Module, kind: str, gen: torch.Generator) -> tuple:
    dag = module._dag
    K = len(dag.op_names)
    side = 8
    if kind == "mixed_op":
        return (torch.randn(2, dag.channels, side, side, generator=gen), torch.randn(K, generator=gen).softmax(-1))
    weights = torch.randn(len(dag.edges), K, generator=gen).softmax(-1)
    if kind == "darts cell":
        convs = [[m for m in p.modules() if isinstance(m, nn.Conv2d)] for p in (module.preprocess0, module.preprocess1)]
        halves = hasattr(module.preprocess0, "conv_1")  # a FactorizedReduce: its input is twice as large
        s0 = torch.randn(
            2, convs[0][0].in_channels, 2 * side if halves else side, 2 * side if halves else side, generator=gen
        )
        s1 = torch.randn(2, convs[1][0].in_channels, side, side, generator=gen)
        return s0, s1, weights
    return torch.randn(2, module.in_dim, side, side, generator=gen), weights


def _probe(module: nn.Module, kind: str) -> None:
    """The patched forward of a float64 copy against the unpatched forward of another copy, on a random
    probe: outputs and the gradients of the inputs, the op weights and every parameter."""
    gen = torch.Generator().manual_seed(0)
    inputs = _probe_inputs(module, kind, gen)
    results = []
    for patched in (True, False):
        copied = copy.deepcopy(module).to("cpu", torch.float64).train()
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(copied, hooks).clear()  # the user's hooks are not run by the probe
        if not patched:
            _unbind(copied)
        args = [t.double().requires_grad_() for t in inputs]
        try:
            y = copied(*args)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
        except Exception as e:  # the module's own code fails on the probe: nothing to compare with
            raise _Unpatchable(f"the probe failed ({type(e).__name__}: {e})") from None
        grads = [a.grad for a in args] + [p.grad for p in copied.parameters()]
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    if not torch.allclose(y0, y1, rtol=1e-7, atol=1e-9) or not all(map(_same_gradient, g0, g1)):
        raise _Unpatchable("patched, a float64 copy gave other outputs or gradients on a probe")


def _same_gradient(a: Tensor | None, b: Tensor | None) -> bool:
    """Equal within float64 rounding, no gradient counting as a zero one (an op never computed)."""
    if a is None or b is None:
        other = b if a is None else a
        return other is None or not other.any()
    return torch.allclose(a, b, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- patch / unpatch


def _plan_of(module: nn.Module) -> tuple[str, engine.CellDAG, dict[str, Callable], str] | None:
    """``(kind, dag, methods to bind, description)`` for a module of a known code base, None when it
    is none of them. Raises :class:`_Unpatchable` for one that looks like one but cannot be patched."""
    name = type(module).__name__
    if isinstance(module, engine.FusedCell):
        return None
    if name == "NAS201SearchCell" or (
        hasattr(module, "edge2index") and isinstance(getattr(module, "edges", None), nn.ModuleDict)
    ):
        dag, what = _xautodl_cell(module)
        methods = {n: getattr(nb201.SearchCell, n) for n in _XAUTODL_FORWARDS if n != "forward_urs"}
        methods["forward_urs"] = _xautodl_forward_urs
        methods["_forward_selected"] = nb201.SearchCell._forward_selected
        return "xautodl cell", dag, methods, what
    if name == "Cell" and hasattr(module, "preprocess1") and hasattr(module, "_ops"):
        dag, what = _darts_cell(module)
        return "darts cell", dag, {"forward": darts.Cell.forward}, what
    if name == "MixedOp" and hasattr(module, "_ops"):
        dag, what = _darts_mixed_op(module)
        return "mixed_op", dag, {"forward": darts.MixedOp.forward}, what
    return None


def patch(model: nn.Module, *, level: str = "cell", verify: bool = True, pack: bool = True) -> PatchReport:
    """Bind fastnas's fused forwards into the search cells of ``model`` (in place); returns a
    :class:`PatchReport` of what was patched and what was left alone, and why.

    ``level``: ``"cell"`` patches whole cells (DARTS's ``Cell``, xautodl's ``NAS201SearchCell``), and
    the ``MixedOp`` s of a DARTS cell that could not be patched; ``"mixed_op"`` patches DARTS's
    ``MixedOp`` s alone (each edge one mixed sum: to compare). ``verify``: check each patched module on
    a float64 probe first (see the module docstring). ``pack``: keep the grouped ops' tensors side by
    side in memory (see the module docstring). Patching a patched module does nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    report = PatchReport()
    covered: list[str] = []  # names of patched cells: their submodules are theirs
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") if c else name for c in covered):  # inside a patched cell
            continue
        if _MARK in module.__dict__:
            report.left_alone[name] = "already patched"
            covered.append(name)
            continue
        try:
            plan = _plan_of(module)
            if plan is None:
                continue
            kind, dag, methods, what = plan
            if level == "mixed_op" and kind != "mixed_op":
                continue
            _check_hooks(module)
            _bind(module, dag, methods, pack)
        except _Unpatchable as why:
            report.left_alone[name] = f"{type(module).__name__}: {why}"
            continue
        if verify:
            try:
                _probe(module, kind)
            except _Unpatchable as why:
                _unbind(module)
                report.left_alone[name] = f"{type(module).__name__}: {why}"
                continue
        report.patched[name] = what
        covered.append(name)
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Remove what :func:`patch` bound into ``model``'s modules; returns their names. The tensors it
    packed stay where they are (same values)."""
    restored = []
    for name, module in model.named_modules():
        if _MARK in module.__dict__:
            _unbind(module)
            restored.append(name)
    return restored
