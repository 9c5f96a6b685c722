"""fastnas.patch / fastnas.unpatch on the reference code itself: DARTS's model_search.py (the folder
named by FASTNAS_DARTS_SRC) and xautodl's NAS-Bench-201 search networks (``pip install --no-deps
xautodl``), for every sampler those code bases have: outputs, every gradient and the running
statistics equal the unpatched model's in float64; parameters, keys, optimizer references and hooks
survive; a fork with an op the engine does not know is left alone and reported."""

from __future__ import annotations

import copy
import importlib
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_dicts
from torch import nn

import fastnas
from fastnas.spaces import darts
from fastnas.spaces.ops import _adjacent


def grads_of(model: nn.Module, extra: dict | None = None) -> dict:
    """Every parameter's gradient (None counted as zero: an op computed as a real zero tensor in the
    reference code gets a zero gradient, fastnas computes nothing), and ``extra``'s tensors'."""
    out = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    for n, t in (extra or {}).items():
        out[n] = torch.zeros_like(t) if t.grad is None else t.grad.clone()
    return out


def assert_same_steps(ref, fast, forward, steps: int = 2, extra=lambda m: {}) -> None:
    """``forward(model)`` returns the loss; ``steps`` SGD steps of both give equal losses, gradients and
    state (running statistics)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, fast)]
    for _ in range(steps):
        results = []
        for model, opt in zip((ref, fast), opts):
            model.zero_grad(set_to_none=True)
            for t in extra(model).values():
                t.grad = None
            loss = forward(model)
            loss.backward()
            results.append((loss.detach(), grads_of(model, extra(model))))
            opt.step()
        torch.testing.assert_close(results[1][0], results[0][0], **TOL)
        assert_close_dicts(results[1][1], results[0][1], **TOL)
        assert_close_dicts(fast.state_dict(), ref.state_dict(), **TOL)


# --------------------------------------------------------------------------- DARTS's model_search.py


@pytest.fixture(scope="module")
def model_search():
    folder = os.environ.get("FASTNAS_DARTS_SRC")
    if not folder:
        pytest.skip("FASTNAS_DARTS_SRC is unset: it names a copy of DARTS's cnn/ folder (model_search.py)")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("model_search")
    finally:
        sys.path.remove(folder)


def darts_pair(model_search, layers: int = 3):
    torch.manual_seed(0)
    ref = model_search.Network(4, 5, layers, nn.CrossEntropyLoss()).double()
    ref.alphas_normal.data = ref.alphas_normal.data.double()
    ref.alphas_reduce.data = ref.alphas_reduce.data.double()
    fast = copy.deepcopy(ref)
    fast._arch_parameters = [fast.alphas_normal, fast.alphas_reduce]
    return ref, fast


def darts_extra(model):
    return {"alphas_normal": model.alphas_normal, "alphas_reduce": model.alphas_reduce}


def test_darts_network_patched_matches_the_reference(model_search, mixed_sum_calls):
    ref, fast = darts_pair(model_search)
    params = [id(p) for p in fast.parameters()]
    keys = list(fast.state_dict())
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)  # made before the patch: its references survive
    report = fastnas.patch(fast)
    assert sorted(report.patched) == ["cells.0", "cells.1", "cells.2"], str(report)
    assert "reduction Cell, 14 edges, 8 ops" in report.patched["cells.1"] and not report.left_alone
    assert [id(p) for p in fast.parameters()] == params and list(fast.state_dict()) == keys
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == params
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4])
    assert_same_steps(ref, fast, lambda m: m._loss(x, y), extra=darts_extra)
    assert mixed_sum_calls[:4] == [14, 21, 28, 35]  # one mixed sum per node over its 7 non-none ops
    # the grouped convolutions' running statistics lie side by side, again after .double()
    cell = fast.cells[0]
    bns = [cell._ops[e]._ops[4].op[7] for e in cell._dag.out_of[0]]
    for m in (ref, fast):
        m.float().double()
    assert _adjacent([bn.running_mean for bn in bns]) is not None
    assert_same_steps(ref, fast, lambda m: m._loss(x, y), steps=1, extra=darts_extra)
    assert sorted(fastnas.unpatch(fast)) == ["cells.0", "cells.1", "cells.2"]
    assert all("forward" not in c.__dict__ and "_dag" not in c.__dict__ for c in fast.cells)
    assert_same_steps(ref, fast, lambda m: m._loss(x, y), steps=1, extra=darts_extra)


def test_darts_mixed_ops_alone(model_search, mixed_sum_calls):
    """``level="mixed_op"``: each edge one mixed sum, the cells' own loops unchanged."""
    ref, fast = darts_pair(model_search)
    report = fastnas.patch(fast, level="mixed_op")
    assert len(report.patched) == 3 * 14 and all(".".join(n.split(".")[2:3]) == "_ops" for n in report.patched)
    assert all("forward" not in c.__dict__ for c in fast.cells)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    assert_same_steps(ref, fast, lambda m: m._loss(x, y), extra=darts_extra)
    assert mixed_sum_calls[:14] == [7] * 14


