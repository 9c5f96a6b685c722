"""Training steps of both spaces: kernels per step, running statistics, evaluation, host reads, compilation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_dicts, graph_recording_backend, ops_of
from eager_supernets import EagerDartsNetwork, EagerNB201Network, run_step
from kernel_count import count_kernels
from torch.utils._python_dispatch import TorchDispatchMode

from fastnas.spaces import darts, nb201
from fastnas.spaces.ops import (
    _adjacent,
    batch_norm,
    cat_parameters,
    pack_parameters,
    pack_running_stats,
    shared_batch_norm,
)

SAMPLED = [dict(sampler="gdas"), dict(sampler="uniform"), dict(sampler="gdas", arch="simplex")]


def tiny(space: str, **mode):
    if space == "darts":
        C = 8 if mode.get("partial_channels") else 4
        return darts.Network(C=C, num_classes=5, layers=3, **mode)
    return nb201.Network(C=4, N=1, num_classes=5, **mode)


def train_step(net, x, y, sample=None):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x) if sample is None else net(x, sample), y).backward()


# --------------------------------------------------------------------------- kernels per step

# fills, casts and index gathers the reference steps issue by the hundred; a step may keep a handful (the
# loss's backward seed, the samplers' one-hot rows), none per BatchNorm, op or node
CHURN = {"zeros", "ones_like", "zeros_like", "_to_copy", "ones", "index", "scalar_tensor", "lift_fresh_copy"}


def assert_little_churn(counts) -> None:
    churn = {k: counts[k] for k in CHURN & set(counts)}
    assert sum(churn.values()) <= 8, churn


STEP_CASES = [("darts", mode, True) for mode in [dict(), *SAMPLED, dict(partial_channels=4)]] + [
    ("nb201", mode, trs) for mode in [dict(), *SAMPLED] for trs in (True, False)
]


@pytest.mark.parametrize("space, mode, track_running_stats", STEP_CASES, ids=str)
def test_step_kernels_against_the_reference(space, mode, track_running_stats):
    """Kernels of a training step: at most a third of DARTS's softmax supernet (every op of every edge)
    and half of NAS-Bench-201's, with the same BatchNorm setting, for every sampler. The real structures
    (DARTS 8 layers, NAS-Bench-201 N=5) at a tiny width: the count does not depend on C."""
    torch.manual_seed(0)
    if space == "darts":
        C = 8 if mode.get("partial_channels") else 4
        fast, reference, ratio = darts.Network(C=C, layers=8, **mode), EagerDartsNetwork(C=C, layers=8), 3
    else:
        trs = dict(track_running_stats=track_running_stats)
        fast, reference, ratio = nb201.Network(C=4, N=5, **trs, **mode), EagerNB201Network(C=4, N=5, **trs), 2
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    train_step(fast, x, y)
    counted = count_kernels(lambda: train_step(fast, x, y))
    reference_total = count_kernels(lambda: train_step(reference, x, y)).total
    assert counted.total * ratio <= reference_total, (counted.total, reference_total)
    assert_little_churn(counted.counts)


@pytest.mark.parametrize("space", ["darts", "nb201"])
@pytest.mark.parametrize("mode", [dict(), dict(arch="simplex"), dict(sampler="gdas")], ids=str)
def test_cells_share_each_nodes_weights_in_a_forward(space, mode, monkeypatch):
    """One gather per node and kind of cell in a network's forward, not one per cell: fewer kernels,
    the same results and gradients (float64) as gathering in every cell."""
    from fastnas.spaces import _arch

    torch.manual_seed(0)
    nets = [tiny(space, **mode).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2,))
    sample = nets[0].sample_architecture() if mode.get("sampler") else None
    gathers = []
    for what in ("_gather", "_gather_picked"):
        original = getattr(_arch, what)
        monkeypatch.setattr(_arch, what, lambda *a, original=original: gathers.append(1) or original(*a))
    train_step(nets[0], x, y, sample)
    shared = len(gathers)
    from fastnas.spaces import engine

    monkeypatch.setattr(engine.FusedCell, "node_weights", lambda *args: None)  # every cell picks its own
    gathers.clear()
    train_step(nets[1], x, y, sample)
    cells = len(nets[0]._search_cells())
    kinds = 2 if space == "darts" else 1  # normal and reduction cells
    assert shared * cells == len(gathers) * kinds, (shared, len(gathers))
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- BatchNorm statistics


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_grouped_batch_norm_statistics_equal_native(memory_format, packed, momentum):
    """One BatchNorm over 3 modules' channels = each module's own native BatchNorm on its block:
    outputs, input gradient and running statistics over several steps (float32, exactly as the native
    kernel for a common momentum, which updates the packed statistics itself, up to the rounding of the
    batch statistics over more channels)."""
    torch.manual_seed(4)
    bns = [torch.nn.BatchNorm2d(2, affine=False, momentum=momentum) for _ in range(3)]
    refs = [torch.nn.BatchNorm2d(2, affine=False, momentum=momentum) for _ in range(3)]
    for bn, ref in zip(bns, refs):
        bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2), ref.load_state_dict(bn.state_dict())
    if packed:
        pack_running_stats(bns)
        assert _adjacent([bn.running_var for bn in bns]) is not None
    for _ in range(3):
        x = torch.randn(3, 6, 4, 5).contiguous(memory_format=memory_format).requires_grad_()
        ys = batch_norm(x, bns, parts=3)
        assert all(y.is_contiguous(memory_format=memory_format) for y in ys)  # dense, ready for a mixed sum
        x2 = x.detach().clone().requires_grad_()
        ys2 = [ref(c) for ref, c in zip(refs, x2.chunk(3, dim=1))]
        g = [torch.randn_like(y) for y in ys2]
        torch.autograd.backward(ys, g), torch.autograd.backward(ys2, g)
        for y, y2 in zip(ys, ys2):
            torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for bn, ref in zip(bns, refs):
        # the native kernel over 6 channels instead of 2 may round the batch mean differently (1 ulp), and
        # fastnas's channels_last CPU kernel sums in its own order (a few ulps of a mean near 0);
        # the cumulative average is updated after the kernel (float32 rounding)
        assert_close_dicts(bn.state_dict(), ref.state_dict(), rtol=3e-7, atol=5e-8)


def test_shared_batch_norm_updates_every_module():
    torch.manual_seed(5)
    bns = [torch.nn.BatchNorm2d(3, affine=False).double() for _ in range(3)]
    refs = [torch.nn.BatchNorm2d(3, affine=False).double() for _ in range(3)]
    for bn, ref in zip(bns, refs):
        bn.running_mean.uniform_(), ref.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = shared_batch_norm(x, bns)
    for ref in refs:
        torch.testing.assert_close(y, ref(x), **TOL)
    for bn, ref in zip(bns, refs):
        assert_close_dicts(bn.state_dict(), ref.state_dict(), rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: shared_batch_norm(t, bns[:1]), (x,))


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_running_statistics_stay_packed(space):
    """Grouped BatchNorms keep adjacent statistics through .double() (the cells pack them again)."""
    net = tiny(space).double()
    cell = net.cells[0]
    if space == "darts":
        edges = cell._out_edges(0)
        bns = [cell._ops[e]._ops[darts.PRIMITIVES.index("sep_conv_3x3")].op[7] for e in edges]
    else:
        bns = [cell.edges[f"{i}<-0"][nb201.PRIMITIVES.index("nor_conv_3x3")].op[2] for i in (1, 2, 3)]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert _adjacent([getattr(bn, name) for bn in bns]) is not None, name
    assert bns[0].running_mean.dtype == torch.float64


def assert_steps_match_eager(space: str, net, x, replace_buffers: bool = False) -> None:
    """Two steps of ``net`` equal an eager supernet's from the same state: outputs, gradients and
    running statistics. ``replace_buffers``: first give every module of the cells new buffers with the
    same values behind their backs (no registration, no repacking), once the eager supernet is built
    (building modules is a registration: it would drop every cached plan)."""
    kwargs = dict(C=4, num_classes=5, layers=3) if space == "darts" else dict(C=4, N=1, num_classes=5)
    eager = (EagerDartsNetwork if space == "darts" else EagerNB201Network)(**kwargs).to(x.dtype)
    if replace_buffers:
        run_step(net, x)  # the plans cached again after that registration
        for cell in net.cells:
            for child in cell.children():
                child._apply(torch.clone)
    eager.load_state_dict(net.state_dict())
    for _ in range(2):
        (yf, gf), (ye, ge) = run_step(net, x), run_step(eager, x)
        torch.testing.assert_close(yf, ye, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        assert_close_dicts(net.state_dict(), eager.state_dict(), **TOL)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_cached_plans_follow_the_modules(space):
    """The cells cache which module is what and their BatchNorm groups' packed statistics (host time):
    after buffers replaced without a registration, ``.double()``, a replaced module and a deepcopy, steps
    still equal the eager supernet's, and a copy and its original step apart."""
    torch.manual_seed(0)
    net = tiny(space).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_steps_match_eager(space, net, x, replace_buffers=True)
    net.float().double()  # every buffer replaced twice, and packed again
    assert_steps_match_eager(space, net, x)
    if space == "darts":  # a new layer in a grouped op: its weight must be the one used
        op = net.cells[0]._ops[0]._ops[darts.PRIMITIVES.index("sep_conv_3x3")]
        op.op[1] = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).double()
    else:
        op = net.cells[0].edges["2<-0"][nb201.PRIMITIVES.index("nor_conv_3x3")]
        op.op[1] = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    assert_steps_match_eager(space, net, x)
    copy = __import__("copy").deepcopy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert_steps_match_eager(space, copy, x)
    assert_close_dicts(net.state_dict(), before, rtol=0, atol=0)  # the original untouched by the copy's steps
    assert_steps_match_eager(space, net, x)


