"""Architecture parameters and weighting modes shared by the search spaces' ``Network`` classes."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCH_MODES = ("logits", "simplex")
SAMPLERS = (None, "gdas", "uniform")


class ArchMixin:
    """Weighting modes of a supernet's architecture parameters.

    * ``arch="logits"``: parameters are logits (init ``1e-3 * randn``), weights are their softmax
      per edge (DARTS);
    * ``arch="simplex"``: parameters are the weights, each row on the probability simplex (init
      uniform plus a tiny noise, renormalised), used as given (GAEA);
    * ``sampler="gdas"``: one hard Gumbel-softmax sample per edge at temperature ``self.tau``
      (logits, or ``log(theta)`` on the simplex), straight-through gradient, only the sampled op
      computed (GDAS);
    * ``sampler="uniform"``: one uniformly random op per edge, weight 1, no architecture gradient
      (random-sampling weight sharing).

    Random numbers come from ``self.generator`` (None: torch's default generator), so that ranks
    seeded alike sample alike.
    """

    _arch_names: list[str]

    def _init_arch_modes(self, arch: str, sampler: str | None) -> None:
        if arch not in ARCH_MODES:
            raise ValueError(f"arch must be one of {ARCH_MODES}, got {arch!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.arch = arch
        self.sampler = sampler
        self.tau: float = 10.0
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ init and normalisation

    def _init_rows(self, rows: int, cols: int) -> Tensor:
        if self.arch == "logits":
            return 1e-3 * torch.randn(rows, cols)
        theta = torch.full((rows, cols), 1.0 / cols) + 1e-4 * torch.rand(rows, cols)
        return theta / theta.sum(-1, keepdim=True)

    def _init_segments(self, segments: Sequence[int]) -> Tensor:
        if self.arch == "logits":
            return 1e-3 * torch.randn(sum(segments))
        parts = []
        for n in segments:
            theta = torch.full((n,), 1.0 / n) + 1e-4 * torch.rand(n)
            parts.append(theta / theta.sum())
        return torch.cat(parts)

    def _normalised(self, p: Tensor) -> Tensor:
        """Op weights per edge (rows): softmax of logits, or the simplex weights as given."""
        return F.softmax(p, dim=-1) if self.arch == "logits" else p

    def _normalise_segments(self, p: Tensor, segments: Sequence[int]) -> Tensor:
        if self.arch == "simplex":
            return p
        return torch.cat([F.softmax(s, dim=-1) for s in p.split(list(segments))])

    # ------------------------------------------------------------------ sampling

    def _op_weights(self, p: Tensor) -> tuple[Tensor, list[list[int]] | None]:
        """``(weights [E, K], selected)``: the weights the cells use and, for the samplers, the op
        index to compute on each edge (``selected[e] == [k]``)."""
        if self.sampler is None:
            return self._normalised(p), None
        gen = self.generator
        noise_device = gen.device if gen is not None else p.device
        if self.sampler == "uniform":
            index = torch.randint(p.shape[-1], (p.shape[0],), generator=gen, device=noise_device)
            return torch.ones(p.shape, dtype=p.dtype, device=p.device), [[int(k)] for k in index.tolist()]
        log_p = F.log_softmax(p if self.arch == "logits" else p.clamp_min(1e-30).log(), dim=-1)
        while True:
            u = torch.empty(p.shape, dtype=p.dtype, device=noise_device).exponential_(generator=gen)
            gumbels = -u.log().to(p.device)
            probs = F.softmax((log_p + gumbels) / self.tau, dim=-1)
            if torch.isfinite(gumbels).all() and torch.isfinite(probs).all():
                break
        index = probs.argmax(dim=-1)
        one_hot = torch.zeros_like(probs).scatter_(-1, index[:, None], 1.0)
        hard = one_hot - probs.detach() + probs
        return hard, [[int(k)] for k in index.tolist()]

    # ------------------------------------------------------------------ parameter groups

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (see the space's ``Network`` docstring for their shapes)."""
        return [getattr(self, name) for name in self._arch_names]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter, in ``parameters()`` order."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]