def test_patching_twice_hooks_and_what_it_leaves_alone(model_search):
    ref, fast = darts_pair(model_search)
    fastnas.patch(fast)
    again = fastnas.patch(fast)
    assert not again.patched and again.left_alone["cells.0"] == "already patched"
    hooked = copy.deepcopy(ref)
    seen = []
    hooked.cells[0]._ops[3]._ops[4].register_forward_hook(lambda *a: seen.append(1))
    report = fastnas.patch(hooked)
    assert "hooks" in report.left_alone["cells.0"] and "cells.1" in report.patched
    hooked(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert seen  # the hook still fires: its cell was left as it was
    cell_hook = []
    fresh = copy.deepcopy(ref)
    fresh.cells[1].register_forward_hook(lambda *a: cell_hook.append(1))
    assert "cells.1" in fastnas.patch(fresh).patched
    fresh(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert cell_hook == [1]  # a patched cell's own hooks run around its fused forward
    with pytest.raises(ValueError, match="level"):
        fastnas.patch(fresh, level="node")


# a stand-in that runs without DARTS's code: model_search's MixedOp and Cell written out (the same names,
# attributes and loops) over the reference-layout op modules of fastnas.spaces.darts


class MixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in darts.PRIMITIVES:
            op = darts.OPS[primitive](C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = darts.FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = darts.ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = darts.ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps, self._multiplier = steps, multiplier
        self._ops = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier :], dim=1)


@pytest.mark.parametrize("reduction, reduction_prev", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("level", ["cell", "mixed_op"])
def test_darts_layout_stand_in(reduction, reduction_prev, level):
    """CI's check of the DARTS path (no DARTS code needed): a cell of model_search's layout, patched."""
    torch.manual_seed(4)
    ref = Cell(4, 4, 6, 8, 4, reduction, reduction_prev).double()
    fast = copy.deepcopy(ref)
    report = fastnas.patch(fast, level=level)
    assert list(report.patched) == ([""] if level == "cell" else [f"_ops.{e}" for e in range(14)]), str(report)
    weights = torch.randn(14, 8, dtype=torch.float64).softmax(-1).requires_grad_()
    side = 16 if reduction_prev else 8
    s0, s1 = torch.randn(2, 6, side, side, dtype=torch.float64), torch.randn(2, 8, 8, 8, dtype=torch.float64)

    def forward(model):
        return model(s0, s1, weights).square().mean()

    assert_same_steps(ref, fast, forward, extra=lambda m: {"weights": weights})


class GeluConv(nn.Module):
    """A fork's extra primitive: an op the engine does not know."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride, 1, bias=False)

    def forward(self, x):
        return F.gelu(self.conv(x))


def test_a_fork_with_an_extra_primitive_is_left_alone(model_search, monkeypatch):
    monkeypatch.setattr(model_search, "PRIMITIVES", [*model_search.PRIMITIVES, "gelu_conv_3x3"])
    monkeypatch.setattr(model_search, "OPS", {**model_search.OPS, "gelu_conv_3x3": lambda C, s, a: GeluConv(C, s)})
    ref, fast = darts_pair(model_search)
    report = fastnas.patch(fast)
    assert not report.patched
    assert "unknown op GeluConv at _ops.0._ops.8" in report.left_alone["cells.0"]
    assert "unknown op GeluConv at _ops.8" in report.left_alone["cells.0._ops.0"]
    assert "left 45 alone" in str(report)  # 3 cells and their 42 mixed ops
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    assert_same_steps(ref, fast, lambda m: m._loss(x, y), steps=1, extra=darts_extra)


# --------------------------------------------------------------------------- xautodl's NAS-Bench-201 networks


@pytest.fixture(scope="module")
def xautodl():
    return pytest.importorskip("xautodl.models.cell_searchs", reason="xautodl is not installed")


NB201 = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


def xautodl_pair(cls, op_names=NB201, **kw):
    torch.manual_seed(0)
    ref = cls(4, 1, 4, 5, op_names, False, True, **kw).double()
    return ref, copy.deepcopy(ref)


def logits_loss(model, x, y):
    return F.cross_entropy(model(x)[1], y)


@pytest.mark.parametrize("network", ["TinyNetworkDarts", "TinyNetworkGDAS"])
def test_xautodl_darts_and_gdas(xautodl, network):
    ref, fast = xautodl_pair(getattr(xautodl, network))
    report = fastnas.patch(fast)
    assert sorted(report.patched) == ["cells.0", "cells.2", "cells.4"] and not report.left_alone, str(report)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4])

    def forward(model):
        torch.manual_seed(0)  # GDAS's Gumbel noise: the same draw for both (one whose output is not 0)
        return logits_loss(model, x, y)

    assert_same_steps(ref, fast, forward, extra=lambda m: {"arch": m.arch_parameters})
    if network == "TinyNetworkGDAS":  # only the sampled op of each edge ran
        assert len(fast.cells[0].last_computed) <= 6


@pytest.mark.parametrize("mode", ["urs", "joint", "select", "dynamic"])
def test_xautodl_setn_modes(xautodl, mode):
    ref, fast = xautodl_pair(xautodl.TinyNetworkSETN)
    assert len(fastnas.patch(fast).patched) == 3
    structure = xautodl.CellStructure.str2structure(
        "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|none~2|"
    )
    for m in (ref, fast):
        m.set_cal_mode(mode, structure)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 3])

    def forward(model):
        random.seed(5)  # SETN's uniform sampling draws from Python's random: the same draw for both
        return logits_loss(model, x, y)

    assert_same_steps(ref, fast, forward, extra=lambda m: {"arch": m.arch_parameters})


def test_copies_stay_patched_and_pickles_load_unpatched(xautodl):
    import io

    ref, fast = xautodl_pair(xautodl.TinyNetworkDarts)
    fastnas.patch(fast)
    copied = copy.deepcopy(fast)
    assert copied.cells[0].forward.__self__ is copied.cells[0]
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any("_dag" in m.__dict__ or "forward" in m.__dict__ for m in loaded.modules())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 1])
    for model in (copied, loaded):
        assert_same_steps(ref, model, lambda m: logits_loss(m, x, y), steps=1)
        ref.load_state_dict(fast.state_dict())
    assert len(fastnas.patch(loaded).patched) == 3


def test_xautodl_random_and_enas_dynamic_cells(xautodl):
    ref, fast = xautodl_pair(xautodl.TinyNetworkRANDOM)
    assert len(fastnas.patch(fast).patched) == 3
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([2, 1])
    for seed in range(3):
        random.seed(seed)
        arch = ref.random_genotype(True)
        fast.arch_cache = arch
        assert_same_steps(ref, fast, lambda m: logits_loss(m, x, y), steps=1)


def test_xautodl_fork_with_an_unknown_op_is_left_alone(xautodl, monkeypatch):
    from xautodl.models import cell_operations

    monkeypatch.setitem(cell_operations.OPS, "gelu_conv_3x3", lambda C_in, C_out, s, a, t: GeluConv(C_in, s))
    ref, fast = xautodl_pair(xautodl.TinyNetworkDarts, [*NB201, "gelu_conv_3x3"])
    report = fastnas.patch(fast)
    assert not report.patched and "unknown op GeluConv at edges.1<-0.5" in report.left_alone["cells.0"]
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 0])
    assert_same_steps(ref, fast, lambda m: logits_loss(m, x, y), steps=1, extra=lambda m: {"arch": m.arch_parameters})


def test_search_cell_forward_urs_draws_from_a_generator():
    """fastnas's own SearchCell.forward_urs: per node one op per edge, drawn again while all are
    'none', from the generator given (torch's default one otherwise), the unweighted sum of them."""
    from eager_supernets import EagerNB201Cell

    from fastnas.spaces import nb201

    torch.manual_seed(1)
    cell = nb201.SearchCell(4, 4, 1, 4, ["none", "skip_connect", "nor_conv_3x3"]).double()
    eager = EagerNB201Cell(4, op_names=["none", "skip_connect", "nor_conv_3x3"]).double()
    eager.load_state_dict(cell.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    seen = set()
    for seed in range(20):
        y = cell.forward_urs(x, generator=torch.Generator().manual_seed(seed))
        drawn = {key: op for key, op in cell.last_computed}
        for i in (1, 2, 3):
            assert any(key.startswith(f"{i}<-") for key in drawn)  # never every edge of a node 'none'
        # the same draw again, and the reference's unweighted sum of the drawn ops
        y2 = cell.forward_urs(x, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        index = [cell.op_names.index(drawn[k]) if k in drawn else 0 for k in cell.edge_keys]
        ones = torch.ones(6, 3, dtype=torch.float64)
        torch.testing.assert_close(y, eager(x, ones, index), **TOL)
        seen.add(tuple(index))
    assert len(seen) > 10
