"""fastnas.spaces.darts against the eager DARTS / PC-DARTS supernet (the reference code's computation)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_dicts, assert_fp32_step_close
from eager_supernets import EagerDartsNetwork, EagerMixedOp, run_step

from fastnas.spaces import darts


def test_primitives_and_parameters():
    assert darts.PRIMITIVES == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]  # fmt: skip
    net = darts.Network(C=4, num_classes=7, layers=3)
    assert [tuple(p.shape) for p in net.arch_parameters()] == [(14, 8), (14, 8)]
    assert [net.arch_simplex_segments(p) for p in net.arch_parameters()] == [None, None]
    assert [c.reduction for c in net.cells] == [False, True, True]
    assert len(net.cells[0]._ops) == 14
    pc = darts.Network(C=8, layers=3, partial_channels=4)
    assert [tuple(p.shape) for p in pc.arch_parameters()] == [(14, 8), (14, 8), (14,), (14,)]
    assert pc.arch_simplex_segments(pc.betas_normal) == (2, 3, 4, 5)
    for n in (net, pc):
        ids = {id(p) for p in n.arch_parameters()} | {id(p) for p in n.weight_parameters()}
        assert ids == {id(p) for p in n.parameters()}
        assert len(n.arch_parameters()) + len(n.weight_parameters()) == len(list(n.parameters()))
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    w = net.arch_weights()
    assert set(w) == {"normal", "reduce"} and w["normal"].shape == (14, 8)
    torch.testing.assert_close(w["reduce"].sum(-1), torch.ones(14))
    simplex = darts.Network(C=8, layers=3, arch="simplex", partial_channels=4)
    torch.testing.assert_close(simplex.alphas_normal.sum(-1), torch.ones(14), rtol=0, atol=1e-6)
    sums = [s.sum().item() for s in simplex.betas_reduce.split([2, 3, 4, 5])]
    assert sums == pytest.approx([1, 1, 1, 1], abs=1e-6)
    with pytest.raises(ValueError, match="partial_channels"):
        darts.Network(C=6, layers=3, partial_channels=4)


def test_mixed_op_state_dict_keys_match_reference_layout():
    for stride in (1, 2):
        keys = set(darts.MixedOp(4, stride).state_dict())
        assert keys == set(EagerMixedOp(4, stride).state_dict())
        assert {"_ops.1.1.running_mean", "_ops.2.1.running_var", "_ops.4.op.1.weight", "_ops.4.op.7.running_var",
                "_ops.7.op.2.weight"} <= keys  # fmt: skip
        assert ("_ops.3.conv_1.weight" in keys) == (stride == 2)  # skip_connect: FactorizedReduce at stride 2
        assert not any(k.startswith("_ops.0.") for k in keys)


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_is_a_drop_in_for_darts(stride, mixed_sum_calls):
    torch.manual_seed(stride)
    fast = darts.MixedOp(4, stride).double()
    eager = EagerMixedOp(4, stride).double()
    fast.load_state_dict(eager.state_dict())
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64).softmax(-1)
    results = []
    for op in (fast, eager):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = op(xi, wi)
        y.backward(torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        results.append((y.detach(), xi.grad, wi.grad, {n: p.grad for n, p in op.named_parameters()}, op.state_dict()))
    for a, b in zip(*results):
        if isinstance(a, dict):
            assert_close_dicts(a, b, **TOL)
        else:
            torch.testing.assert_close(a, b, **TOL)
    assert results[0][2][0] == 0  # 'none' is never computed: zero gradient
    assert mixed_sum_calls == [7]  # one fused sum over the 7 non-none ops
    fast.eval(), eager.eval()
    torch.testing.assert_close(fast(x, w), eager(x, w), **TOL)


MODES = [
    dict(),
    dict(arch="simplex"),
    dict(sampler="gdas"),
    dict(sampler="gdas", arch="simplex"),
    dict(sampler="uniform"),
    dict(partial_channels=4),
    dict(partial_channels=4, arch="simplex"),
    dict(partial_channels=4, sampler="gdas"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())) or "softmax")
def test_network_matches_eager_supernet(mode):
    torch.manual_seed(7)
    C = 8 if mode.get("partial_channels") else 4
    fast = darts.Network(C=C, num_classes=5, layers=3, **mode).double()
    eager = EagerDartsNetwork(C=C, num_classes=5, layers=3, **mode).double()
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    arch_grad = 0.0
    for sample_seed in range(2):
        lf, gf = run_step(fast, x, sample_seed=sample_seed)
        le, ge = run_step(eager, x, sample_seed=sample_seed)
        torch.testing.assert_close(lf, le, **TOL)
        assert_close_dicts(gf, ge, **TOL)
        arch_grad += sum(gf[n].abs().sum().item() for n in ("alphas_normal", "alphas_reduce"))
        if mode.get("partial_channels"):
            assert gf["betas_normal"].abs().sum() > 0
    assert (arch_grad == 0) == (mode.get("sampler") == "uniform")
    assert_close_dicts(fast.state_dict(), eager.state_dict(), **TOL)  # running statistics too


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_imagenet_stem_matches_eager_supernet(partial_channels):
    """PC-DARTS's ImageNet search network (three stride-2 convolutions, the first cell reading stem0
    through a factorized reduction): keys, shapes, logits, gradients and statistics equal the eager
    oracle's, whose stem rectifies in place as PC-DARTS's does."""
    torch.manual_seed(3)
    kwargs = dict(C=4, num_classes=5, layers=3, partial_channels=partial_channels, stem="imagenet")
    fast = darts.Network(**kwargs).double()
    eager = EagerDartsNetwork(**kwargs).double()
    shapes = [(k, tuple(v.shape)) for k, v in fast.state_dict().items()]
    assert shapes == [(k, tuple(v.shape)) for k, v in eager.state_dict().items()]
    modules = [k for k, _ in shapes if not k.startswith(("alphas", "betas"))]
    assert modules[:3] == ["stem0.0.weight", "stem0.1.weight", "stem0.1.bias"]
    assert dict(shapes)["stem0.0.weight"] == (6, 3, 3, 3) and dict(shapes)["stem1.1.weight"] == (12, 12, 3, 3)
    assert not hasattr(fast, "stem") and type(fast.cells[0].preprocess0).__name__ == "FactorizedReduce"
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # 4x4 before the cells
    lf, gf = run_step(fast, x)
    le, ge = run_step(eager, x)
    torch.testing.assert_close(lf, le, **TOL)
    assert_close_dicts(gf, ge, **TOL)
    assert_close_dicts(fast.state_dict(), eager.state_dict(), **TOL)
    with pytest.raises(ValueError, match="stem must be"):
        darts.Network(C=4, layers=3, stem="mnist")


@pytest.mark.parametrize("partial_channels", [1, 4])
def test_gdas_computes_only_the_sampled_ops(partial_channels, mixed_sum_calls):
    torch.manual_seed(8)
    net = darts.Network(C=8, layers=3, sampler="gdas", partial_channels=partial_channels)
    net.generator = torch.Generator().manual_seed(11)
    sample = net.sample_architecture()
    sel_normal = net._edge_weights_of("alphas_normal", sample).selected
    sel_reduce = net._edge_weights_of("alphas_reduce", sample).selected
    net.generator = torch.Generator().manual_seed(11)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    expected_calls = []
    for cell in net.cells:
        sel = sel_reduce if cell.reduction else sel_normal
        expected = [(e, darts.PRIMITIVES[s[0]]) for e, s in enumerate(sel) if s[0] != 0]
        assert cell.last_computed == expected
        offset = 0
        for i in range(4):  # one sum per node (two with partial channels: ops' part and bypass part)
            n_ops = sum(1 for e, _ in expected if offset <= e < offset + 2 + i)
            expected_calls += [n_ops] if n_ops else []
            expected_calls += [2 + i] if partial_channels > 1 else []
            offset += 2 + i
        for e, mixed in enumerate(cell._ops):
            for k, op in enumerate(mixed._ops):
                for p in op.parameters():
                    assert (p.grad is not None) == (k == sel[e][0]), (e, k)
    assert mixed_sum_calls == expected_calls


def test_one_mixed_sum_per_node(mixed_sum_calls):
    net = darts.Network(C=4, layers=3)
    net(torch.randn(2, 3, 8, 8))
    assert mixed_sum_calls == [14, 21, 28, 35] * 3  # 7 non-none ops on each of 2, 3, 4, 5 edges


def reference_parse(W, steps=4):
    """DARTS's genotype rule written out as in model_search.py: per node the 2 edges with the largest
    non-none weight (stable sort), each with its argmax non-none op (first on ties)."""
    gene, n, start = [], 2, 0
    for i in range(steps):
        rows = W[start : start + n]
        edges = sorted(range(i + 2), key=lambda x: -max(rows[x][k] for k in range(len(rows[x])) if k != 0))[:2]
        for j in edges:
            k_best = None
            for k in range(len(rows[j])):
                if k != 0 and (k_best is None or rows[j][k] > rows[j][k_best]):
                    k_best = k
            gene.append((darts.PRIMITIVES[k_best], j))
        start += n
        n += 1
    return gene


@pytest.mark.parametrize("seed", range(4))
def test_genotype_rule_and_round_trip(seed):
    torch.manual_seed(seed)
    net = darts.Network(C=4, layers=3)
    with torch.no_grad():
        net.alphas_normal.normal_()
        net.alphas_reduce.normal_()
        net.alphas_normal[:, 0] = 10.0  # 'none' strongest everywhere: must be ignored
    g = net.genotype()
    assert g.normal == reference_parse(net.arch_weights()["normal"].tolist())
    assert g.reduce == reference_parse(net.arch_weights()["reduce"].tolist())
    assert g.normal_concat == range(2, 6) and g.reduce_concat == range(2, 6)
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert darts.parse_genotype(net.export()) == g
    assert darts.parse_genotype(str(g)) == g


def test_genotype_with_partial_channels_weighs_edges():
    net = darts.Network(C=8, layers=3, partial_channels=4)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.zero_()
        net.alphas_normal[0, 4] = 1.0  # edge (node 0 <- s0) has the strongest op ...
        net.alphas_normal[1, 5] = 0.9
        net.betas_normal[0] = -3.0  # ... but a tiny edge weight
    g = net.genotype()
    assert g.normal[0] == ("sep_conv_5x5", 1)
    W = net.arch_weights()["normal"].double() * net._edge_weights(net.betas_normal).double()[:, None]
    assert g.normal == reference_parse(W.tolist())


def test_parse_genotype_reads_published_genotypes():
    text = ("Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
            "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])")  # fmt: skip
    g = darts.parse_genotype(text)
    assert g.normal[0] == ("sep_conv_3x3", 1) and g.reduce_concat == [2, 3, 4, 5]
    assert darts.parse_genotype(str(g)) == g
    for bad in ("Genotype(normal=[])", "os.system('x')", "Genotype(normal=[('conv', 0)], normal_concat=[2], "
                "reduce=[], reduce_concat=[2])"):  # fmt: skip
        with pytest.raises(ValueError):
            darts.parse_genotype(bad)


@pytest.mark.parametrize("partial_channels", [1, 4])
def test_network_float32_channels_last_path(partial_channels):
    """float32 CPU runs in channels_last (oneDNN): same results within fp32 tolerance."""
    torch.manual_seed(9)
    fast = darts.Network(C=8, num_classes=5, layers=3, partial_channels=partial_channels)
    eager = EagerDartsNetwork(C=8, num_classes=5, layers=3, partial_channels=partial_channels)
    assert_fp32_step_close(fast, eager, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("network", ["supernet", "evaluation"])
def test_one_channel_images_run_channels_last(network):
    """As for NAS-Bench-201: the stem's output of a one-channel batch is put in channels_last."""
    from fastnas.networks import NetworkCIFAR

    torch.manual_seed(3)
    if network == "supernet":
        net = darts.Network(C=8, num_classes=5, layers=3, in_channels=1)
    else:
        net = NetworkCIFAR(8, 5, 3, False, darts.parse_genotype(str(darts.Network(C=8, layers=3).export())),
                           in_channels=1)  # fmt: skip
    seen = []
    net.cells[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    net(torch.randn(2, 1, 16, 16))
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
