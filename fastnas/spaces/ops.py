"""Building blocks shared by the slim supernets of :mod:`fastnas.spaces.darts` and :mod:`fastnas.spaces.nb201`.

Two kinds of things live here:

* candidate-op modules whose parameters and state_dict keys are those of the reference code
  (``Zero``, ``Identity``) — the space-specific ones (``SepConv``, ``ReLUConvBN``, ...) live in
  their space's module because DARTS and NAS-Bench-201 name them differently;
* functional pieces the slim forward uses instead of calling those modules one by one:

  - :func:`batch_norm` — BatchNorm without affine parameters, over the channels of one candidate
    op or of several ops computed by one (grouped) convolution, that keeps only its *output* for
    the backward (the output is kept alive anyway by the mixed sum, which needs it for dL/dw), so
    the pre-normalisation tensor (the conv output) is freed as soon as the forward moves on; with
    ``parts > 1`` it returns one dense tensor per op, ready for a mixed sum without a copy;
  - :func:`shared_batch_norm` — one BatchNorm output for several modules that see the same input
    (a parameterless op on the same tensor on several edges), every module's statistics updated;
  - :func:`repeat_channels` — ``x`` repeated along the channels in its own memory layout, the input
    of a depthwise convolution that runs the ops of several edges at once;
  - :func:`pack_running_stats` — places the running statistics of a group of BatchNorms next to
    each other in memory, so that one BatchNorm kernel over the group's channels updates all of
    them; :class:`BatchNormGroup` keeps the views over them found (host time);
  - :func:`pack_parameters` / :func:`cat_parameters` — the same for a group of convolutions'
    weights, whose concatenation is then a view, not a kernel;
  - :func:`cached_plan` and :func:`structure_version` — the cells' cached plans (which module is
    what) and what they are keyed on;
  - :func:`run_tail` — applies a reference ``nn.Sequential`` from a given index on, with every
    ``affine=False`` BatchNorm replaced by :func:`batch_norm` and every depthwise convolution by
    :func:`fastnas.ops.depthwise_conv.depthwise_conv2d`.
  - :func:`avg_pool_3x3` — the spaces' average pooling, by :func:`fastnas.ops.avg_pool.avg_pool2d`.
  - :func:`max_pool_3x3` — their max pooling, by :func:`fastnas.ops.max_pool.max_pool2d`.

All of them compute the same mathematics as the modules they stand for, including the running
statistics updates of BatchNorm (momentum, cumulative average when ``momentum is None``,
``num_batches_tracked``). None of them reads a tensor on the host, except the cumulative average
(``momentum=None``), whose factor depends on the batch count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_mod

from fastnas import backend
from fastnas.ops._nhwc import plain_autograd, strictly_channels_last
from fastnas.ops.avg_pool import avg_pool2d
from fastnas.ops.batch_norm import lean_batch_norm
from fastnas.ops.depthwise_conv import depthwise_conv2d
from fastnas.ops.max_pool import max_pool2d


class Zero(nn.Module):
    """The ``none`` candidate: a zero tensor of the output's shape (``x[:, :, ::stride, ::stride] * 0``).

    The slim supernets never call it; it exists so that module lists and state_dicts look like the
    reference code's.
    """

    def __init__(self, stride: int, C_out: int | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.C_out = C_out

    def forward(self, x: Tensor) -> Tensor:
        y = x[:, :, :: self.stride, :: self.stride]
        if self.C_out is not None and self.C_out != x.shape[1]:
            shape = list(y.shape)
            shape[1] = self.C_out
            return x.new_zeros(shape)
        return y.mul(0.0)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class Identity(nn.Module):
    """``skip_connect`` at stride 1: returns its input itself (no copy)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def preferred_memory_format(x: Tensor) -> torch.memory_format:
    """The layout the supernets run ``x`` in: channels_last for float32/16-bit CPU tensors (oneDNN's
    convolutions and pooling are markedly faster in NHWC there), the usual contiguous NCHW otherwise
    (float64 has no oneDNN path: NHWC would be slower)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.channels_last
    return torch.contiguous_format


def to_preferred_layout(x: Tensor) -> Tensor:
    """``x`` in :func:`preferred_memory_format` (no copy when it is already). Applied to a network's
    input and again to its stem's output: a one-channel image batch is NCHW and channels_last at once,
    so a convolution of it returns NCHW, and without the second call the whole network would run in
    NCHW."""
    return x.contiguous(memory_format=preferred_memory_format(x))


def repeat_channels(x: Tensor, times: int) -> Tensor:
    """``x.repeat(1, times, 1, 1)`` (``[B, times * C, H, W]``, channel ``t * C + c`` = ``x[:, c]``) in
    ``x``'s own layout: one copy, whose backward is one sum."""
    if times == 1:
        return x
    B, C, H, W = x.shape
    if strictly_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1).unsqueeze(3).expand(B, H, W, times, C)
        return nhwc.reshape(B, H, W, times * C).permute(0, 3, 1, 2)
    return x.unsqueeze(1).expand(B, times, C, H, W).reshape(B, times * C, H, W)


