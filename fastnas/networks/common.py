"""What the evaluation networks share: checking their input, counting their parameters and multiply-adds."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_input", "count_parameters", "count_macs"]


class TrainedNetworks:
    """What ``fastnas train`` needs of the networks of one search space's architectures (one instance
    per space, found by :func:`fastnas.networks.for_space`).

    Attributes:
        space: the name of the search space (``--space``).
        drop_path: whether the networks have drop path and an auxiliary head.
        imagenet: whether there is a network for full-size ImageNet.
        unused_parameters: whether a training step leaves parameters without a gradient (DDP must
            then look for them).
    """

    space: str
    drop_path: bool = False
    imagenet: bool = False
    unused_parameters: bool = False

    def build(
        self,
        arch: str,
        *,
        channels: int,
        cells: int,
        num_classes: int,
        in_channels: int,
        auxiliary: bool,
        imagenet: bool = False,
    ) -> nn.Module:
        """The network of ``arch`` (the full-size ImageNet one with ``imagenet``)."""
        raise NotImplementedError

    def outputs(self, out: Any) -> tuple[Tensor, Tensor | None]:
        """``(logits, auxiliary logits or None)`` of a network's output."""
        raise NotImplementedError


def check_input(x: Tensor, in_channels: int, multiple: int) -> None:
    """Raise ValueError naming ``input`` unless ``x`` is ``[B, in_channels, H, W]`` with ``H`` and ``W``
    divisible by ``multiple`` (what the network's reductions need to keep their branches aligned)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"input must be [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"input: H and W must be divisible by {multiple} (the reductions), got {tuple(x.shape)}")


def count_parameters(model: nn.Module, *, exclude_auxiliary: bool = True) -> int:
    """Number of parameter elements of ``model`` (each shared parameter once).

    With ``exclude_auxiliary`` (the default) parameters whose name contains ``"auxiliary"`` are left
    out, as DARTS's ``count_parameters_in_MB`` reports its networks (the auxiliary head only serves
    training). Networks without an auxiliary head count the same either way.
    """
    return sum(p.numel() for name, p in model.named_parameters() if not (exclude_auxiliary and "auxiliary" in name))


def count_macs(model: nn.Module, input_size: Sequence[int], *, batchnorm: bool = False) -> int:
    """Multiply-adds of one forward pass of ``model`` on one image of ``input_size = (C, H, W)``.

    Counted by forward hooks, in evaluation mode (no auxiliary head, no drop path), as NAS-Bench-201's
    counter (xautodl's ``get_model_infos``) counts the "FLOPs" it publishes and DARTS-family papers
    report theirs:

    * ``nn.Conv2d``: ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w``, plus ``H_out * W_out * C_out``
      with a bias;
    * ``nn.Linear``: ``in_features * out_features``, plus ``out_features`` with a bias;
    * ``nn.BatchNorm2d`` only when ``batchnorm`` is True: one multiply-add per output element (the
      evaluation-mode normalisation is ``x * scale + shift``).

    Not counted: ReLU, pooling, additions, concatenation, drop path. Every call of a module counts
    (a module used twice counts twice); modules not run (``none`` ops, the auxiliary head) count
    nothing. The model's training flags are restored afterwards. Pass the plain module, not a
    ``torch.compile``d or DDP-wrapped one whose submodules may not run as modules.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {tuple(input_size)}")
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, output: Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += output.numel() * (m.in_channels // m.groups) * kh * kw
        total += output.numel() if m.bias is not None else 0

    def linear_hook(m: nn.Linear, inputs, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * m.in_features + (output.numel() if m.bias is not None else 0)

    def bn_hook(m: nn.BatchNorm2d, inputs, output: Tensor) -> None:
        nonlocal total
        total += output.numel()

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif batchnorm and isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(bn_hook))
    modes = {m: m.training for m in model.modules()}
    reference = next(model.parameters(), None)
    x = torch.zeros((1, *size), dtype=reference.dtype if reference is not None else torch.float32)
    if reference is not None:
        x = x.to(reference.device)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total