def test_packed_parameters_concatenate_as_views():
    """pack_parameters keeps each Parameter (identity, values) and puts them side by side; cat_parameters
    is then a view of them, whose gradient equals torch.cat's and which sees in-place changes made
    before the backward as autograd does; unpacked, non-contiguous or transformed: a concatenation."""
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, c, 3).double() for c in (2, 4, 3)]
    params = [c.weight for c in convs]
    values = [p.detach().clone() for p in params]
    assert cat_parameters(params).data_ptr() != params[0].data_ptr()  # not packed: copied
    pack_parameters(convs)
    assert [c.weight for c in convs] == params and all(torch.equal(p, v) for p, v in zip(params, values))
    assert _adjacent(params) is not None
    joined = cat_parameters(params)
    assert joined.data_ptr() == params[0].data_ptr() and torch.equal(joined, torch.cat(values))
    g = torch.randn_like(joined)
    (joined * g).sum().backward()
    for p, expected in zip(params, g.split([2, 4, 3])):
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda *ps: cat_parameters(ps) * 1.0, tuple(params))
    joined = cat_parameters(params)
    with torch.no_grad():
        params[1].mul_(2)  # after the forward, before the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        joined.sum().backward()
    with torch.no_grad():
        assert cat_parameters(params)._base is not None  # a view without autograd too
    with pytest.raises(ValueError, match="fastnas::_side_by_side: tensors must .* lie side by side"):
        torch.ops.fastnas._side_by_side([params[1], params[0]])  # not in order (cat_parameters checks first)
    last = [torch.nn.Conv2d(3, 2, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    pack_parameters(last)  # left as they are
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in last)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_a_step_concatenates_no_parameters(space):
    """The grouped convolutions read their edges' weights where they lie (packed), after .double() too."""
    net = tiny(space).double()
    params = {p.data_ptr() for p in net.parameters()}
    concatenated = []

    class Cats(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.cat:
                concatenated.extend(t.data_ptr() in params for t in args[0])
            return func(*args, **(kwargs or {}))

    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2,))
    with Cats():
        train_step(net, x, y)
    assert concatenated and not any(concatenated)