# --------------------------------------------------------------------------- BatchNorm that keeps its output


def lean_bn_eligible(bn: nn.BatchNorm2d) -> bool:
    """True when ``bn`` normalises with batch statistics and has no affine parameters: then its
    output alone is enough for the backward (see :func:`batch_norm`)."""
    return not bn.affine and (bn.training or not bn.track_running_stats)


def _adjacent(tensors: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view over ``tensors`` when they lie next to each other, in order, in one storage
    (see :func:`pack_running_stats`); else None. Never while tracing (no storage pointers there)."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.view(-1)
    if torch.compiler.is_compiling() or not plain_autograd() or not first.is_contiguous():
        return None  # (torch.func's wrapped tensors have no storage to compare either)
    ptr, end = first.untyped_storage().data_ptr(), first.storage_offset() + first.numel()
    for t in tensors[1:]:
        if t.untyped_storage().data_ptr() != ptr or t.storage_offset() != end or not t.is_contiguous():
            return None
        end += t.numel()
    return first.as_strided((end - first.storage_offset(),), (1,), first.storage_offset())


@torch.no_grad()
def pack_running_stats(bns: Sequence[nn.BatchNorm2d]) -> None:
    """Move the running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) of
    ``bns`` into one storage each, in order, the modules' buffers becoming views of it: then a
    BatchNorm over the group's concatenated channels updates them all in the native kernel, and the
    batch counts with one ``add_``. Values, dtypes, devices and state_dict keys are unchanged; a
    later ``.to()`` or ``.double()`` gives separate buffers again (the supernets pack them again)."""
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffers = [getattr(bn, name) for bn in bns]
        if len(bns) < 2 or any(b is None for b in buffers) or _adjacent(buffers) is not None:
            continue
        for bn, copy in zip(bns, _side_by_side_copies(buffers)):
            setattr(bn, name, copy)


def _side_by_side_copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors``, each in its shape, lying side by side, in order, in one new storage."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return [chunk.view(t.shape) for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]))]


@torch.no_grad()
def pack_parameters(modules: Sequence[nn.Module], name: str = "weight") -> None:
    """Move the parameter ``name`` of ``modules`` (one dtype, device and shape but for the first
    dimension, contiguous) into one storage, in order: each Parameter keeps its identity (optimizers
    holding it are unaffected), its ``.data`` becoming a view of that storage. Then
    :func:`cat_parameters` of them is a view, not a copy: the same op of several edges, computed by
    one convolution, needs no concatenation of their weights per step. Values and state_dict keys are
    unchanged; a later ``.to()`` or ``.double()`` gives separate tensors again (the supernets pack
    them again); parameters that are not contiguous (``memory_format=torch.channels_last``) are left
    as they are."""
    params = [getattr(m, name) for m in modules]
    if len(params) < 2 or any(p is None for p in params):
        return
    first = params[0]
    if any(
        p.dtype != first.dtype or p.device != first.device or p.shape[1:] != first.shape[1:] or not p.is_contiguous()
        for p in params
    ):
        return
    if _adjacent(params) is not None:
        return
    for p, copy in zip(params, _side_by_side_copies(params)):
        p.data = copy


def cat_parameters(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat(tensors)`` (dimension 0): a view, and no kernel, when they were packed by
    :func:`pack_parameters` and still lie side by side (outside tracing and torch.func transforms,
    where it is the concatenation)."""
    if len(tensors) == 1:
        return tensors[0]
    if not torch.compiler.is_compiling() and plain_autograd() and backend.load_extension():
        try:  # a view of the first, whose gradient is split into views (csrc/side_by_side_autograd.cpp,
            # which checks that they lie side by side: cheaper there than here)
            return torch.ops.fastnas._side_by_side.default(list(tensors))
        except ValueError:  # not (or no longer) packed
            pass
    return torch.cat(list(tensors))


_structure_version = 0
"""Incremented whenever any module registers a submodule, parameter or buffer (global registration
hooks): the supernets' cached plans (:func:`structure_version`) are rebuilt after any such change."""


def _bump_structure_version(*_) -> None:
    global _structure_version
    _structure_version += 1


module_mod.register_module_module_registration_hook(_bump_structure_version)
module_mod.register_module_parameter_registration_hook(_bump_structure_version)
module_mod.register_module_buffer_registration_hook(_bump_structure_version)


def structure_version() -> int:
    """A number that changes whenever a module anywhere gains, loses or replaces a submodule,
    parameter or buffer: what a cached plan of a module tree (which op is what, which modules a
    kernel serves) is keyed on. (``.to()`` and ``.double()`` replace tensors without registering them,
    so a plan reads tensors from their modules when it runs, and :class:`BatchNormGroup` checks its
    buffers.)"""
    return _structure_version


def cached_plan(owner: nn.Module, key, build: Callable, *args):
    """``build(*args)``, cached in ``owner`` under ``key``: what a cell's forward needs to know about its
    modules (which op is what, a :class:`BatchNormGroup` per group), which found through ``nn.Module``
    attribute lookups cost the host more than the cell's kernels. The cache is dropped when any module
    registration anywhere changed the structure (:func:`structure_version`); a copy of the cell builds
    its own; nothing is cached, and no global read, while tracing."""
    if torch.compiler.is_compiling():
        return build(*args)
    version = (id(owner), structure_version())
    cached = owner.__dict__.get("_plan_cache")
    if cached is None or cached[0] != version:
        cached = (version, {})
        owner.__dict__["_plan_cache"] = cached
    entry = cached[1].get(key)
    if entry is None:
        entry = cached[1][key] = build(*args)
    return entry


class StatUpdates:
    """BatchNorm bookkeeping of a whole cell, collected during its forward and applied at its end by
    :meth:`apply` in a handful of foreach kernels: ``num_batches_tracked += 1`` of every module run,
    and the running statistics of modules that share another module's output (see
    :func:`shared_batch_norm`).

    ``deferred=True``: every running statistic is updated by :meth:`apply`, none by a BatchNorm
    kernel. For a compiled region that returns its batch statistics and leaves the buffers alone:
    ``apply`` runs after it, eagerly, on the groups' packed buffers (a few foreach kernels): mutating
    each module's buffers inside the graph makes the compiler write, and compile, a copy back for
    every one of them. ``plans``: the cell, whose :func:`cached_plan` keeps a :class:`BatchNormGroup`
    per group (its packed views found once)."""

    def __init__(self, deferred: bool = False, plans: nn.Module | None = None) -> None:
        self.deferred = deferred
        self.plans = plans
        # deferred: (modules of one kernel, batch mean, batch invstd, values per channel, momentum, biases)
        self.groups: list[tuple[tuple[nn.BatchNorm2d, ...], Tensor, Tensor, int, float, tuple[Tensor, ...]]] = []
        self.counters: list[Tensor] = []
        # (module, batch mean, batch invstd, values per channel, momentum: None when deferred cumulative)
        self.shared: list[tuple[nn.BatchNorm2d, Tensor, Tensor, int, float | None]] = []
        # momentum -> (running means, the convolution biases left out of their batch means)
        self.biases: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        self.zero_gradients: list[Tensor] = []  # those biases, given gradient zero by :meth:`through`

    def add_biases(self, running_means: Sequence[Tensor], biases: Sequence[Tensor], momentum: float) -> None:
        """``running_mean += momentum * bias`` for each pair: the batch mean the kernel used lacked the
        bias of the convolution before the BatchNorm (see :func:`batch_norm`)."""
        means, values = self.biases.setdefault(momentum, ([], []))
        means.extend(running_means)
        values.extend(biases)  # (read under no_grad by apply)

    def apply(self) -> None:
        # buffers and batch statistics only: nothing here is recorded by autograd
        with torch.no_grad():
            self._update()

    def through(self, t: Tensor) -> Tensor:
        """``t``, through which every bias left out of a convolution before a BatchNorm so far gets its
        gradient, zero (one kernel for all of them). ``t``: a tensor the cell's output is computed from
        by the cell itself, such as an input of its last mixed sum: not the output, which would be a
        view made by a custom Function, and so could not be modified in place."""
        biases, self.zero_gradients = self.zero_gradients, []
        return _biases_left_out(t, biases)

    def _update(self) -> None:
        # (running mean, running var, batch mean, batch invstd, eps, values per channel, factor)
        targets = []
        for bn, mean, invstd, n, f in self.shared:
            if f is None:  # deferred cumulative average: factor 1 / count, counted first
                bn.num_batches_tracked.add_(1)
                f = 1.0 / float(bn.num_batches_tracked)
            targets.append((bn.running_mean, bn.running_var, mean, invstd, bn.eps, n, f))
        counters = list(self.counters)
        for bns, mean, invstd, n, f, biases in self.groups:
            mean = mean + torch.cat([b.reshape(-1) for b in biases]) if biases else mean
            group = (
                cached_plan(self.plans, ("bn", bns), BatchNormGroup, bns)
                if self.plans is not None
                else BatchNormGroup(bns)
            )
            packed = group.packed()
            if packed is None:  # module by module
                blocks = zip(bns, mean.chunk(len(bns)), invstd.chunk(len(bns)))
                targets += [(bn.running_mean, bn.running_var, m, i, bn.eps, n, f) for bn, m, i in blocks]
            else:  # one view per statistic over the whole group
                targets.append((packed[0], packed[1], mean, invstd, bns[0].eps, n, f))
            if packed is not None and packed[2] is not None:
                counters.append(packed[2])
            else:
                counters += [bn.num_batches_tracked for bn in bns if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        for momentum, (means, biases) in self.biases.items():
            torch._foreach_add_(means, biases, alpha=momentum)
        if not targets:
            return
        # unbiased batch variance, as the native kernel stores it: (invstd^-2 - eps) * n / (n - 1)
        variances = torch._foreach_pow([invstd for _, _, _, invstd, *_ in targets], -2)
        torch._foreach_sub_(variances, [eps for *_, eps, _, _ in targets])
        torch._foreach_mul_(variances, [n / max(n - 1, 1) for *_, n, _ in targets])
        by_factor: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for (running_mean, running_var, mean, _, _, _, factor), var in zip(targets, variances):
            buffers, stats = by_factor.setdefault(factor, ([], []))
            buffers += [running_mean, running_var]
            stats += [mean, var]
        for factor, (buffers, stats) in by_factor.items():  # running = (1 - f) * running + f * batch
            torch._foreach_mul_(buffers, 1.0 - factor)
            torch._foreach_add_(buffers, stats, alpha=factor)


def _count_batch(bns: Sequence[nn.BatchNorm2d], updates: StatUpdates | None, packed: Tensor | None = None) -> None:
    """``num_batches_tracked += 1`` for every module of ``bns`` that counts (``packed``: their counters
    as one view, see :class:`BatchNormGroup`): now, in one kernel, or at the end of the cell by
    ``updates``."""
    if packed is not None:
        tracked = [packed]
    else:
        tracked = [bn.num_batches_tracked for bn in bns if bn.num_batches_tracked is not None]
    if updates is not None:
        updates.counters.extend(tracked)
    elif tracked:
        torch._foreach_add_(tracked, 1)


def _concatenated_stats(bns: Sequence[nn.BatchNorm2d]):
    """``(running_mean, running_var, write_back)`` for one BatchNorm kernel over the concatenated
    channels of ``bns`` whose statistics are not packed: concatenated copies that ``write_back()``
    copies back."""
    means, variances = [bn.running_mean for bn in bns], [bn.running_var for bn in bns]
    running_mean, running_var = torch.cat(means), torch.cat(variances)

    def write_back() -> None:
        torch._foreach_copy_(means + variances, [*running_mean.chunk(len(bns)), *running_var.chunk(len(bns))])

    return running_mean, running_var, write_back


class BatchNormGroup:
    """BatchNorm modules normalised together by one kernel (the same op of several edges, see
    :func:`batch_norm`), with the packed views of their running statistics found once: searching them
    (:func:`_adjacent`, a storage comparison per buffer) cost the host more than the kernel's launch.
    Each call compares the modules' current buffers with the ones the views were made from, by
    identity, so a replaced buffer (``.to()``, an assignment) is seen. A supernet's cell keeps one per
    group (:func:`cached_plan`); :func:`batch_norm` takes it where it takes a list of modules (and
    makes one for a list)."""

    __slots__ = ("bns", "_buffers", "_packed")
    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        self.bns = tuple(bns)
        self._buffers: tuple | None = None
        self._packed: tuple[Tensor, Tensor, Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.bns)

    def __iter__(self):
        return iter(self.bns)

    def __getitem__(self, index):
        return self.bns[index]

    def packed(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(running_mean, running_var, num_batches_tracked)``, each one view over the group's
        buffers of that name (the counters None when a module has none), when the means and variances
        are packed (see :func:`pack_running_stats`); else None. Cached outside tracing and torch.func
        transforms (under them a group of more than one module is never packed, see :func:`_adjacent`)."""
        current = tuple(bn._buffers.get(name) for bn in self.bns for name in self._NAMES)
        if torch.compiler.is_compiling() or not plain_autograd():
            return _packed_views(current)
        if self._buffers is None or any(a is not b for a, b in zip(current, self._buffers)):
            self._buffers, self._packed = current, _packed_views(current)
        return self._packed


def _packed_views(buffers: tuple) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """:meth:`BatchNormGroup.packed` of the modules' ``(running_mean, running_var,
    num_batches_tracked)`` buffers, module after module."""
    means, variances, counters = buffers[0::3], buffers[1::3], buffers[2::3]
    if any(t is None for t in means + variances):
        return None
    mean, var = _adjacent(means), _adjacent(variances)
    if mean is None or var is None:
        return None
    return mean, var, _adjacent(counters) if all(t is not None for t in counters) else None


def _tracks(bn: nn.BatchNorm2d) -> bool:
    return bn.training and bn.track_running_stats and bn._buffers.get("running_mean") is not None


@torch.no_grad()
def _update_from_batch(
    bns: Sequence[nn.BatchNorm2d], mean: Tensor, invstd: Tensor, count: int, updates: StatUpdates | None = None
) -> None:
    """Update the running statistics of ``bns`` (each tracking, in training mode) as their own forward
    would from the batch ``mean`` and ``invstd = 1/sqrt(var + eps)`` of ``count`` values per channel
    (see :meth:`StatUpdates.apply`): at the end of the cell with ``updates``, else now.
    ``momentum=None`` (cumulative average, factor ``1 / num_batches_tracked``) is applied now, or by
    deferred ``updates``, and reads the count on the host."""
    now = StatUpdates()
    deferred = updates is not None and updates.deferred
    for bn in bns:
        if bn.momentum is None and deferred:  # counted and weighed by apply, after the graph
            updates.shared.append((bn, mean, invstd, count, None))
        elif bn.momentum is None:  # factor 1 / count, counted first
            bn.num_batches_tracked.add_(1)
            now.shared.append((bn, mean, invstd, count, 1.0 / float(bn.num_batches_tracked)))
        else:
            target = updates if updates is not None else now
            _count_batch([bn], target)
            target.shared.append((bn, mean, invstd, count, bn.momentum))
    now.apply()


class _BiasLeftOut(torch.autograd.Function):
    """``x`` itself, and gradient zero for each bias: the gradient of a convolution's bias left out
    before a BatchNorm with batch statistics (see :func:`batch_norm`), which removes a per-channel
    constant, so ``dL/dbias`` is exactly zero (the reference computes it as a sum of ``dL/dconv``
    that is zero up to rounding). ``x`` is any tensor the loss depends on through the BatchNorm."""

    @staticmethod
    def forward(ctx, x, *biases):
        ctx.sizes = [b.numel() for b in biases]
        ctx.shapes = [b.shape for b in biases]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        zeros = grad.new_zeros(sum(ctx.sizes)).split(ctx.sizes)  # one kernel for every bias
        return (grad, *(z.view(shape) for z, shape in zip(zeros, ctx.shapes)))


def _biases_left_out(x: Tensor, biases: Sequence[Tensor]) -> Tensor:
    """``x``, through which ``biases`` get gradient zero (see :class:`_BiasLeftOut`), when any needs one."""
    if torch.is_grad_enabled() and any(b.requires_grad for b in biases):
        return _BiasLeftOut.apply(x, *biases)
    return x


def _lean_batch_norm(
    x: Tensor,
    bns: Sequence[nn.BatchNorm2d],
    unit: Tensor | None,
    parts: int,
    updates: StatUpdates | None,
    biases: Sequence[Tensor] | None = None,
):
    """``(outputs, mean, invstd)`` of :func:`batch_norm` for lean-eligible modules of one eps
    (``biases``: as there; ``mean`` then lacks them)."""
    first = bns[0]
    if any(b.eps != first.eps for b in bns):
        raise ValueError("bn: the modules of one group must share eps")
    tracking = [b for b in bns if _tracks(b)]
    in_kernel = len(tracking) == len(bns) and all(b.momentum is not None and b.momentum == first.momentum for b in bns)
    if in_kernel and updates is not None and updates.deferred:  # batch statistics only; updates.apply does the rest
        ys, mean, invstd = lean_batch_norm(x, parts, None, None, 0.0, first.eps, unit, invstd_differentiable=False)
        updates.groups.append((tuple(bns), mean, invstd, x.numel() // x.shape[1], first.momentum, tuple(biases or ())))
        if biases is not None:
            updates.zero_gradients.extend(biases)
        return ys, mean, invstd
    if in_kernel:  # the kernel updates the (packed) running statistics itself
        packed = (bns if isinstance(bns, BatchNormGroup) else BatchNormGroup(bns)).packed()
        if packed is not None:
            running_mean, running_var, counters = packed
            write_back = None
        else:
            (running_mean, running_var, write_back), counters = _concatenated_stats(bns), None
        _count_batch(bns, updates, counters)
        momentum = first.momentum
    else:  # no statistics to track, or cumulative averages / mixed momenta: updated after the kernel
        running_mean = running_var = write_back = None
        momentum = 0.0
    if biases is not None and updates is not None:
        updates.zero_gradients.extend(biases)
    elif biases is not None:
        x = _biases_left_out(x, biases)
    ys, mean, invstd = lean_batch_norm(
        x, parts, running_mean, running_var, momentum, first.eps, unit, invstd_differentiable=False
    )
    if write_back is not None:
        write_back()
    if biases is not None and in_kernel:  # the kernel's running means lack the biases
        target = updates if updates is not None else StatUpdates()
        target.add_biases([bn._buffers["running_mean"] for bn in bns], biases, momentum)
        if updates is None:
            target.apply()
    if tracking and not in_kernel:
        count = x.numel() // x.shape[1]
        n = len(bns)
        batch_means = mean.chunk(n)
        if biases is not None:
            batch_means = [m + b.detach() for m, b in zip(batch_means, biases)]
        for b, m, i in zip(bns, batch_means, invstd.chunk(n)):
            if _tracks(b):
                _update_from_batch([b], m, i, count, updates)
    return ys, mean, invstd


def batch_norm(
    x: Tensor,
    bn: nn.BatchNorm2d | Sequence[nn.BatchNorm2d],
    unit: Tensor | None = None,
    parts: int = 1,
    updates: StatUpdates | None = None,
    biases: Sequence[Tensor] | None = None,
) -> Tensor | list[Tensor]:
    """``bn(x)`` for a ``[B, C, H, W]`` tensor, keeping only the output for the backward.

    ``bn`` may be a list of modules, each normalising its own block of ``x``'s channels (ops of
    several edges computed by one convolution): ONE :func:`fastnas.ops.batch_norm.lean_batch_norm`
    then normalises them all and updates every module's running statistics (in its own kernel when
    they were packed with :func:`pack_running_stats`). With ``parts > 1`` the result is ``parts``
    dense tensors, one per block of ``C / parts`` channels, else one tensor. Modules that use running
    statistics or have affine parameters are simply called, each on its block, as the reference
    does. ``unit``: an optional :func:`fastnas.ops.batch_norm.bn_constants` tensor (saves two kernels
    per backward on the native path);
    ``updates``: a :class:`StatUpdates` that applies the batch counts at the end of the cell.

    ``biases``: per module, the bias of the convolution that computed its block, which the caller
    left out of ``x`` (call :func:`can_leave_out_biases` first). Batch statistics remove a
    per-channel constant, so the output is the same; the running means get the biases added, and
    each bias gets gradient zero, exactly (one reduction over the conv's output gradient fewer):
    through a tensor the caller passes to ``updates.through`` when ``updates`` is given, else
    through ``x``.
    """
    bns = bn if isinstance(bn, BatchNormGroup) else list(bn) if isinstance(bn, (list, tuple)) else [bn]
    if biases is not None and not can_leave_out_biases(bns):
        raise ValueError(
            "biases: only BatchNorms that normalise with batch statistics, have no affine parameters and a "
            "fixed momentum (or no running statistics) take them, outside torch.func transforms and "
            "forward-mode AD (see can_leave_out_biases)"
        )
    if not all(lean_bn_eligible(b) for b in bns):
        y = torch.cat([b(block) for b, block in zip(bns, x.chunk(len(bns), dim=1))], dim=1)
        return y if parts == 1 else list(y.chunk(parts, dim=1))
    ys, _, _ = _lean_batch_norm(x, bns, unit, parts, updates, biases)
    return ys if parts > 1 else ys[0]


def can_leave_out_biases(bns: Sequence[nn.BatchNorm2d]) -> bool:
    """Whether :func:`batch_norm` of ``bns`` accepts ``biases``: every module normalises with batch
    statistics, has no affine parameters, and tracks its running mean with a fixed momentum or not
    at all; and no torch.func transform or forward-mode AD runs (there the convolutions keep them)."""
    return plain_autograd() and all(lean_bn_eligible(b) and (b.momentum is not None or not _tracks(b)) for b in bns)


def shared_batch_norm(
    x: Tensor, bns: Sequence[nn.BatchNorm2d], unit: Tensor | None = None, updates: StatUpdates | None = None
) -> Tensor:
    """``bns[e](x)`` for every ``e`` — the same output, since every module sees the same input and
    normalises with batch statistics — computed once; the first module's running statistics are
    updated by the native kernel, every other module's with the same batch statistics by foreach
    kernels (see :func:`_update_from_batch`). Each module must be :func:`lean_bn_eligible`."""
    if not all(lean_bn_eligible(b) and b.eps == bns[0].eps for b in bns):
        raise ValueError("bns: a shared BatchNorm needs batch statistics, affine=False and one eps on every module")
    (y,), mean, invstd = _lean_batch_norm(x, bns[:1], unit, 1, updates)
    rest = [b for b in bns[1:] if _tracks(b)]
    if rest:
        _update_from_batch(rest, mean, invstd, x.numel() // x.shape[1], updates)
    return y


def avg_pool_3x3(x: Tensor, stride: int = 1) -> Tensor:
    """``F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)`` of a ``[B, C, H, W]`` tensor, by
    :func:`fastnas.ops.avg_pool.avg_pool2d` (compiled kernels on channels_last CPU tensors)."""
    return avg_pool2d(x, 3, stride, 1, count_include_pad=False)


def max_pool_3x3(x: Tensor, stride: int = 1) -> Tensor:
    """``F.max_pool2d(x, 3, stride, 1)``, by :func:`fastnas.ops.max_pool.max_pool2d` (ATen's kernels
    inside compiled CPU graphs)."""
    return max_pool2d(x, 3, stride, 1)


# --------------------------------------------------------------------------- reference Sequentials, slimmer


def run_tail(
    seq: nn.Sequential, x: Tensor, start: int = 0, unit: Tensor | None = None, updates: StatUpdates | None = None
) -> Tensor:
    """``seq[start:](x)`` with every BatchNorm run through :func:`batch_norm` (output-only saving;
    ``unit``, ``updates`` as there).

    Used to apply the reference modules' ``op`` Sequentials after a ReLU shared by several ops. A
    module with forward hooks (a FLOP counter's, a user's) is called as a module, so they fire.
    """
    for m in list(seq)[start:]:
        if _hooked(m):
            x = m(x)
        elif isinstance(m, nn.BatchNorm2d):
            x = batch_norm(x, m, unit, updates=updates)
        elif isinstance(m, nn.ReLU):
            x = torch.relu(x)
        elif _is_depthwise(m):
            x = depthwise_conv2d(x, m.weight, m.stride, m.padding, m.dilation)
        else:
            x = m(x)
    return x


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run forward hooks (its own or global ones)."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
    )


def _is_depthwise(m: nn.Module) -> bool:
    """A bias-free depthwise ``nn.Conv2d`` (one filter per channel) with numeric padding."""
    return (
        isinstance(m, nn.Conv2d)
        and m.groups == m.in_channels == m.out_channels
        and m.bias is None
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )
