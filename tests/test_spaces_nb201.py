"""fastnas.spaces.nb201 against the eager NAS-Bench-201 supernet (xautodl's computation) and its ops."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_dicts, assert_fp32_step_close
from eager_supernets import EagerNB201Cell, EagerNB201Network, run_step
from torch.utils._python_dispatch import TorchDispatchMode

from fastnas.spaces import nb201
from fastnas.spaces.ops import batch_norm


def test_primitives_and_parameters():
    assert nb201.PRIMITIVES == ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    net = nb201.Network(C=4, N=1, num_classes=7)
    (alphas,) = net.arch_parameters()
    assert alphas.shape == (6, 5) and net.arch_simplex_segments(alphas) is None
    ids = {id(p) for p in net.arch_parameters()} | {id(p) for p in net.weight_parameters()}
    assert ids == {id(p) for p in net.parameters()}
    assert len(net.arch_parameters()) + len(net.weight_parameters()) == len(list(net.parameters()))
    assert net.edge_keys == ["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    w = net.arch_weights()["cell"]
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    simplex = nb201.Network(C=4, N=1, arch="simplex")
    torch.testing.assert_close(simplex.alphas.sum(-1), torch.ones(6), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="arch"):
        nb201.Network(C=4, N=1, arch="softmax")
    with pytest.raises(ValueError, match="sampler"):
        nb201.Network(C=4, N=1, sampler="darts")


def test_search_cell_state_dict_keys_match_reference_layout():
    cell = nb201.SearchCell(4, 4, 1, 4, nb201.PRIMITIVES)
    keys = set(cell.state_dict())
    assert keys == set(EagerNB201Cell(4).state_dict())
    for key in ("edges.1<-0.2.op.1.weight", "edges.1<-0.2.op.1.bias", "edges.3<-2.3.op.2.running_mean",
                "edges.2<-1.3.op.2.num_batches_tracked"):  # fmt: skip
        assert key in keys
    assert not any(k.startswith("edges.1<-0.4") for k in keys)  # avg pool: no parameters, no preprocess
    assert cell.edge_keys == sorted(cell.edges.keys()) and cell.num_edges == 6
    assert cell.edge2index == {k: i for i, k in enumerate(cell.edge_keys)}


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_search_cell_matches_reference(track_running_stats, memory_format):
    torch.manual_seed(0)
    fast = nb201.SearchCell(4, 4, 1, 4, nb201.PRIMITIVES, track_running_stats=track_running_stats).double()
    eager = EagerNB201Cell(4, trs=track_running_stats).double()
    eager.load_state_dict(fast.state_dict())
    fast.load_state_dict(eager.state_dict())  # both ways
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=memory_format)
    w = torch.randn(6, 5, dtype=torch.float64).softmax(-1)
    results = []
    for cell in (fast, eager):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = cell(xi, wi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        grads = {n: p.grad for n, p in cell.named_parameters()}
        results.append((y.detach(), xi.grad, wi.grad, grads, cell.state_dict()))
    (yf, xf, wf, gf, sf), (ye, xe, we, ge, se) = results
    torch.testing.assert_close(yf, ye, **TOL)
    torch.testing.assert_close(xf, xe, **TOL)
    torch.testing.assert_close(wf, we, **TOL)
    assert_close_dicts(gf, ge, **TOL)
    assert_close_dicts(sf, se, **TOL)  # running statistics updated alike
    assert wf[:, 0].abs().max() == 0  # 'none' outputs zero: its weight has no gradient
    if track_running_stats:  # evaluation mode: running statistics
        fast.eval(), eager.eval()
        torch.testing.assert_close(fast(x, w), eager(x, w), **TOL)


def test_search_cell_affine_and_gdas_match_reference():
    torch.manual_seed(1)
    fast = nb201.SearchCell(4, 4, 1, 4, nb201.PRIMITIVES, affine=True).double()
    eager = EagerNB201Cell(4, affine=True).double()
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 5, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(fast(x, w), eager(x, w), **TOL)
    index = torch.tensor([3, 2, 4, 1, 0, 3])
    hard = torch.zeros(6, 5, dtype=torch.float64).scatter_(1, index[:, None], 1.0).requires_grad_()
    hard2 = hard.detach().clone().requires_grad_()
    yf = fast.forward_gdas(x, hard, index[:, None])
    ye = eager(x, hard2, index.tolist(), gdas=True)
    torch.testing.assert_close(yf, ye, **TOL)
    yf.sum().backward(), ye.sum().backward()
    torch.testing.assert_close(hard.grad, hard2.grad, **TOL)
    # as in xautodl's forward_gdas, every unselected hard weight of an edge into node i is added to node i
    # as a scalar and gets sum(dL/dnode_i): for the output node (edges 3<-0, 3<-1, 3<-2) that is the sum of
    # yf.sum()'s gradient, yf.numel(), also on 3<-1, which sampled 'none'
    unselected = torch.ones(6, 5, dtype=torch.bool).scatter_(1, index[:, None], False)
    for key in ("3<-0", "3<-1", "3<-2"):
        e = fast.edge2index[key]
        assert (hard.grad[e][unselected[e]] == yf.numel()).all(), key
    assert index[fast.edge2index["3<-1"]] == 0 and hard.grad[fast.edge2index["3<-1"], 0] == 0  # sampled 'none'
    # the other nodes: one value per node, shared by the unselected weights of all its edges
    for node in (("1<-0",), ("2<-0", "2<-1")):
        values = torch.cat([hard.grad[fast.edge2index[k]][unselected[fast.edge2index[k]]] for k in node])
        assert (values == values[0]).all() and values[0] != 0, node
    assert fast.last_computed == [("1<-0", "nor_conv_3x3"), ("2<-0", "nor_conv_1x1"), ("2<-1", "avg_pool_3x3"),
                                  ("3<-0", "skip_connect"), ("3<-2", "nor_conv_3x3")]  # fmt: skip


MODES = [
    dict(),
    dict(arch="simplex"),
    dict(sampler="gdas"),
    dict(sampler="gdas", arch="simplex"),
    dict(sampler="uniform"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())) or "softmax")
def test_network_matches_eager_supernet(mode):
    torch.manual_seed(2)
    fast = nb201.Network(C=4, N=2, num_classes=5, **mode).double()
    eager = EagerNB201Network(C=4, N=2, num_classes=5, **mode).double()
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    arch_grad = 0.0
    for sample_seed in range(3):
        lf, gf = run_step(fast, x, sample_seed=sample_seed)
        le, ge = run_step(eager, x, sample_seed=sample_seed)
        torch.testing.assert_close(lf, le, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        arch_grad += gf["alphas"].abs().sum().item()
    assert (arch_grad == 0) == (mode.get("sampler") == "uniform")  # the architecture gets a gradient
    assert_close_dicts(fast.state_dict(), eager.state_dict(), **TOL)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.active = False
        self.conv_channels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func is torch.ops.aten.convolution.default:
            self.conv_channels += args[1].shape[0]
        return func(*args, **(kwargs or {}))


def test_gdas_computes_only_the_sampled_ops(mixed_sum_calls):
    torch.manual_seed(3)
    C, N = 4, 2
    net = nb201.Network(C=C, N=N, sampler="gdas")
    net.generator = torch.Generator().manual_seed(5)
    selected = net._edge_weights_of("alphas", None).selected  # the draw the forward will make
    net.generator = torch.Generator().manual_seed(5)
    counter = _Count()
    cells = [m for m in net.cells if isinstance(m, nb201.SearchCell)]
    for cell in cells:
        cell.register_forward_pre_hook(lambda *a: setattr(counter, "active", True))
        cell.register_forward_hook(lambda *a: setattr(counter, "active", False))
    with counter:
        net(torch.randn(2, 3, 8, 8)).sum().backward()
    names = [nb201.PRIMITIVES[s[0]] for s in selected]
    expected_pairs = [(k, names[net.edge2index[k]]) for k in net.edge_keys if names[net.edge2index[k]] != "none"]
    for cell in cells:
        assert cell.last_computed == expected_pairs
    # one mixed-sum input per sampled non-none op, per cell
    assert sum(mixed_sum_calls) == len(cells) * len(expected_pairs)
    # convolution work: C per sampled nor_conv
    per_cell = sum(n.startswith("nor_conv") for _, n in expected_pairs)
    assert counter.conv_channels == per_cell * C * N + per_cell * 2 * C * N + per_cell * 4 * C * N
    # parameters of ops that were not sampled get no gradient
    for cell in cells:
        for key, ops in cell.edges.items():
            for k, op in enumerate(ops):
                for p in op.parameters():
                    assert (p.grad is not None) == (k == selected[cell.edge2index[key]][0])


def test_arch_string_round_trip():
    net = nb201.Network(C=4, N=1)
    with torch.no_grad():
        net.alphas.zero_()
        best = [3, 0, 1, 4, 2, 1]  # per edge, in edge_keys order
        for e, k in enumerate(best):
            net.alphas[e, k] = 1.0
    text = net.export()
    assert text == "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"
    nodes = nb201.parse_arch_string(text)
    assert nodes == net.genotype()
    assert nodes[1] == (("none", 0), ("skip_connect", 1))
    assert nb201.format_arch_string(nodes) == text
    for bad in ("|nor_conv_3x3~1|", "nor_conv_3x3~0", "|conv~0|", "|nor_conv_3x3~x|"):
        with pytest.raises(ValueError, match="text"):
            nb201.parse_arch_string(bad)


# --------------------------------------------------------------------------- the building blocks


def _assert_blocks_match(ys, ys2, x, x2, bns, refs):
    """Blocks ``ys`` of ``batch_norm(x, bns)`` against the reference modules' ``ys2`` of ``x2``: outputs,
    input gradients under one random output gradient, and the modules' state."""
    g = [torch.randn_like(y) for y in ys2]
    torch.autograd.backward(ys, g), torch.autograd.backward(ys2, g)
    for y, y2 in zip(ys, ys2):
        torch.testing.assert_close(y, y2, **TOL)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    for bn, ref in zip(bns, refs):
        assert_close_dicts(bn.state_dict(), ref.state_dict(), **TOL)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_lean_batch_norm_matches_native(memory_format):
    torch.manual_seed(4)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    bns = [torch.nn.BatchNorm2d(2, affine=False).double() for _ in range(3)]
    refs = [torch.nn.BatchNorm2d(2, affine=False).double() for _ in range(3)]
    for bn, ref in zip(bns, refs):
        bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2), ref.load_state_dict(bn.state_dict())
    bns[2].momentum = refs[2].momentum = None  # cumulative average
    ys = batch_norm(x, bns, parts=3)
    x2 = x.detach().clone().requires_grad_()
    ys2 = [ref(c) for ref, c in zip(refs, x2.chunk(3, dim=1))]
    _assert_blocks_match(ys, ys2, x, x2, bns, refs)
    z = x.detach()[:, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: batch_norm(t, torch.nn.BatchNorm2d(2, affine=False).double()), (z,))