# --------------------------------------------------------------------------- torch.func and forward-mode AD


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_torch_func_grad_and_forward_ad_match_autograd(space):
    """Under torch.func.grad (buffers passed in, as PyTorch's BatchNorm needs) and forward-mode AD the
    supernets take PyTorch's differentiable operations: the gradients and running statistics of a
    plain backward, and a tangent equal to the gradient's inner product with the direction."""
    import copy

    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad

    torch.manual_seed(8)
    net = tiny(space).double()
    ref, dual_net = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def loss(p, b):
        return functional_call(net, {**p, **b}, (x,)).pow(2).sum()

    grads = grad(loss)(params, buffers)
    ref(x).pow(2).sum().backward()
    for k, p in ref.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[k], expected, **TOL, msg=k)
    assert_close_dicts(buffers, dict(ref.named_buffers()), **TOL)

    direction = {k: torch.randn_like(v) for k, v in params.items()}
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, direction[k]) for k, v in params.items()}
        tangent = fwAD.unpack_dual(functional_call(dual_net, duals, (x,)).pow(2).sum()).tangent
    expected = sum((grads[k] * direction[k]).sum() for k in params)
    torch.testing.assert_close(tangent, expected, **TOL)
    assert_close_dicts(dict(dual_net.named_buffers()), dict(ref.named_buffers()), **TOL)


