"""fastnas.networks.darts (DARTS's NetworkCIFAR) against the reference's manifest and an eager oracle."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from eager_networks import EagerNetworkCIFAR
from network_helpers import assert_matches_manifest, assert_same_runs, load_manifest, randomize_state, run_net

from fastnas.networks import GENOTYPES, NetworkCIFAR, count_macs, count_parameters
from fastnas.networks.darts import Cell, as_genotype, drop_path
from fastnas.spaces.darts import Genotype

MANIFEST = load_manifest("darts")


def manifest_genotype(entry: dict):
    g = entry["genotype"]
    if isinstance(g, str):
        return g
    return Genotype(**{k: [tuple(p) for p in v] if k in ("normal", "reduce") else v for k, v in g.items()})


ALL_OPS = manifest_genotype(MANIFEST["networks"]["ALL_OPS_C8_L5_aux"])


@pytest.mark.parametrize("name", sorted(MANIFEST["networks"]))
def test_state_dict_and_counts_match_reference(name):
    """Keys, shapes and order of DARTS's own NetworkCIFAR (C=36, 20 layers for the papers' genotypes),
    its parameter count with and without the auxiliary head, and its multiply-adds on 32x32."""
    entry = MANIFEST["networks"][name]
    net = NetworkCIFAR(entry["C"], entry["num_classes"], entry["layers"], entry["auxiliary"], manifest_genotype(entry))
    assert_matches_manifest(net, entry)
    assert count_parameters(net, exclude_auxiliary=False) == entry["parameters"]
    assert count_parameters(net) == entry["parameters_without_auxiliary"]
    assert count_macs(net, (3, 32, 32)) == entry["macs"]["3x32x32"]


def test_darts_v2_numbers():
    """The figures DARTS reports for its second-order cell: 3.3M parameters (auxiliary head excluded)."""
    entry = MANIFEST["networks"]["DARTS_V2_C36_L20_aux"]
    assert entry["parameters_without_auxiliary"] == 3_349_342
    assert entry["macs"]["3x32x32"] == 528_359_050


def _pair(genotype, C=4, layers=5, in_channels=1, num_classes=7):
    torch.manual_seed(0)
    fast = NetworkCIFAR(C, num_classes, layers, True, genotype, in_channels=in_channels).double()
    eager = EagerNetworkCIFAR(C, num_classes, layers, True, as_genotype(genotype), in_channels=in_channels).double()
    randomize_state(fast)
    eager.load_state_dict(fast.state_dict())
    fast.load_state_dict(eager.state_dict())  # both ways
    return fast, eager


@pytest.mark.parametrize(
    "genotype, size",
    [(ALL_OPS, 8), ("DARTS_V2", 8), ("PC_DARTS", 8), (ALL_OPS, 32)],
    ids=["all-ops-8x8", "darts-v2-8x8", "pc-darts-8x8", "all-ops-32x32"],
)
@pytest.mark.parametrize("mode", ["eval", "train", "drop-path"])
def test_matches_eager_reference(genotype, size, mode):
    """Logits, auxiliary logits, input and parameter gradients and updated BatchNorm statistics equal
    the eager oracle's in float64 (drop path: the same masks from the same seed)."""
    fast, eager = _pair(genotype)
    fast.drop_path_prob = eager.drop_path_prob = 0.3 if mode == "drop-path" else 0.0
    x = torch.randn(3, 1, size, size, dtype=torch.float64)
    fast_run, eager_run = (run_net(n, x, training=mode != "eval") for n in (fast, eager))
    assert len(fast_run[0]) == (1 if mode == "eval" else 2)  # the auxiliary logits only in training
    assert_same_runs(fast_run, eager_run)