@pytest.mark.parametrize("momenta", ["one", "mixed", "untracked"])
def test_batch_norm_with_biases_left_out_matches_conv_with_biases(momenta):
    """A convolution's bias left out of x: same outputs and input gradient, running means with the
    bias, and a bias gradient of exactly zero (the reference's is zero up to rounding)."""
    torch.manual_seed(5)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64).requires_grad_()
    trs = momenta != "untracked"
    bns = [torch.nn.BatchNorm2d(2, affine=False, track_running_stats=trs).double() for _ in range(3)]
    refs = [torch.nn.BatchNorm2d(2, affine=False, track_running_stats=trs).double() for _ in range(3)]
    if momenta == "mixed":  # not one kernel update: the batch means are given the biases afterwards
        bns[1].momentum = refs[1].momentum = 0.3
    for bn, ref in zip(bns, refs):
        if trs:
            bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2)
        ref.load_state_dict(bn.state_dict())
    biases = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    biases2 = [b.detach().clone().requires_grad_() for b in biases]
    x2 = x.detach().clone().requires_grad_()
    ys = batch_norm(x, bns, parts=3, biases=biases)
    ys2 = [ref(c + b.view(1, -1, 1, 1)) for ref, c, b in zip(refs, x2.chunk(3, dim=1), biases2)]
    _assert_blocks_match(ys, ys2, x, x2, bns, refs)
    for b, b2 in zip(biases, biases2):
        assert b.grad is not None and (b.grad == 0).all()
        torch.testing.assert_close(b.grad, b2.grad, rtol=0, atol=1e-12)
    cumulative = torch.nn.BatchNorm2d(2, affine=False, momentum=None).double()
    with pytest.raises(ValueError, match="biases"):
        batch_norm(x.detach()[:, :2], cumulative, biases=biases[:1])
    with pytest.raises(ValueError, match="biases"):
        batch_norm(x.detach()[:, :2], torch.nn.BatchNorm2d(2).double(), biases=biases[:1])


