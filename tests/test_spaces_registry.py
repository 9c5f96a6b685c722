"""fastnas.spaces.get_space: what the commands ask of a space, for every registered space."""

from __future__ import annotations

import pytest
import torch

from fastnas import spaces
from fastnas.networks import for_space


def test_registry_names_and_lookup():
    assert spaces.space_names() == ("nb201", "darts")
    assert spaces.get_space("darts") is spaces.darts.SPACE
    with pytest.raises(ValueError, match="space must be one of nb201, darts"):
        spaces.get_space("nasbench101")
    assert spaces.space_of(spaces.darts.SPACE.example_arch).name == "darts"
    assert spaces.space_of("|none~0|+|none~0|none~1|").name == "nb201"
    assert spaces.space_of("neither").name == "nb201"  # the default space, whose parser says what is wrong


@pytest.mark.parametrize("name", spaces.space_names())
def test_random_architectures_are_one_hot_and_export_round_trips(name):
    """Random architectures: one-hot rows shaped like the architecture parameters; candidates are
    distinct, and their one-hot weights restrict the supernet to the architecture they name."""
    space = spaces.get_space(name)
    net = space.build_supernet(channels=4, cells=3, num_classes=5, in_channels=3, arch="simplex", sampler=None)
    gen = torch.Generator().manual_seed(0)
    for weights in space.random_architectures(net, 3, gen):
        for w, p in zip(weights, net.arch_parameters()):
            assert w.shape == p.shape and torch.equal(w.sum(-1), torch.ones(p.shape[0]))
    found = space.candidates(net, 4, gen)
    assert len({arch for arch, _ in found}) == 4
    for arch, weights in found:
        for w, o in zip(weights, space.one_hot(net, arch)):
            torch.testing.assert_close(w.float(), o)
        with torch.no_grad():
            for p, w in zip(net.arch_parameters(), space.one_hot(net, arch)):
                p.copy_(w)
        assert net.export() == arch
        space.parse(arch)  # reads back
    assert len(net.edge_labels()) == net.arch_parameters()[0].shape[0]
    assert space.op_names[0] == "none"
    networks = for_space(name)
    trained = networks.build(found[0][0], channels=4, cells=3, num_classes=5, in_channels=3, auxiliary=False)
    trained.eval()
    logits, aux = networks.outputs(trained(torch.randn(2, 3, 8, 8)))
    assert logits.shape == (2, 5) and aux is None


def test_nb201_candidates_from_a_pool():
    space = spaces.get_space("nb201")
    net = space.build_supernet(channels=4, cells=1, num_classes=5, in_channels=3, arch="simplex", sampler=None)
    pool = ["|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|",
            "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"]  # fmt: skip
    found = space.candidates(net, 2, torch.Generator().manual_seed(0), pool)
    assert sorted(arch for arch, _ in found) == sorted(pool)
    with pytest.raises(ValueError, match="partial_channels"):
        space.build_supernet(channels=4, cells=1, num_classes=5, in_channels=3, arch="simplex", sampler=None,
                             partial_channels=4)  # fmt: skip
