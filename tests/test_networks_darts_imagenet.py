"""fastnas.networks.NetworkImageNet against the manifest of DARTS's own NetworkImageNet, an eager oracle,
and (with ``FASTNAS_DARTS_SRC``) DARTS's code itself."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys

import pytest
import torch
from eager_networks import EagerNetworkImageNet
from network_helpers import assert_matches_manifest, assert_same_runs, load_manifest, randomize_state, run_net
from test_networks_darts import manifest_genotype

from fastnas.networks import AuxiliaryHeadImageNet, NetworkImageNet, count_macs, count_parameters
from fastnas.networks.darts import as_genotype

MANIFEST = load_manifest("darts_imagenet")
ALL_OPS = manifest_genotype(MANIFEST["networks"]["ALL_OPS_C8_L5_aux"])


@pytest.mark.parametrize("name", sorted(MANIFEST["networks"]))
def test_state_dict_and_counts_match_reference(name):
    """Keys, shapes and order of DARTS's NetworkImageNet (C=48, 14 layers, 1000 classes for the papers'
    genotypes), its parameters with and without the auxiliary head, its multiply-adds at 224x224."""
    entry = MANIFEST["networks"][name]
    net = NetworkImageNet(
        entry["C"], entry["num_classes"], entry["layers"], entry["auxiliary"], manifest_genotype(entry)
    )
    assert_matches_manifest(net, entry)
    assert count_parameters(net, exclude_auxiliary=False) == entry["parameters"]
    assert count_parameters(net) == entry["parameters_without_auxiliary"]
    assert count_macs(net, (3, 224, 224)) == entry["macs"]["3x224x224"]


def test_darts_v2_numbers():
    """DARTS's ImageNet figures for its second-order cell: 4.7M parameters (auxiliary head excluded),
    under 600M multiply-adds."""
    entry = MANIFEST["networks"]["DARTS_V2_C48_L14_aux"]
    assert entry["parameters_without_auxiliary"] == 4_718_752
    assert entry["macs"]["3x224x224"] == 529_912_552


def _pair(genotype, C=4, layers=5, num_classes=7):
    torch.manual_seed(0)
    fast = NetworkImageNet(C, num_classes, layers, True, genotype).double()
    eager = EagerNetworkImageNet(C, num_classes, layers, True, as_genotype(genotype)).double()
    randomize_state(fast)
    eager.load_state_dict(fast.state_dict())
    fast.load_state_dict(eager.state_dict())  # both ways
    return fast, eager


MODES = ("eval", "train", "drop-path")
CASES = [
    *(pytest.param(ALL_OPS, 32, mode, id=f"all-ops-32-{mode}") for mode in MODES),
    *(pytest.param("DARTS_V2", 32, mode, id=f"darts-v2-32-{mode}") for mode in MODES),
    *(pytest.param("PC_DARTS", 32, mode, id=f"pc-darts-32-{mode}") for mode in MODES),
    pytest.param("DARTS_V2", 224, "train", id="darts-v2-224-train"),
]


@pytest.mark.parametrize("genotype, size, mode", CASES)
def test_matches_eager_reference(genotype, size, mode):
    """Logits, auxiliary logits (DARTS's 5x5/2 pool on the 7x7 map at 224, adaptive elsewhere), input
    and parameter gradients, updated BatchNorm statistics: the eager oracle's in float64."""
    fast, eager = _pair(genotype)
    fast.drop_path_prob = eager.drop_path_prob = 0.3 if mode == "drop-path" else 0.0
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    fast_run, eager_run = (run_net(n, x, training=mode != "eval") for n in (fast, eager))
    assert len(fast_run[0]) == (1 if mode == "eval" else 2)
    assert_same_runs(fast_run, eager_run)


def _darts_model():
    folder = os.environ.get("FASTNAS_DARTS_SRC")
    if not folder:
        pytest.skip("FASTNAS_DARTS_SRC is not set (DARTS's cnn/ folder with .cuda() removed)")
    sys.path.insert(0, folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its Cell prints its channels
            return importlib.import_module("model")
    finally:
        sys.path.remove(folder)


@pytest.mark.parametrize("genotype", ["DARTS_V2", "PC_DARTS", "ALL_OPS"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_matches_darts_own_network(genotype, mode):
    """DARTS's own NetworkImageNet at 224x224 (its 7x7 pool needs that size): state_dicts load both
    ways, outputs and every gradient equal in float64 (drop path off: DARTS's draws its mask on CUDA)."""
    model = _darts_model()
    g = ALL_OPS if genotype == "ALL_OPS" else genotype
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = model.NetworkImageNet(4, 7, 5, True, as_genotype(g)).double()
    fast = NetworkImageNet(4, 7, 5, True, g).double()
    reference.drop_path_prob = 0.0
    randomize_state(reference)
    fast.load_state_dict(reference.state_dict())
    reference.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in reference.named_parameters()]
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    assert_same_runs(run_net(fast, x, mode == "train"), run_net(reference, x, mode == "train"))


def test_auxiliary_head_and_input_checks():
    net = NetworkImageNet(8, 10, 5, True, "DARTS_V2")
    head = net.auxiliary_head
    assert isinstance(head, AuxiliaryHeadImageNet)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.num_features == 768 for m in head.modules())
    for size in (224, 32):  # DARTS's pool on the 7x7 map at 224; adaptive 2x2 elsewhere
        logits, logits_aux = net.train()(torch.randn(2, 3, size, size))
        assert logits.shape == logits_aux.shape == (2, 10)
    assert net.eval()(torch.randn(2, 3, 64, 64))[1] is None
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"input must be \[B, 3, H, W\]"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="layers"):
        NetworkImageNet(8, 10, 0, True, "DARTS_V2")
    gray = NetworkImageNet(8, 10, 5, False, "DARTS_V2", in_channels=1).eval()
    assert gray.stem0[0].in_channels == 1 and gray(torch.randn(1, 1, 32, 32))[0].shape == (1, 10)