def test_search_cell_convolutions_run_without_their_biases():
    """The cell's 1x1 and 3x3 convolutions (with biases, as xautodl's at affine=False) run without
    them: no convolution gets a bias, and every bias gets gradient zero; the cell's output is an
    ordinary tensor, which in-place ops may modify (the zero gradients come through an input of its
    last mixed sum, not through a custom Function's view of the output)."""
    torch.manual_seed(6)
    cell = nb201.SearchCell(4, 4, 1, 4, nb201.PRIMITIVES).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64).softmax(-1)

    class ConvBiases(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.biases = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.biases.append(args[2])
            return func(*args, **(kwargs or {}))

    with ConvBiases() as counted:
        y = cell(x, w)
        y.relu_()
        y.sum().backward()
    assert len(counted.biases) == 6 and all(b is None for b in counted.biases)  # 1x1 and 3x3 of nodes 0, 1, 2
    biases = [p for n, p in cell.named_parameters() if n.endswith("bias")]
    assert len(biases) == 12 and all(b.grad is not None and (b.grad == 0).all() for b in biases)


def test_slim_step_keeps_less_for_backward():
    """Bytes saved for the backward (deduplicated by storage) of one step: well below the eager supernet's."""

    def saved_bytes(net, x):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x).sum().backward()
        return sum(seen.values())

    torch.manual_seed(5)
    fast = nb201.Network(C=8, N=1)
    eager = EagerNB201Network(C=8, N=1)
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert saved_bytes(fast, x) < 0.7 * saved_bytes(eager, x)