# --------------------------------------------------------------------------- sampled ops: all computed, evaluation


DENSE_CASES = [(space, mode) for space in ("darts", "nb201") for mode in SAMPLED]
DENSE_CASES.append(("darts", dict(sampler="gdas", partial_channels=4)))


@pytest.mark.parametrize("space, mode", DENSE_CASES, ids=str)
def test_computing_every_op_gives_the_sampled_results(space, mode):
    """compute_all_ops (the traced form): the same logits and gradients as computing the sampled ops only."""
    torch.manual_seed(6)
    sparse = tiny(space, **mode).double()
    dense = tiny(space, **mode).double()
    dense.load_state_dict(sparse.state_dict())
    dense.compute_all_ops = True
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for seed in range(2):
        ls, gs = run_step(sparse, x, sample_seed=seed)
        ld, gd = run_step(dense, x, sample_seed=seed)
        torch.testing.assert_close(ls, ld, **TOL)
        assert_close_dicts(gs, gd, **TOL)


@pytest.mark.parametrize("space", ["darts", "nb201"])
@pytest.mark.parametrize("sampler", ["gdas", "uniform"])
def test_eval_uses_the_argmax_architecture(space, sampler):
    torch.manual_seed(7)
    net = tiny(space, sampler=sampler)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    x = torch.randn(2, 3, 8, 8)
    net.train()
    net(x)  # running statistics for the evaluation
    net.eval()
    net.generator = torch.Generator().manual_seed(1)
    first = net(x)
    net.generator = torch.Generator().manual_seed(2)
    torch.testing.assert_close(net(x), first, rtol=0, atol=0)  # no sampling in evaluation
    # ... the argmax architecture: the sample whose op on every edge is the argmax
    argmax = {}
    for name in net._op_weight_names():
        p = getattr(net, name)
        argmax[name] = p.argmax(-1) if sampler == "uniform" else torch.zeros_like(p)  # GDAS: noise-free
    net.eval_arch = "sample"
    torch.testing.assert_close(net(x, argmax), first, rtol=0, atol=0)
    samples = {net(x).sum().item() for _ in range(4)}  # asked for: sampling in evaluation too
    assert len(samples) > 1


