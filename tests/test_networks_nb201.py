"""fastnas.networks.nb201 (NAS-Bench-201's TinyNetwork) against the reference's manifest, NAS-Bench-201's
published costs and an eager oracle; and, where xautodl is installed, against xautodl itself."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL
from eager_networks import EagerTinyNetwork
from network_helpers import assert_matches_manifest, assert_same_runs, load_manifest, randomize_state, run_net

from fastnas.networks import InferCell, TinyNetwork, count_macs, count_parameters
from fastnas.networks.nb201 import as_nodes
from fastnas.spaces.nb201 import parse_arch_string

MANIFEST = load_manifest("nb201")
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ARCHS = {
    "best": BEST,
    "pool-none": "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|",
    "conv1x1-skip": "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    "zero-nodes": "|none~0|+|none~0|none~1|+|none~0|nor_conv_1x1~1|skip_connect~2|",  # nodes 1 and 2 are zero
}


@pytest.mark.parametrize("name", sorted(MANIFEST["networks"]))
def test_state_dict_and_costs_match_reference(name):
    """Keys, shapes and order of xautodl's TinyNetwork, its parameter count and multiply-adds (CIFAR at
    32x32, ImageNet16-120 at 16x16), which equal the FLOPs and parameters NAS-Bench-201 publishes."""
    entry = MANIFEST["networks"][name]
    net = TinyNetwork(entry["C"], entry["N"], entry["arch"], entry["num_classes"])
    assert_matches_manifest(net, entry)
    assert count_parameters(net) == entry["parameters"]
    ((size, macs),) = entry["macs"].items()
    assert count_macs(net, tuple(int(s) for s in size.split("x"))) == macs
    if "published" in entry:
        assert round(macs / 1e6, 5) == entry["published"]["flops_M"]
        assert round(entry["parameters"] / 1e6, 6) == entry["published"]["params_M"]


def _pair(arch, C=4, N=1, in_channels=1, num_classes=7):
    torch.manual_seed(0)
    fast = TinyNetwork(C, N, arch, num_classes, in_channels=in_channels).double()
    eager = EagerTinyNetwork(C, N, arch, num_classes, in_channels=in_channels).double()
    randomize_state(fast)
    eager.load_state_dict(fast.state_dict())
    fast.load_state_dict(eager.state_dict())  # both ways
    return fast, eager


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_matches_eager_reference(arch, training):
    """Features, logits, input and parameter gradients and updated BatchNorm statistics equal the eager
    oracle's (xautodl's computation, ``none`` summed as a zero tensor) in float64."""
    fast, eager = _pair(arch, N=2)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert_same_runs(run_net(fast, x, training), run_net(eager, x, training))


def test_other_sizes_and_channels():
    fast, eager = _pair(BEST, in_channels=3, num_classes=120)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)  # ImageNet16-120's resolution
    features, logits = fast.eval()(x)
    assert features.shape == (2, 16) and logits.shape == (2, 120)
    torch.testing.assert_close(logits, eager.eval()(x)[1], **TOL)


def test_genotype_forms_and_errors():
    class Structure:  # xautodl's Structure keeps the nodes in .nodes
        nodes = parse_arch_string(BEST)

    forms = [BEST, parse_arch_string(BEST), Structure(), [list(map(list, node)) for node in parse_arch_string(BEST)]]
    assert all(as_nodes(f) == parse_arch_string(BEST) for f in forms)
    cell = InferCell(BEST, 4, 4, 1)
    assert cell.node_IX == [[0], [1, 2], [3, 4, 5]] and cell.node_IN == [[0], [0, 1], [0, 1, 2]]
    assert cell.nodes == 4 and cell.arch_string() == BEST and BEST in repr(cell)
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'"):
        TinyNetwork(4, 1, "|conv_9x9~0|", 10)
    with pytest.raises(ValueError, match="not an earlier node"):
        TinyNetwork(4, 1, (((("nor_conv_3x3", 1),),)), 10)
    with pytest.raises(TypeError, match="genotype"):
        TinyNetwork(4, 1, 3, 10)
    with pytest.raises(ValueError, match="node 2 has no inputs"):
        TinyNetwork(4, 1, ((("skip_connect", 0),), ()), 10)
    with pytest.raises(ValueError, match="no nodes"):
        TinyNetwork(4, 1, (), 10)


def test_bad_input_named():
    net = TinyNetwork(4, 1, BEST, 10, in_channels=1)
    with pytest.raises(ValueError, match=r"input must be \[B, 1, H, W\]"):
        net(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 6, 6))


def test_loads_xautodl_tiny_network_both_ways():
    """The real xautodl TinyNetwork's state_dict loads into fastnas's and back, same outputs."""
    tiny = pytest.importorskip("xautodl.models.cell_infers.tiny_network", reason="xautodl is not installed")
    genotypes = pytest.importorskip("xautodl.models.cell_searchs.genotypes", reason="xautodl is not installed")
    for arch in ARCHS.values():
        torch.manual_seed(0)
        ref = tiny.TinyNetwork(4, 1, genotypes.Structure.str2structure(arch), 10).double()
        randomize_state(ref)
        fast = TinyNetwork(4, 1, genotypes.Structure.str2structure(arch), 10).double()
        fast.load_state_dict(ref.state_dict())
        ref.load_state_dict(fast.state_dict())
        assert list(fast.state_dict()) == list(ref.state_dict())
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        for training in (False, True):
            assert_same_runs(run_net(fast, x, training), run_net(ref, x, training))
