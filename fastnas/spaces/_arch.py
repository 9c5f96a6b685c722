"""Architecture parameters and weighting modes shared by the search spaces' ``Network`` classes."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCH_MODES = ("logits", "simplex")
SAMPLERS = (None, "gdas", "uniform")
EVAL_ARCHS = ("argmax", "sample")


class EdgeWeights(NamedTuple):
    """What a forward uses of one architecture parameter ``[E, K]``.

    * ``weights``: the op weights ``[E, K]`` the cells multiply the op outputs with;
    * ``selected``: None when every op is computed (the weights then carry the sample: 0 and no
      gradient on the ops not sampled), else per edge the op indices to compute, read on the host;
    * ``unselected``: GDAS only, the hard weights of the ops not sampled (0 in the forward), which
      NAS-Bench-201's cells add as scalars (xautodl's ``forward_gdas``);
    * ``picked``: with ``selected``, the weight of each edge's selected op ``[E]`` (one gather for
      every cell, instead of one entry at a time).
    """

    weights: Tensor
    selected: list[list[int]] | None
    unselected: Tensor | None
    picked: Tensor | None


class ArchMixin:
    """Weighting modes of a supernet's architecture parameters.

    * ``arch="logits"``: parameters are logits (init ``1e-3 * randn``), weights are their softmax
      per edge (DARTS);
    * ``arch="simplex"``: parameters are the weights, each row on the probability simplex (init
      uniform plus a tiny noise, renormalised), used as given (GAEA);
    * ``sampler="gdas"``: one hard Gumbel-softmax sample per edge at temperature ``self.tau``
      (logits, or ``log(theta)`` on the simplex), straight-through gradient (GDAS);
    * ``sampler="uniform"``: one uniformly random op per edge, weight 1, no architecture gradient
      (random-sampling weight sharing).

    With a sampler, the eager forward computes only the sampled op of each edge (its index is read
    on the host, once per forward). ``compute_all_ops = True``, and every traced forward
    (``torch.compile``), compute every op instead and weigh the ops not sampled with 0 and no
    gradient: the same outputs and gradients, with a graph that does not depend on the sample (no
    recompilation, no host read); the parameters of ops not sampled then get zero gradients instead
    of none, and their BatchNorms' running statistics are updated with their batch statistics.

    In evaluation mode (``.eval()``) a sampler uses the argmax architecture: the op of largest
    weight on each edge (GDAS: the noise-free hard sample, straight-through at ``tau``; uniform:
    weight 1), which is what GDAS and random-sampling weight sharing evaluate; set
    ``eval_arch = "sample"`` to keep sampling in evaluation mode.

    Random numbers come from ``self.generator`` (None: torch's default generator), so that ranks
    seeded alike sample alike. :meth:`sample_architecture` draws a sample ahead of the forward (a
    traced forward cannot draw from a ``torch.Generator``: pass it as ``net(x, sample)``).
    """

    _arch_names: list[str]

    def _init_arch_modes(self, arch: str, sampler: str | None) -> None:
        if arch not in ARCH_MODES:
            raise ValueError(f"arch must be one of {ARCH_MODES}, got {arch!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.arch = arch
        self.sampler = sampler
        self.generator: torch.Generator | None = None
        self.compute_all_ops = False
        self.eval_arch = "argmax"
        # a buffer, not a float: a traced forward reads it as an input (no recompilation per value)
        self.register_buffer("_tau", torch.tensor(10.0), persistent=False)

    @property
    def tau(self) -> float:
        """The Gumbel-softmax temperature of ``sampler="gdas"``."""
        return float(self._tau)

    @tau.setter
    def tau(self, value: float) -> None:
        with torch.no_grad():
            self._tau.fill_(float(value))

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

    def sample_architecture(self) -> dict[str, Tensor]:
        """One draw of the sampler from ``self.generator``, per architecture parameter of op weights:
        the Gumbel noise ``[E, K]`` (GDAS) or the op index ``[E]`` (uniform); ``{}`` without a
        sampler. ``net(x, sample)`` uses it; ``net(x)`` draws one itself (eagerly)."""
        if self.sampler is None:
            return {}
        return {name: self._draw(getattr(self, name)) for name in self._op_weight_names()}

    def _op_weight_names(self) -> list[str]:
        return [name for name in self._arch_names if getattr(self, name).dim() == 2]

    def _draw(self, p: Tensor) -> Tensor:
        gen = self.generator
        noise_device = gen.device if gen is not None else p.device
        if self.sampler == "uniform":
            return torch.randint(p.shape[-1], (p.shape[0],), generator=gen, device=noise_device).to(p.device)
        u = torch.empty(p.shape, dtype=p.dtype, device=noise_device).exponential_(generator=gen)
        # -log(u) is infinite only for u == 0 (probability ~2^-64): clamped rather than redrawn, so
        # that no value is read on the host
        return u.to(p.device).clamp_min(torch.finfo(p.dtype).tiny).log().neg()

    def _edge_weights_of(
        self, name: str, sample: dict[str, Tensor] | None, edge_scale: Tensor | None = None
    ) -> EdgeWeights:
        """The weights a forward uses of the architecture parameter ``name`` (see :class:`EdgeWeights`);
        ``picked`` times ``edge_scale`` if given (PC-DARTS's edge weights; the cells multiply the
        other weights by them)."""
        p = getattr(self, name)
        if self.sampler is None:
            return EdgeWeights(self._normalised(p), None, None, None)
        use_argmax = not self.training and self.eval_arch == "argmax"
        if use_argmax:
            noise = None
        elif sample is not None and name in sample:
            noise = sample[name]
        elif torch.compiler.is_compiling() and self.generator is not None:
            raise RuntimeError(
                "a traced forward cannot draw from net.generator: pass net(x, net.sample_architecture())"
            )
        else:
            noise = self._draw(p)
        if self.sampler == "uniform":
            index = p.argmax(dim=-1) if noise is None else noise
            hard = F.one_hot(index, p.shape[-1]).to(p.dtype)
            unselected = None
        else:
            log_p = F.log_softmax(p if self.arch == "logits" else p.clamp_min(1e-30).log(), dim=-1)
            probs = F.softmax((log_p if noise is None else log_p + noise) / self._tau.to(p.dtype), dim=-1)
            index = probs.argmax(dim=-1)
            one_hot = F.one_hot(index, p.shape[-1]).to(p.dtype)
            hard = one_hot - probs.detach() + probs  # straight-through: 1 forward, the soft gradient backward
            unselected = hard * (1 - one_hot)
        if self.compute_all_ops or torch.compiler.is_compiling():
            weights = hard if self.sampler == "uniform" else torch.where(one_hot.bool(), hard, hard.detach())
            return EdgeWeights(weights, None, unselected, None)
        weights = torch.ones_like(p) if self.sampler == "uniform" else hard
        picked = weights.gather(1, index[:, None]).squeeze(1)
        if edge_scale is not None:
            picked = picked * edge_scale
        return EdgeWeights(weights, [[k] for k in index.tolist()], unselected, picked)

    # ------------------------------------------------------------------ compilation

    def compile_cells(self, **options) -> None:
        """Regional compilation: compile each search cell with ``torch.compile`` (``fullgraph=True``,
        ``dynamic=False`` unless ``options`` say otherwise), cells of the same kind and shapes sharing
        one compiled graph; the stem, the classifier and the sampling stay eager (the samples keep
        coming from ``self.generator``). Sets ``compute_all_ops = True``: under a sampler every op is
        computed, weighted 0 when not sampled, so the graph does not depend on the sample (no
        recompilation, no host read). Call again after ``.to()`` / ``.double()``."""
        options = {"fullgraph": True, "dynamic": False, **options}
        self.compute_all_ops = True
        for cell in self._search_cells():
            cell.compile_nodes(**options)
        limit = torch._dynamo.config.recompile_limit  # one compiled graph per kind and shape of cell
        torch._dynamo.config.recompile_limit = max(limit, len(self._search_cells()))

    # ------------------------------------------------------------------ parameter groups

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (see the space's ``Network`` docstring for their shapes)."""
        return [getattr(self, name) for name in self._arch_names]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter, in ``parameters()`` order."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]


def pick_weights(W: Tensor, pairs: Sequence[tuple[int, int]], picked: Tensor | None = None) -> Tensor:
    """``W[e, k]`` for each ``(e, k)`` of ``pairs``, as one 1-D tensor in that order: a slice (no
    index tensor) when the pairs are every column of a range of columns on a range of rows, row by
    row, else a stack of the entries. ``picked``: ``W[e, k_e]`` per edge (one op per edge, see
    :class:`EdgeWeights`), sliced the same way."""
    return _gather(W, pairs) if picked is None else _gather_picked(picked, pairs)


def _gather_picked(picked: Tensor, pairs: Sequence[tuple[int, int]]) -> Tensor:
    edges = [e for e, _ in pairs]
    if edges == list(range(edges[0], edges[-1] + 1)):
        return picked[edges[0] : edges[-1] + 1]
    return torch.stack([picked[e] for e in edges])


def _gather(W: Tensor, pairs: Sequence[tuple[int, int]]) -> Tensor:
    e0, k0 = pairs[0]
    e1, k1 = pairs[-1]
    block = [(e, k) for e in range(e0, e1 + 1) for k in range(k0, k1 + 1)]
    if list(pairs) == block:
        return W[e0 : e1 + 1, k0 : k1 + 1].reshape(-1)
    return torch.stack([W[e, k] for e, k in pairs])