@pytest.mark.parametrize("space", ["darts", "nb201"])
@pytest.mark.parametrize("mode", [dict(), dict(sampler="gdas"), dict(sampler="uniform")], ids=str)
def test_no_host_reads_in_a_step_computing_every_op(space, mode, monkeypatch):
    """With compute_all_ops a step reads nothing on the host (on a GPU: no synchronisation)."""
    torch.manual_seed(8)
    net = tiny(space, **mode)
    net.compute_all_ops = True
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    sample = net.sample_architecture()
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: (reads.append(_n), _real(self, *a, **k))[1]
        )
    train_step(net, x, y, sample)
    assert reads == []


# --------------------------------------------------------------------------- compilation

# dynamo's tracing is what a CI-sized test affords (a DARTS cell is ~700 calls to trace); the aot_eager
# backend, which also traces the backward graph as inductor would, on the smallest network
COMPILE_CASES = [
    ("nb201", dict(), "aot_eager"),
    ("nb201", dict(sampler="gdas"), "eager"),
    ("nb201", dict(sampler="uniform", arch="simplex"), "eager"),
    ("darts", dict(sampler="gdas", partial_channels=4), "eager"),
]


def assert_grads_close(net, eager) -> None:
    """Every gradient within float32 tolerance of its own scale, or of a hundredth of the largest one
    (rounding passes through batch statistics of a few values per channel; a conv bias before such a
    BatchNorm has a gradient of zero plus rounding); a parameter without one counts as zero."""
    pairs = [(name, p.grad, q.grad) for (name, p), q in zip(net.named_parameters(), eager.parameters())]
    largest = max(g.abs().max().item() for _, _, g in pairs if g is not None)
    for name, got, expected in pairs:
        if got is None and expected is None:
            continue
        got = got if got is not None else torch.zeros_like(expected)
        expected = expected if expected is not None else torch.zeros_like(got)
        atol = 1e-3 * max(expected.abs().max().item(), 5e-2 * largest)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def small(space: str, **mode):
    if space == "darts":  # 2 nodes per cell (5 edges), 3 cells
        return darts.Network(C=8, num_classes=5, layers=3, steps=2, multiplier=2, **mode)
    return nb201.Network(C=4, N=1, num_classes=5, **mode)


@pytest.mark.parametrize("space, mode, backend", COMPILE_CASES, ids=str)
def test_whole_step_compiles_in_one_graph_without_recompiling(space, mode, backend, recwarn, caplog):
    """torch.compile(fullgraph=True) of forward + loss: one graph, no recompilation over several steps
    (new samples, a new tau), the eager results within float32 tolerance, no warning about cached
    (``lru_cache``) helpers inside the trace."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(9)
    net = small(space, **mode)
    eager = small(space, **mode)
    eager.load_state_dict(net.state_dict())

    def loss_of(x, y, sample):
        return F.cross_entropy(net(x, sample), y)

    compiled = torch.compile(loss_of, fullgraph=True, backend=backend)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    for step in range(3):
        net.tau = eager.tau = 10.0 - step
        sample = net.sample_architecture()
        net.zero_grad(set_to_none=True), eager.zero_grad(set_to_none=True)
        loss = compiled(x, y, sample)
        loss.backward()
        expected = F.cross_entropy(eager(x, sample), y)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert_grads_close(net, eager)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1 and not torch._dynamo.utils.counters["recompiles"]
    assert not [w for w in recwarn if "lru_cache" in str(w.message)] and "lru_cache" not in caplog.text


def test_regional_compilation_shares_graphs_across_cells():
    """compile_cells: one compiled graph per kind and shape of cell (NAS-Bench-201: 3 stages of 2 cells
    give 3), none added by later steps, results those of the eager network computing every op."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(10)
    net, eager = nb201.Network(C=4, N=2, sampler="gdas"), nb201.Network(C=4, N=2, sampler="gdas")
    eager.load_state_dict(net.state_dict())
    net.compile_cells(backend="eager")
    eager.compute_all_ops = True
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    for step in range(2):
        for n in (net, eager):
            n.generator = torch.Generator().manual_seed(step)
            train_step(n, x, y)
        assert_grads_close(net, eager)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_compiled_cells_run_the_batch_norm_kernels_both_ways(space):
    """compile_cells on a channels_last batch (fastnas's CPU layout): every cell graph runs the
    BatchNorm kernels forward and backward (not PyTorch's BatchNorm, decomposed and recompiled per
    cell), with the eager network's results."""
    torch._dynamo.reset()
    torch.manual_seed(11)
    net, eager = small(space), small(space)
    eager.load_state_dict(net.state_dict())
    forward_graphs, backward_graphs = [], []
    net.compile_cells(backend=graph_recording_backend(forward_graphs, backward_graphs))
    eager.compute_all_ops = True
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (2,))
    for n in (net, eager):
        train_step(n, x, y)
    assert_grads_close(net, eager)
    assert_close_dicts(dict(net.named_buffers()), dict(eager.named_buffers()), rtol=1e-5, atol=1e-6)
    assert forward_graphs and len(backward_graphs) == len(forward_graphs)
    kernels = torch.ops.fastnas.batch_norm_parts.default, torch.ops.fastnas.batch_norm_parts_backward.default
    for forward, backward in zip(forward_graphs, backward_graphs):
        assert kernels[0] in ops_of(forward) and kernels[1] in ops_of(backward)
        assert not {torch.ops.aten.native_batch_norm_backward.default, torch.ops.aten.native_batch_norm.default} & (
            ops_of(forward) | ops_of(backward)
        )


