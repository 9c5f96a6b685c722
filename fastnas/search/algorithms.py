"""The search algorithms: how each one parametrises the architecture and which optimizer moves it.

| name          | arch weights          | sampler      | partial ch. | arch optimizer (defaults)              |
|---------------|-----------------------|--------------|-------------|----------------------------------------|
| darts         | softmax of logits     | all ops      | -           | Adam 3e-4, betas (0.5, 0.999), wd 1e-3 |
| darts-2nd     | softmax of logits     | all ops      | -           | as darts, second-order (unrolled)      |
| gaea-darts    | simplex               | all ops      | -           | GAEA 0.1                               |
| pc-darts      | softmax (ops + edges) | all ops      | 4 (DARTS)   | Adam 6e-4, betas (0.5, 0.999), wd 1e-3 |
| gaea-pc-darts | simplex (ops + edges) | all ops      | 4 (DARTS)   | GAEA 0.1, edges normalised per node    |
| gdas          | softmax of logits     | Gumbel, hard | -           | Adam 3e-4, betas (0.5, 0.999), wd 1e-3 |
| gaea-gdas     | simplex               | Gumbel, hard | -           | GAEA 0.1                               |
| rs-ws         | (none learnt)         | uniform      | -           | none: random search, shared weights    |

GDAS' Gumbel temperature decays linearly from 10 to 0.1 over the epochs
(``tau = 10 - 9.9 * epoch / (epochs - 1)``, as in xautodl). Every algorithm runs in ``erm`` form
(architecture and weights stepped together on the training data, one forward/backward) or
``bilevel`` form (architecture steps on a held-out half, first order unless ``darts-2nd``). The
network weights use SGD 0.025 with momentum 0.9, weight decay 3e-4, cosine decay to 0.001 and
gradient-norm clipping at 5 (DARTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastnas.optim import GAEA


@dataclass(frozen=True)
class Algorithm:
    """One row of the table in the module docstring."""

    name: str
    arch: str  # "logits" (softmax) or "simplex" (GAEA)
    sampler: str | None  # None, "gdas" or "uniform"
    arch_optimizer: str | None  # "adam", "gaea" or None (nothing learnt)
    arch_lr: float
    partial_channels: int = 1
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3  # Adam only
    entropy_weight: float = 0.0  # GAEA only
    gumbel_tau: tuple[float, float] | None = None  # (start, end) of the linear schedule
    second_order: bool = False
    spaces: tuple[str, ...] = ("nb201", "darts")
    summary: str = ""


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("darts", "logits", None, "adam", 3e-4, summary="DARTS, first order"),
        Algorithm("darts-2nd", "logits", None, "adam", 3e-4, second_order=True, summary="DARTS, second order"),
        Algorithm("gaea-darts", "simplex", None, "gaea", 0.1, summary="GAEA on DARTS"),
        Algorithm("pc-darts", "logits", None, "adam", 6e-4, partial_channels=4, spaces=("darts",), summary="PC-DARTS"),
        Algorithm(
            "gaea-pc-darts",
            "simplex",
            None,
            "gaea",
            0.1,
            partial_channels=4,
            spaces=("darts",),
            summary="GAEA PC-DARTS",
        ),
        Algorithm("gdas", "logits", "gdas", "adam", 3e-4, gumbel_tau=(10.0, 0.1), summary="GDAS"),
        Algorithm("gaea-gdas", "simplex", "gdas", "gaea", 0.1, gumbel_tau=(10.0, 0.1), summary="GAEA GDAS"),
        Algorithm("rs-ws", "simplex", "uniform", None, 0.0, summary="random search with weight sharing"),
    )
}

MODES = ("erm", "bilevel")


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called ``name``; ValueError naming the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None


def gumbel_tau(algorithm: Algorithm, epoch: int, epochs: int) -> float | None:
    """GDAS temperature for 0-based ``epoch`` of ``epochs``: linear from start to end."""
    if algorithm.gumbel_tau is None:
        return None
    start, end = algorithm.gumbel_tau
    return start - (start - end) * epoch / max(epochs - 1, 1)


def make_arch_optimizer(
    algorithm: Algorithm,
    net: nn.Module,
    lr: float | None = None,
    weight_decay: float | None = None,
    entropy_weight: float | None = None,
) -> torch.optim.Optimizer | None:
    """The architecture optimizer of ``algorithm`` over ``net.arch_parameters()`` (None for rs-ws).

    GAEA gets one param group per simplex layout, from ``net.arch_simplex_segments(p)``: rows for
    op weights, per-node segments for PC-DARTS edge weights. ``None`` arguments take the defaults.
    """
    params = list(net.arch_parameters())
    lr = algorithm.arch_lr if lr is None else lr
    if algorithm.arch_optimizer is None:
        return None
    if algorithm.arch_optimizer == "adam":
        wd = algorithm.arch_weight_decay if weight_decay is None else weight_decay
        return torch.optim.Adam(params, lr=lr, betas=algorithm.arch_betas, weight_decay=wd)
    groups: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(net.arch_simplex_segments(p), []).append(p)
    lam = algorithm.entropy_weight if entropy_weight is None else entropy_weight
    return GAEA([{"params": ps, "segments": seg} for seg, ps in groups.items()], lr=lr, entropy_weight=lam)
