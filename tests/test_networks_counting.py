"""fastnas.networks.count_parameters and count_macs on small modules counted by hand."""

from __future__ import annotations

import pytest
from torch import nn

from fastnas.networks import count_macs, count_parameters


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),  # 10x10 out: 800 * 27 + 800 (bias)
        nn.BatchNorm2d(8),  # 800 when counted
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False),  # 5x5 out: 200 * 2 * 9
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),  # 40 + 5 (bias)
    )


def test_count_macs_by_hand():
    model = _model()
    assert count_macs(model, (3, 10, 10)) == 800 * 27 + 800 + 200 * 18 + 40 + 5
    assert count_macs(model, (3, 10, 10), batchnorm=True) == 800 * 27 + 800 + 800 + 200 * 18 + 40 + 5
    assert count_macs(model.double(), [3, 10, 10]) == 800 * 27 + 800 + 200 * 18 + 40 + 5  # the model's dtype


def test_count_macs_counts_every_call_and_restores_modes():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    twice = nn.Sequential(conv, conv)  # one module, two calls
    assert count_macs(twice, (2, 3, 3)) == 2 * 9 * 2 * 2
    model = _model().train()
    model[1].eval()
    count_macs(model, (3, 4, 4))
    assert model.training and not model[1].training and model[0].training
    assert not any(m._forward_hooks for m in model.modules())


def test_count_macs_rejects_bad_sizes():
    for bad in ((1, 3, 8, 8), (3, 8), (3, 0, 8)):
        with pytest.raises(ValueError, match="input_size"):
            count_macs(_model(), bad)


def test_count_parameters():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)  # 15
            self.auxiliary_head = nn.Linear(4, 2)  # 10
            self.shared = self.body  # counted once

    net = WithAux()
    assert count_parameters(net) == 15
    assert count_parameters(net, exclude_auxiliary=False) == 25
    assert count_parameters(_model()) == 3 * 8 * 9 + 8 + 16 + 8 * 2 * 9 + 8 * 5 + 5
