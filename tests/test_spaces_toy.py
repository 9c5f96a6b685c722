"""A new search space is one description: a toy space (3 nodes, 3 ops) defined here, in the test,
runs a search step, its export, the sampled paths and a compiled cell through fastnas.spaces.engine,
against the same space written out eagerly (``sum(w * op(x))`` per edge)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_dicts
from torch import nn

from fastnas.spaces import _arch, engine
from fastnas.spaces.ops import Identity, Zero

OPS = ("none", "skip_connect", "conv_3x3")
EDGES = [(i, j, 1) for i in range(3) for j in range(i + 1)]  # node i fed by the input and every earlier node


def make_op(name: str, C: int) -> nn.Module:
    if name == "none":
        return Zero(1)
    if name == "skip_connect":
        return Identity()
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C, affine=False))


# --------------------------------------------------------------------------- the toy space: its description


def toy_candidates(cell: nn.Module) -> list[list[engine.Candidate]]:
    return [[engine.classify(op) for op in ops] for ops in cell.edge_ops]


class ToyCell(engine.FusedCell, nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.edge_ops = nn.ModuleList(nn.ModuleList(make_op(n, C) for n in OPS) for _ in EDGES)
        self._init_engine(engine.cell_dag(1, EDGES, [1, 2, 3], C, OPS, toy_candidates))

    def forward(self, x, weights, selected=None, picked=None, node_weights=None):
        return engine.run_cell(self, self._dag, [x], weights, selected, picked, nodes_w=node_weights)


class ToyNetwork(_arch.ArchMixin, nn.Module):
    """Stem, two toy cells (the second on the first's 3C channels), pooling, classifier."""

    def __init__(self, C: int = 4, num_classes: int = 5, arch: str = "logits", sampler: str | None = None):
        super().__init__()
        self._init_arch_modes(arch, sampler)
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cells = nn.ModuleList([ToyCell(C), ToyCell(3 * C)])
        self.mix = nn.Conv2d(3 * C, 3 * C, 1, bias=False)  # between the cells: 3C channels in, 3C out
        self.classifier = nn.Linear(9 * C, num_classes)
        self.alphas = nn.Parameter(self._init_rows(len(EDGES), len(OPS)))
        self._arch_names = ["alphas"]

    def _search_cells(self):
        return list(self.cells)

    def forward(self, x, sample=None):
        w = self._edge_weights_of("alphas", sample)
        nodes_w = self.cells[0].node_weights(w.weights, w.selected, w.picked)  # two cells of one kind
        h = self.cells[0](self.stem(x), w.weights, w.selected, w.picked, nodes_w)
        h = self.cells[1](self.mix(h), w.weights, w.selected, w.picked)  # picks its own node weights
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def export(self) -> str:
        best = self.alphas.argmax(-1).tolist()
        return "+".join(f"{OPS[best[e]]}~{j}>{i}" for e, (i, j, _) in enumerate(EDGES))


# --------------------------------------------------------------------------- the same space, written out


def eager_cell(cell: ToyCell, x, weights, index=None):
    """``sum(w * op(x))`` over every op (or op ``index[e]`` alone) of every edge, output the 3 nodes."""
    states = [x]
    for i in range(3):
        node = 0
        for e, (target, j, _) in enumerate(EDGES):
            if target != i:
                continue
            ops = range(len(OPS)) if index is None else [index[e]]
            node = node + sum(weights[e, k] * cell.edge_ops[e][k](states[j]) for k in ops)
        states.append(node)
    return torch.cat(states[1:], dim=1)


def eager_network(net: ToyNetwork, x, sample=None):
    w = net._edge_weights_of("alphas", sample)
    index = None if w.selected is None else [s[0] for s in w.selected]
    h = eager_cell(net.cells[0], net.stem(x), w.weights, index)
    h = eager_cell(net.cells[1], net.mix(h), w.weights, index)
    return net.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


def step(net, forward, x, y, sample=None):
    net.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x, sample), y)
    loss.backward()
    # no gradient and a zero one alike: a sample of only 'none' and skips leaves the stem unused
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in net.named_parameters()}


# --------------------------------------------------------------------------- the tests


def pair(**mode):
    torch.manual_seed(0)
    net = ToyNetwork(**mode).double()
    ref = ToyNetwork(**mode).double()
    ref.load_state_dict(net.state_dict())
    return net, ref


def test_a_search_step_through_the_engine_matches_the_space_written_out(mixed_sum_calls):
    """Weights and architecture step (softmax of logits): loss, every gradient, running statistics."""
    net, ref = pair()
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 3])
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.1)
    for _ in range(2):
        lf, gf = step(net, net, x, y)
        le, ge = step(ref, lambda x, s: eager_network(ref, x, s), x, y)
        torch.testing.assert_close(lf, le, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        assert_close_dicts(net.state_dict(), ref.state_dict(), **TOL)
        w_opt.step(), a_opt.step()
        ref.load_state_dict(net.state_dict())
    assert mixed_sum_calls[:3] == [2, 4, 6]  # one mixed sum per node over its non-none ops
    # the convolutions of every edge leaving a state ran as one: 3 groups per cell (from input, nodes 0, 1)
    pairs = [(e, op) for e in range(len(EDGES)) for op in OPS if op != "none"]
    assert net.cells[0].last_computed == pairs


def test_the_toy_space_exports_its_argmax():
    net, _ = pair()
    with torch.no_grad():
        net.alphas.zero_()
        for e, k in enumerate([2, 1, 0, 2, 1, 2]):
            net.alphas[e, k] = 1.0
    assert net.export() == "conv_3x3~0>0+skip_connect~0>1+none~1>1+conv_3x3~0>2+skip_connect~1>2+conv_3x3~2>2"


@pytest.mark.parametrize("sampler", ["gdas", "uniform"])
def test_the_sampled_path_computes_only_the_sampled_ops(sampler):
    net, ref = pair(sampler=sampler)
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 4])
    for seed in range(3):
        net.generator = torch.Generator().manual_seed(seed)
        sample = net.sample_architecture()
        lf, gf = step(net, net, x, y, sample)
        le, ge = step(ref, lambda x, s: eager_network(ref, x, s), x, y, sample)
        torch.testing.assert_close(lf, le, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        selected = net._edge_weights_of("alphas", sample).selected
        expected = [(e, OPS[s[0]]) for e, s in enumerate(selected) if s[0] != 0]
        assert net.cells[0].last_computed == expected
    assert (gf["alphas"].abs().sum() > 0) == (sampler == "gdas")


def test_a_compiled_toy_cell_matches_the_eager_one():
    """compile_cells: the engine's compiled branch (deferred statistics, weights picked before the graph)."""
    torch._dynamo.reset()
    net, ref = pair()
    net.compile_cells(backend="eager")
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([2, 1])
    for _ in range(2):
        lf, gf = step(net, net, x, y)
        le, ge = step(ref, ref, x, y)
        torch.testing.assert_close(lf, le, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        assert_close_dicts(dict(net.named_buffers()), dict(ref.named_buffers()), **TOL)
    torch._dynamo.reset()
