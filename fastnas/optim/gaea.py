"""GAEA: exponentiated-gradient (mirror descent) updates for architecture weights on the simplex.

GAEA (Li et al., "Geometry-Aware Gradient Algorithms for Neural Architecture Search", ICLR 2021)
replaces DARTS' softmax logits and Adam by weights that *are* probabilities and are updated by
exponentiated gradient, the mirror-descent step for the entropy geometry::

    theta <- theta * exp(-lr * grad)              (element-wise)
    theta <- max(theta, floor)                    (floor = 1e-5, as in GAEA's reference code)
    theta <- theta / sum_of_its_simplex(theta)    (each row, or each segment of a row)

The optimizer works on any number of parameters at once with ``torch._foreach_*`` kernels (one
kernel over all parameters per element-wise stage); only the row/segment sums and the overflow
guard are one reduction per parameter, never a Python loop over rows.

Entropic regulariser. With ``entropy_weight = lam > 0`` the step minimises
``loss + lam * sum(theta * log theta)`` (GAEA's ``arch_weight_decay``; the ``log K`` of its
``theta * log(K * theta)`` is constant on the simplex): its gradient ``lam * (log theta + 1)`` is
added to ``grad``, so the update is ``theta <- theta ** (1 - lr*lam) * exp(-lr * (grad + lam))``,
which pulls the rows towards uniform (a positive weight raises the entropy). ``lr * lam`` must be
below 1.

Numerics. The update is computed in log space, ``exp(log theta - lr * grad)``, which equals the
formula above. When some value of a row would exceed ``exp(44)`` (float32) before normalisation,
i.e. where the plain formula risks inf/inf = NaN under huge or adversarial gradients, that row is
first divided by a common factor (which normalisation cancels) so that its largest value is
``exp(44)``; the floor then acts on the scaled row. Rows stay finite and on the simplex whatever
finite (or infinite) gradients arrive; NaN gradients propagate, as in every torch optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GAEA", "simplex_normalize"]


def _check_segments(segments: object, where: str) -> tuple[int, ...] | None:
    if segments is None:
        return None
    try:
        seg = tuple(int(s) for s in segments)  # type: ignore[union-attr]
    except TypeError as e:
        raise TypeError(f"{where} must be None or a sequence of positive ints, got {segments!r}") from e
    if len(seg) == 0 or any(s <= 0 for s in seg):
        raise ValueError(f"{where} must hold positive segment lengths, got {segments!r}")
    return seg


_SEGMENT_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _segment_index(segments: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 vector mapping each position of the last dimension to its segment number."""
    key = (segments, device)
    idx = _SEGMENT_INDEX_CACHE.get(key)
    if idx is None:
        idx = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments)).to(device)
        _SEGMENT_INDEX_CACHE[key] = idx
    return idx


def _simplex_sums(x: Tensor, segments: tuple[int, ...] | None) -> Tensor:
    """Sum of each simplex of ``x``, broadcast back to ``x``'s shape (rows: keepdim)."""
    if segments is None:
        return x.sum(-1, keepdim=True)
    idx = _segment_index(segments, x.device)
    sums = x.new_zeros((*x.shape[:-1], len(segments))).index_add_(-1, idx, x)
    return sums.index_select(-1, idx)


def simplex_normalize(x: Tensor, floor: float = 1e-5, segments: Sequence[int] | None = None) -> Tensor:
    """``max(x, floor)`` divided by the sum of each simplex: each row (last dimension) or, with
    ``segments`` (lengths summing to ``x.shape[-1]``), each segment of each row. Returns a new tensor.

    Use it to put initial weights on the simplex; it is the normalisation :class:`GAEA` applies.
    """
    seg = _check_segments(segments, "segments")
    if seg is not None and sum(seg) != x.shape[-1]:
        raise ValueError(f"segments {seg} sum to {sum(seg)} but x's last dimension is {x.shape[-1]}")
    x = x.clamp_min(floor)
    return x / _simplex_sums(x, seg)


