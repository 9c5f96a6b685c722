"""Helpers of the evaluation networks' tests: the reference manifests and one seeded training step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from conftest import TOL, assert_close_dicts
from torch import Tensor, nn

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_manifest(name: str) -> dict:
    """A manifest of the reference networks (``darts`` or ``nb201``), generated once with the reference code."""
    return json.loads((FIXTURES / f"{name}_network_manifest.json").read_text())


def sha256_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def state_dict_lines(net: nn.Module) -> list[str]:
    """``'key [shape]'`` per state_dict entry, in order: the manifests' format."""
    return [f"{k} {list(v.shape)}" for k, v in net.state_dict().items()]


def assert_matches_manifest(net: nn.Module, entry: dict) -> None:
    """State_dict keys, shapes and order, and parameter names and order, equal the reference's."""
    if "state_dict" in entry:  # the full list: a failure shows the first difference
        assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == entry["state_dict"]
        assert [n for n, _ in net.named_parameters()] == entry["parameter_names"]
    assert len(net.state_dict()) == entry["state_dict_entries"]
    assert sha256_lines(state_dict_lines(net)) == entry["state_dict_sha256"]
    assert sha256_lines([n for n, _ in net.named_parameters()]) == entry["parameter_names_sha256"]


@torch.no_grad()
def randomize_state(net: nn.Module, seed: int = 1) -> None:
    """Random weights and BatchNorm statistics (affine weights and variances away from their init)."""
    g = torch.Generator().manual_seed(seed)
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
        else:
            v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype) * (0.3 if k.endswith("weight") else 0.1))


def run_net(net: nn.Module, x: Tensor, training: bool, seed: int = 5):
    """One forward and backward of a network returning a tuple of outputs (None ignored), torch's
    generator seeded with ``seed`` first (drop path): ``(outputs, dL/dx, {name: grad}, state_dict)``
    for a fixed cosine-weighted loss."""
    net.train(training)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    xi = x.clone().requires_grad_()
    outputs = [o for o in net(xi) if o is not None]
    loss = sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).sum() for o in outputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return [o.detach() for o in outputs], xi.grad, grads, state


def assert_same_runs(a, b) -> None:
    """Two :func:`run_net` results equal within the float64 tolerance: outputs, dL/dx, every parameter's
    gradient and the state_dict after the step (BatchNorm running statistics)."""
    (outputs_a, dx_a, grads_a, state_a), (outputs_b, dx_b, grads_b, state_b) = a, b
    assert len(outputs_a) == len(outputs_b)
    for p, q in zip(outputs_a, outputs_b):
        torch.testing.assert_close(p, q, **TOL)
    torch.testing.assert_close(dx_a, dx_b, **TOL)
    assert_close_dicts(grads_a, grads_b, **TOL)
    assert_close_dicts(state_a, state_b, **TOL)