def test_drop_path_only_in_training_and_not_on_identities():
    fast, _ = _pair("DARTS_V2")
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    fast.eval()
    reference = fast(x)[0]
    fast.drop_path_prob = 0.5
    torch.testing.assert_close(fast(x)[0], reference, rtol=0, atol=0)
    draws = []
    original = torch.Tensor.bernoulli_

    def spy(self, p, *args, **kwargs):
        draws.append(p)
        return original(self, p, *args, **kwargs)

    fast.train()
    torch.Tensor.bernoulli_ = spy
    try:
        fast(x)
    finally:
        torch.Tensor.bernoulli_ = original
    # DARTS_V2: normal cells 2 identities of 8 ops, reduction cells 3 of 8; 3 normal + 2 reduction cells
    assert len(draws) == 3 * 6 + 2 * 5 and set(draws) == {0.5}
    y = torch.ones(1000, 1, 1, 1, dtype=torch.float64)
    out = drop_path(y, 0.25)
    assert set(out.flatten().tolist()) <= {0.0, 1 / 0.75} and 0.6 < (out > 0).double().mean() < 0.9
    assert drop_path(y, 0.0) is y


def test_auxiliary_head_and_counts():
    net = NetworkCIFAR(4, 10, 5, True, "DARTS_V2")
    aux = sum(p.numel() for n, p in net.named_parameters() if n.startswith("auxiliary_head."))
    assert aux > 0 and count_parameters(net, exclude_auxiliary=False) - count_parameters(net) == aux
    for size in (8, 16, 32, 48):  # DARTS's 5x5/3 pool at 32x32 (an 8x8 map), adaptive 2x2 elsewhere
        logits, logits_aux = net.train()(torch.randn(2, 3, size, size))
        assert logits.shape == logits_aux.shape == (2, 10)
    assert net.eval()(torch.randn(2, 3, 8, 8))[1] is None
    plain = NetworkCIFAR(4, 10, 5, False, "DARTS_V2")
    assert not hasattr(plain, "auxiliary_head") and plain.train()(torch.randn(2, 3, 8, 8))[1] is None
    assert count_parameters(plain) == count_parameters(plain, exclude_auxiliary=False) == count_parameters(net)


def test_genotype_forms_and_errors():
    v2 = GENOTYPES["DARTS_V2"]
    DartsGenotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")  # DARTS's own class
    forms = ["DARTS_V2", str(v2), v2, DartsGenotype(*v2)]
    keys = [list(NetworkCIFAR(4, 10, 4, True, g).state_dict()) for g in forms]
    assert all(k == keys[0] for k in keys)
    assert as_genotype(str(v2)) == as_genotype(v2)
    cell = Cell(v2, 12, 12, 4, reduction=True, reduction_prev=False)
    assert cell.multiplier == 4 and cell._indices == (0, 1, 2, 1, 0, 2, 2, 1)
    bad = {
        "unknown op": v2._replace(normal=[("conv_9x9", 0), ("sep_conv_3x3", 1)]),
        "not one of its earlier states": v2._replace(reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 2)]),
        "two \\(op, input\\) pairs": v2._replace(normal=v2.normal[:3]),
        "index the cell's states": v2._replace(normal_concat=[2, 3, 9]),
    }
    for message, genotype in bad.items():
        with pytest.raises(ValueError, match=message):
            NetworkCIFAR(4, 10, 4, True, genotype)
    with pytest.raises(TypeError, match="genotype"):
        NetworkCIFAR(4, 10, 4, True, 3)
    with pytest.raises(ValueError, match="genotype is neither"):
        NetworkCIFAR(4, 10, 4, True, "DARTS_V9")
    with pytest.raises(ValueError, match="layers"):
        NetworkCIFAR(4, 10, 0, True, v2)


def test_bad_input_named():
    net = NetworkCIFAR(4, 10, 5, True, "DARTS_V2", in_channels=1)
    with pytest.raises(ValueError, match=r"input must be \[B, 1, H, W\]"):
        net(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 10, 10))
    assert NetworkCIFAR(4, 10, 2, False, "DARTS_V2", in_channels=1)(torch.randn(1, 1, 4, 4))[0].shape == (1, 10)