class GAEA(Optimizer):
    """Exponentiated-gradient optimizer for parameters whose rows (last dimension) are
    probability vectors, or whose rows are split into ``segments`` that each are one.

    Args:
        params: tensors or param-group dicts. A group may set ``lr``, ``floor``,
            ``entropy_weight`` and ``segments`` (a tuple of lengths along the last dimension,
            each one simplex, e.g. ``(2, 3, 4, 5)`` for PC-DARTS edge weights normalised per node;
            ``None``: each row is one simplex).
        lr: step size of ``theta * exp(-lr * grad)`` (GAEA: 0.1).
        floor: values are clamped to at least this before normalising (GAEA: 1e-5).
        entropy_weight: weight ``lam`` of the entropic regulariser ``lam * sum(theta log theta)``
            (see the module docstring; 0 disables it).
        segments: default ``segments`` for groups that do not set one.

    Parameters must be floating point (float32 or float64 recommended), non-negative and of at
    least one dimension; they should start on the simplex (see :func:`simplex_normalize`); every
    step leaves them there. ``state_dict``/``load_state_dict`` round-trip (the per-parameter state
    is the step count).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        floor: float = 1e-5,
        entropy_weight: float = 0.0,
        segments: Sequence[int] | None = None,
    ) -> None:
        _check_hyper(lr, floor, entropy_weight, "")
        seg = _check_segments(segments, "segments")
        defaults = dict(lr=lr, floor=floor, entropy_weight=entropy_weight, segments=seg)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["floor"], group["entropy_weight"], "param group ")
        group["segments"] = _check_segments(group["segments"], "param group 'segments'")
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"GAEA parameters must be floating point, got dtype {p.dtype}")
            if p.dim() < 1:
                raise ValueError("GAEA parameters must have at least one dimension (the simplex)")
            if group["segments"] is not None and sum(group["segments"]) != p.shape[-1]:
                raise ValueError(
                    f"param group 'segments' {group['segments']} sum to {sum(group['segments'])} "
                    f"but a parameter of shape {tuple(p.shape)} has last dimension {p.shape[-1]}"
                )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One exponentiated-gradient step for every parameter that has a ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, floor, lam, segments = group["lr"], group["floor"], group["entropy_weight"], group["segments"]
            _check_hyper(lr, floor, lam, "param group ")
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("GAEA does not support sparse gradients")
            for p in params:
                st = self.state[p]
                if st.get("step", 0) == 0:
                    _check_on_simplex(p, segments, self._describe(group, p))
                st["step"] = st.get("step", 0) + 1
            # exponent z = (1 - lr*lam) * log(theta) - lr * (grad + lam), all parameters at once
            z = torch._foreach_log(params)
            if lam != 0.0:
                torch._foreach_mul_(z, 1.0 - lr * lam)
                torch._foreach_add_(z, -lr * lam)
            torch._foreach_add_(z, grads, alpha=-lr)
            # overflow guard: +inf exponents (infinite gradients) are capped first so that no
            # inf - inf arises, then a row whose largest exponent exceeds `limit` is shifted down to it
            torch._foreach_clamp_max_(z, [torch.finfo(t.dtype).max / 4 for t in z])
            shifts = [(t.amax(-1, keepdim=True) - 0.5 * math.log(torch.finfo(t.dtype).max)).clamp_min_(0.0) for t in z]
            torch._foreach_sub_(z, shifts)
            torch._foreach_exp_(z)
            torch._foreach_clamp_min_(z, floor)
            torch._foreach_div_(z, [_simplex_sums(t, segments) for t in z])
            torch._foreach_copy_(params, z)
        return loss

    def _describe(self, group: dict[str, Any], p: Tensor) -> str:
        """How an error names a parameter: its name when the group has ``param_names``, else its place."""
        g = next(g for g, other in enumerate(self.param_groups) if other is group)
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        where = repr(names[i]) if names else f"param_groups[{g}]['params'][{i}]"
        return f"GAEA parameter {where} (shape {tuple(p.shape)})"


# how far from 1 a simplex sum may be before GAEA refuses it: rounding of a float32/bf16 normalisation
_SIMPLEX_SUM_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


def _check_on_simplex(p: Tensor, segments: tuple[int, ...] | None, name: str) -> None:
    """Raise unless every row (or segment) of ``p`` is a probability vector. Run once per parameter,
    on its first step (one reduction and one host read): a parameter off the simplex would turn into
    NaN (negative entries) or be renormalised across the wrong entries without a word."""
    x = p.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries: GAEA's parameters must lie on the probability simplex")
    if bool((x < 0).any()):
        raise ValueError(
            f"{name} has negative entries (min {x.min().item():.4g}): GAEA's parameters are probabilities, not "
            "logits. Build the network with arch='simplex' (fastnas.spaces), or put the values on the simplex "
            "with fastnas.optim.simplex_normalize before the first step."
        )
    sums = _simplex_sums(x.double(), segments)
    worst = (sums - 1.0).abs().max().item() if sums.numel() else 0.0
    if worst > _SIMPLEX_SUM_TOLERANCE.get(p.dtype, 1e-2):
        layout = "each row" if segments is None else f"each of the segments {segments} of a row"
        hint = (
            " A parameter that holds several simplices per row (PC-DARTS's edge weights, one simplex per node) "
            "needs its segments: GAEA([{'params': [p], 'segments': net.arch_simplex_segments(p)}, ...]) with "
            "one param group per segment layout."
            if segments is None
            else ""
        )
        raise ValueError(
            f"{name}: {layout} must sum to 1, but a sum is off by {worst:.3g}. Put it on the simplex with "
            f"fastnas.optim.simplex_normalize(p, segments=...) before the first step.{hint}"
        )


def _check_hyper(lr: float, floor: float, lam: float, where: str) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(floor, (int, float)) and 0.0 < floor < 1.0):
        raise ValueError(f"{where}floor must be in (0, 1), got {floor!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"{where}entropy_weight must be a finite number >= 0, got {lam!r}")
    if lr * lam >= 1.0:
        raise ValueError(f"{where}lr * entropy_weight must be below 1, got {lr} * {lam}")