def _cat_of_inputs(gm) -> list:
    """The graph's concatenations of its own inputs (weights concatenated inside the graph)."""
    return [
        node
        for node in gm.graph.nodes
        if node.target is torch.ops.aten.cat.default and all(a.op == "placeholder" for a in node.args[0])
    ]


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_compiled_cells_update_running_statistics_after_the_graph(space):
    """compile_cells: the graphs write back no buffer (the running statistics are updated after each
    graph, from the batch statistics it returns) and concatenate no weights (views of the packed
    parameters come in, and each node's op weights, picked before the graph, so the graphs do not read
    the architecture weights); buffers and gradients end as the eager network's, also for a group whose
    statistics are no longer packed, a module given another momentum than its group's and one given a
    cumulative average (``momentum=None``, weighed after the graph)."""
    torch._dynamo.reset()
    torch.manual_seed(12)
    net, eager = small(space), small(space)
    eager.load_state_dict(net.state_dict())
    packed = [
        name
        for name, b in net.named_buffers()
        if "running_mean" in name and b.untyped_storage().nbytes() > b.numel() * b.element_size()
    ]
    other_momentum, cumulative, unpacked = (packed[i].rsplit(".", 1)[0] for i in (0, 1, -1))
    for n in (net, eager):
        n.get_submodule(other_momentum).momentum = 0.3
        n.get_submodule(cumulative).momentum = None
        bn = n.get_submodule(unpacked)
        bn.running_mean, bn.running_var = bn.running_mean.clone(), bn.running_var.clone()
    forward_graphs, backward_graphs = [], []
    net.compile_cells(backend=graph_recording_backend(forward_graphs, backward_graphs))
    eager.compute_all_ops = True
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (2,))
    for _ in range(2):
        for n in (net, eager):
            train_step(n, x, y)
        assert_grads_close(net, eager)
        assert_close_dicts(dict(net.named_buffers()), dict(eager.named_buffers()), rtol=1e-5, atol=1e-6)
    assert forward_graphs
    arch_shape = tuple(net.arch_parameters()[0].shape)
    for forward in forward_graphs:
        assert torch.ops.aten.copy_.default not in ops_of(forward)
        assert not _cat_of_inputs(forward)
        inputs = [node for node in forward.graph.nodes if node.op == "placeholder"]
        assert not [node for node in inputs if tuple(node.meta["val"].shape) == arch_shape and node.users]