def test_one_mixed_sum_per_node(mixed_sum_calls):
    """Each node of each cell is one fastnas.mixed_sum over its (edge, non-none op) pairs."""
    net = nb201.Network(C=4, N=2)
    net(torch.randn(2, 3, 8, 8))
    assert mixed_sum_calls == [4, 8, 12] * 6
    # the mixed sums' inputs are exactly the (edge, non-none op) pairs of every cell
    pairs = {(key, op) for key in net.edge_keys for op in nb201.PRIMITIVES if op != "none"}
    cells = [m for m in net.cells if isinstance(m, nb201.SearchCell)]
    assert len(cells) == 6
    for cell in cells:
        assert len(cell.last_computed) == len(pairs) and set(cell.last_computed) == pairs


@pytest.mark.parametrize("sampler", [None, "gdas"])
def test_network_float32_channels_last_path(sampler):
    """float32 CPU runs in channels_last (oneDNN): same results within fp32 tolerance."""
    torch.manual_seed(6)
    fast = nb201.Network(C=8, N=1, num_classes=5, sampler=sampler)
    eager = EagerNB201Network(C=8, N=1, num_classes=5, sampler=sampler)
    assert_fp32_step_close(fast, eager, torch.randn(4, 3, 8, 8))


def test_search_cell_select_and_dynamic_match_reference():
    torch.manual_seed(12)
    fast = nb201.SearchCell(4, 4, 1, 4, nb201.PRIMITIVES).double()
    eager = EagerNB201Cell(4).double()
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(6, 5, dtype=torch.float64)
    ones = torch.ones(6, 5, dtype=torch.float64)
    best = w.argmax(-1).tolist()
    torch.testing.assert_close(fast.forward_select(x, w), eager(x, ones, best), **TOL)
    torch.testing.assert_close(fast.forward_joint(x, w.softmax(-1)), eager(x, w.softmax(-1)), **TOL)
    nodes = nb201.parse_arch_string(
        "|nor_conv_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|nor_conv_1x1~0|none~1|skip_connect~2|"
    )
    index = [nb201.PRIMITIVES.index(op) for node in nodes for op, _ in node]  # edge_keys order = this order here
    order = [fast.edge2index[f"{i}<-{j}"] for i, node in enumerate(nodes, start=1) for _, j in node]
    by_edge = [index[order.index(e)] for e in range(6)]
    torch.testing.assert_close(fast.forward_dynamic(x, nodes), eager(x, ones, by_edge), **TOL)


@pytest.mark.parametrize("network", ["supernet", "tiny"])
def test_one_channel_images_run_channels_last(network):
    """A one-channel batch is NCHW and channels_last at once, so its stem convolution returns NCHW:
    the networks put the stem's output in channels_last, or every cell would run in NCHW."""
    from fastnas.networks import TinyNetwork

    torch.manual_seed(3)
    if network == "supernet":
        net = nb201.Network(C=8, N=1, num_classes=5, in_channels=1)
    else:
        arch = "|nor_conv_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|none~0|nor_conv_1x1~1|skip_connect~2|"
        net = TinyNetwork(8, 1, arch, 5, in_channels=1)
    seen = []
    net.cells[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    net(torch.randn(4, 1, 8, 8))
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
