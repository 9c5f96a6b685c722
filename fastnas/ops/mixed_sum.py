"""``fastnas.mixed_sum``: the fused weighted sum of a supernet edge, its registration and autograd.

Two public operators live in the ``fastnas`` namespace of ``torch.library``:

* ``torch.ops.fastnas.mixed_sum(Tensor[] outputs, Tensor weights) -> Tensor``
* ``torch.ops.fastnas.mixed_sum_backward(Tensor grad, Tensor[] outputs, Tensor weights,
  bool compute_outputs_grad) -> (Tensor[], Tensor)``

Both are opaque to ``torch.compile`` (fake kernels give it shapes), so a compiled graph calls the
fused kernels instead of decomposing them. Their implementations validate the inputs, bring the
K inputs to one shared dense layout (without copying when they already share one) and hand them
to the backend chosen by :mod:`fastnas.backend`. Every backend has the same contract, the one of
the compiled ``fastnas::_mixed_sum_forward`` / ``_mixed_sum_backward`` kernels:

* inputs: K >= 1 tensors of one dtype, shape and strides, non-overlapping and dense; ``grad``
  with those strides too; weights 1-D, contiguous, in the accumulation dtype (float64 for
  float64 inputs, float32 otherwise);
* forward returns a new tensor laid out like ``outputs[0]``;
* backward returns ``(outputs_grad, weights_grad)``: K new tensors laid out like ``grad`` (none
  when ``compute_outputs_grad`` is False) and the K inner products in the accumulation dtype
  (an empty tensor when ``outputs`` is empty).

Which autograd runs when
------------------------
:func:`mixed_sum` records its backward in one of four ways; all compute the same values with the
same kernels (the backend :func:`fastnas.get_backend` names):

* **Traced by torch.compile, or** ``torch.ops.fastnas.mixed_sum`` **called directly**: the
  ``torch.library`` registration. ``fastnas::mixed_sum`` is a custom op whose autograd
  (:func:`_backward`, calling ``fastnas::mixed_sum_backward``), batching rule and autocast promotion
  are registered with it. Why: a compiled graph keeps the op as one opaque call of the fused kernels
  (its fake kernel gives the shapes), and a ``torch.ops`` call is differentiable, vmap-able and
  autocast-aware like an ATen op.
* **Eager, on the compiled backends** (``cpu``, ``cuda``): the C++ autograd node
  ``fastnas::_mixed_sum_autograd`` (``csrc/mixed_sum_autograd.cpp``), which checks the arguments,
  brings them to one layout and records a node whose backward never enters Python. Why: host time is
  most of a small edge's cost. When it refuses its arguments, the Python checks say which and why.
* **Eager, on the Python backends** (``triton``, ``reference``): :class:`_MixedSumFunction`, a
  classic ``torch.autograd.Function`` (forward with ``ctx``) over the operators' implementation.
  Why: these backends have no C++ node, and both the registered op's dispatch and the
  ``setup_context`` form cost more host time (``benchmarks/RESULTS.md``).
* **Under a torch.func transform** (vmap, grad, jacrev, jacfwd, hessian) **or forward-mode AD**, on
  every backend: :class:`_MixedSumTransformable`, the ``setup_context`` form those require, with a
  batching rule (batched outputs with shared weights stay one fused call) and a ``jvp`` (itself a
  mixed sum). Why: neither the classic form nor the C++ node can be transformed.

Whichever records it, the backward runs the fused kernels, except where autograd records the
backward itself (``create_graph=True``, for second derivatives) or a transform batches it: there the
reference formulas run in differentiable torch ops (:func:`_gradients`; the C++ node likewise), which
autograd differentiates exactly and vmap batches.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fastnas import backend
from fastnas.contract import FLOAT_DTYPES as SUPPORTED_DTYPES
from fastnas.contract import accumulation_dtype, is_dense, layout_key
from fastnas.ops import reference
from fastnas.ops.reference import mixed_sum_backward_reference

# --------------------------------------------------------------------------- validation


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def _validate(outputs: Sequence[Tensor], weights: Tensor) -> bool:
    """Raise a TypeError/ValueError naming the argument for every input the kernels do not take.
    Returns whether every output has the strides of ``outputs[0]`` (read in the same pass)."""
    if not isinstance(outputs, (list, tuple)):
        raise TypeError(f"outputs must be a list or tuple of tensors, got {type(outputs).__name__}")
    if len(outputs) == 0:
        raise ValueError("outputs must hold at least one tensor (K >= 1), got an empty sequence")
    first = _check_tensor(outputs[0], "outputs[0]")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"outputs[0] has dtype {first.dtype}; fastnas.mixed_sum supports float16, bfloat16, float32 and float64"
        )
    dtype, shape, device = first.dtype, first.shape, first.device  # read once: this loop is on the hot path
    strided, stride, same_strides = torch.strided, first.stride(), True
    for k in range(1, len(outputs)):
        o = outputs[k]
        # one condition for the common case (dtypes and layouts are singletons: compared by identity)
        if (
            isinstance(o, Tensor)
            and o.layout is strided
            and o.dtype is dtype
            and o.shape == shape
            and o.device == device
        ):
            same_strides = same_strides and o.stride() == stride
            continue
        _check_tensor(o, f"outputs[{k}]")
        if o.dtype != dtype:
            raise TypeError(f"outputs[{k}] has dtype {o.dtype} but outputs[0] has {dtype}")
        if o.shape != shape:
            raise ValueError(f"outputs[{k}] has shape {tuple(o.shape)} but outputs[0] has {tuple(shape)}")
        raise ValueError(f"outputs[{k}] is on {o.device} but outputs[0] is on {device}")
    _check_tensor(weights, "weights")
    if weights.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weights must be a real floating-point tensor, got dtype {weights.dtype}")
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D of length K={len(outputs)}, got shape {tuple(weights.shape)}")
    if weights.shape[0] != len(outputs):
        raise ValueError(f"weights has length {weights.shape[0]} but there are K={len(outputs)} outputs")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but outputs are on {device}")
    return same_strides


# --------------------------------------------------------------------------- autocast

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_promote(outputs: list[Tensor]) -> list[Tensor]:
    """The K inputs in one dtype, for a call under ``torch.autocast``.

    Under autocast the candidate ops of one edge come out in different dtypes: a convolution in the
    autocast dtype, an identity, a pooling or a BatchNorm in float32. They are promoted to the widest
    dtype among them, as the eager ``sum(w * o)`` does and as autocast itself treats multi-input ops
    (``cat``, ``stack``): the result equals the eager supernet's, and nothing computed in float32 is
    rounded to 16 bits. Outside autocast, mixed dtypes stay an error.
    """
    first = outputs[0]
    dtype = first.dtype
    mixed = False
    for o in outputs[1:]:
        if isinstance(o, Tensor) and o.dtype != dtype and o.is_floating_point() and first.is_floating_point():
            dtype = torch.promote_types(dtype, o.dtype)
            mixed = True
    if not mixed:
        return outputs
    return [o.to(dtype) if isinstance(o, Tensor) and o.is_floating_point() else o for o in outputs]


def _under_autocast(t: object) -> bool:
    return (
        torch._C._is_any_autocast_enabled()  # one cheap call on the hot path, when autocast is off
        and isinstance(t, Tensor)
        and t.device.type in AUTOCAST_DEVICE_TYPES
        and torch.is_autocast_enabled(t.device.type)
    )


# --------------------------------------------------------------------------- layout


def _to_layout_of(t: Tensor, like: Tensor) -> Tensor:
    if layout_key(t) == layout_key(like):
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


def _validated_in_one_layout(outputs: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    """:func:`_validate`, then the outputs in one dense layout (as they are when they share the first
    one's strides and it is dense: read in the validation pass, no second one)."""
    if _validate(outputs, weights) and (outputs[0].is_contiguous() or is_dense(outputs[0])):
        return list(outputs)
    return shared_dense_layout(outputs)


def shared_dense_layout(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors in one shared dense layout: as they are if they already share one, else copied
    into the first one's layout (or contiguous when the first is not dense)."""
    first = tensors[0]
    stride = first.stride()
    if (first.is_contiguous() or is_dense(first)) and all(t.stride() == stride for t in tensors):
        return list(tensors)  # the common case, checked cheaply
    like = first if is_dense(first) else first.contiguous()
    return [_to_layout_of(t, like) for t in tensors]


# --------------------------------------------------------------------------- implementation
# Shared by the registered operators (torch.compile, direct torch.ops calls) and the eager autograd
# Function: inputs validated, in one dense layout. Every backend handles tensors with no elements.


@functools.cache
def kernels_for(name: str) -> tuple[Callable, Callable]:
    """The (forward, backward) callables of backend ``name``, all with the native ops' contract."""
    if name in backend.COMPILED_BACKENDS:
        backend.load_extension()
        return torch.ops.fastnas._mixed_sum_forward, torch.ops.fastnas._mixed_sum_backward
    if name == "triton":
        from fastnas.kernels import mixed_sum as triton_mixed_sum

        return triton_mixed_sum.VALIDATED  # the op layer checked the inputs: no second check
    return reference.mixed_sum_forward_reference, reference.mixed_sum_backward_reference


def _accumulation_weights(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """The weights as the kernels take them: contiguous, in the accumulation dtype of ``dtype``."""
    acc = accumulation_dtype(dtype)
    if weights.dtype == acc and weights.is_contiguous():
        return weights  # the usual case, without a dispatch
    return weights.to(acc).contiguous()


def _forward_impl(outputs: list[Tensor], weights: Tensor, kernels: tuple | None = None) -> Tensor:
    """``kernels``: the backend's (forward, backward) when the caller resolved it already."""
    forward, _ = kernels or kernels_for(backend.get_backend(outputs[0].device))
    return forward(outputs, _accumulation_weights(weights, outputs[0].dtype))


def _backward_impl(
    grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool, kernels: tuple | None = None
) -> tuple[list[Tensor], Tensor]:
    if outputs:
        if grad.shape != outputs[0].shape or grad.dtype != outputs[0].dtype:
            raise ValueError("grad must have the shape and dtype of the outputs")
        if grad.stride() != outputs[0].stride():
            grad = _to_layout_of(grad, outputs[0])
    elif not is_dense(grad):
        grad = grad.contiguous()
    _, backward = kernels or kernels_for(backend.get_backend(grad.device))
    outputs_grad, weights_grad = backward(
        grad, outputs, _accumulation_weights(weights, grad.dtype), compute_outputs_grad
    )
    if weights_grad.dtype != weights.dtype:
        weights_grad = weights_grad.to(weights.dtype)
    return list(outputs_grad), weights_grad


# --------------------------------------------------------------------------- operators


@torch.library.custom_op("fastnas::mixed_sum", mutates_args=())
def _mixed_sum_op(outputs: list[Tensor], weights: Tensor) -> Tensor:
    return _forward_impl(_validated_in_one_layout(outputs, weights), weights)


@_mixed_sum_op.register_fake
def _(outputs: list[Tensor], weights: Tensor) -> Tensor:
    _validate(outputs, weights)
    like = outputs[0] if is_dense(outputs[0]) else outputs[0].contiguous()
    return torch.empty_like(like)


@torch.library.custom_op("fastnas::mixed_sum_backward", mutates_args=())
def _mixed_sum_backward_op(
    grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool
) -> tuple[list[Tensor], Tensor]:
    _check_tensor(grad, "grad")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grad has dtype {grad.dtype}; fastnas.mixed_sum supports float16, bfloat16, float32, float64")
    if grad.device != weights.device:
        raise ValueError(f"grad is on {grad.device} but weights is on {weights.device}")
    if outputs:
        outputs = _validated_in_one_layout(outputs, weights)
    return _backward_impl(grad, outputs, weights, compute_outputs_grad)


@_mixed_sum_backward_op.register_fake
def _(grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool):
    like = outputs[0] if outputs else grad
    like = like if is_dense(like) else like.contiguous()
    outputs_grad = [torch.empty_like(like) for _ in range(weights.shape[0])] if compute_outputs_grad else []
    weights_grad = weights.new_empty(weights.shape if len(outputs) > 0 else (0,))
    return outputs_grad, weights_grad


def _setup_context(ctx, inputs, output) -> None:
    outputs, weights = inputs
    ctx.num_outputs = len(outputs)
    ctx.needs_outputs_grad = any(o.requires_grad for o in outputs)
    ctx.needs_weights_grad = weights.requires_grad
    # the K inputs are needed only for dL/dw: not kept alive when the weights are frozen
    ctx.save_for_backward(weights, *(outputs if ctx.needs_weights_grad else ()))


def _functorch_wrapped(tensors: Sequence[object]) -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) wraps any of ``tensors`` (a single
    cheap call when no transform is active, the common case)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return any(isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _gradients(grad: Tensor, outputs: list[Tensor], weights: Tensor, compute_outputs_grad: bool, fused):
    """``(outputs_grad, weights_grad)`` of the mixed sum: by the fused kernels (``fused``), or, when
    autograd records the backward itself (``create_graph=True``) or a torch.func transform batches
    it, by the reference formulas in plain torch ops, which autograd differentiates exactly (second
    and higher derivatives) and vmap batches."""
    if torch.is_grad_enabled() or (
        torch._C._functorch.peek_interpreter_stack() is not None and _functorch_wrapped((grad, weights, *outputs))
    ):
        return mixed_sum_backward_reference(grad, outputs, weights, compute_outputs_grad)
    return fused(grad, outputs, weights, compute_outputs_grad)


def _backward(ctx, grad: Tensor):
    weights, *outputs = ctx.saved_tensors
    compute_outputs_grad = ctx.needs_outputs_grad
    outputs_grad, weights_grad = _gradients(
        grad, outputs, weights, compute_outputs_grad, torch.ops.fastnas.mixed_sum_backward
    )
    if not compute_outputs_grad:
        outputs_grad = [None] * ctx.num_outputs
    return outputs_grad, (weights_grad if ctx.needs_weights_grad else None)


_mixed_sum_op.register_autograd(_backward, setup_context=_setup_context)


def _vmap_rule(size: int, outputs_dims, weights_dim, outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The mixed sum of a torch.func.vmap batch of ``size`` (result batched along dimension 0): the
    batch becomes every input's leading dimension. Batched outputs with shared weights are still one
    fused call; per-sample weights are summed by the reference formula."""
    outputs_dims = outputs_dims if outputs_dims is not None else [None] * len(outputs)
    batched = [o.movedim(d, 0) if d is not None else o.expand(size, *o.shape) for o, d in zip(outputs, outputs_dims)]
    if weights_dim is None:
        return mixed_sum(batched, weights)
    acc = accumulation_dtype(batched[0].dtype)
    w = weights.movedim(weights_dim, 0).to(acc).reshape(size, len(batched), *([1] * (batched[0].dim() - 1)))
    return sum(w[:, k] * o.to(acc) for k, o in enumerate(batched)).to(batched[0].dtype)


@_mixed_sum_op.register_vmap
def _(info, in_dims, outputs: list[Tensor], weights: Tensor):
    return _vmap_rule(info.batch_size, in_dims[0], in_dims[1], outputs, weights), 0


def _function_backward(ctx, grad: Tensor, needs_input_grad: tuple | None = None, kernels: tuple | None = None):
    """The backward of both autograd Functions below: ``(d weights, *d outputs)``, for the inputs
    ``(weights, *outputs)`` whose ``needs_input_grad`` is given (default: the context's)."""
    weights, *outputs = ctx.saved_tensors
    needs = ctx.needs_input_grad if needs_input_grad is None else needs_input_grad
    needs_weights_grad, needs_outputs_grad = needs[0], any(needs[1:])

    def fused(grad, outputs, weights, compute_outputs_grad):
        return _backward_impl(grad, outputs, weights, compute_outputs_grad, kernels)

    outputs_grad, weights_grad = _gradients(
        grad, outputs if needs_weights_grad else [], weights, needs_outputs_grad, fused
    )
    if not needs_outputs_grad:
        outputs_grad = [None] * ctx.num_outputs
    return (weights_grad if needs_weights_grad else None), *outputs_grad


class _MixedSumFunction(torch.autograd.Function):
    """Eager autograd of the mixed sum on the Python backends (triton, reference): the same
    implementation as the registered operators, without their dispatch overhead (which small GPU
    tensors would feel), in the classic form (forward with ctx), whose host time is less than the
    ``setup_context`` form's (see the module docstring). The inputs come in one shared dense layout."""

    @staticmethod
    def forward(ctx, kernels: tuple, weights: Tensor, *outputs: Tensor) -> Tensor:
        # kernels: the backend's (forward, backward), resolved once by the caller for both passes
        ctx.num_outputs = len(outputs)
        ctx.kernels = kernels
        # the K inputs are needed only for dL/dw: not kept alive when the weights are frozen
        ctx.save_for_backward(weights, *(outputs if ctx.needs_input_grad[1] else ()))
        return _forward_impl(list(outputs), weights, kernels)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, *_function_backward(ctx, grad, ctx.needs_input_grad[1:], ctx.kernels)


class _MixedSumTransformable(torch.autograd.Function):
    """The mixed sum under torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) and forward-mode
    AD, on every backend: the ``setup_context`` form they require, a batching rule and a tangent."""

    @staticmethod
    def forward(weights: Tensor, *outputs: Tensor) -> Tensor:
        return _forward_impl(list(outputs), weights)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weights, *outputs = inputs
        ctx.num_outputs = len(outputs)
        ctx.save_for_backward(weights, *(outputs if weights.requires_grad else ()))
        ctx.save_for_forward(weights, *outputs)

    backward = staticmethod(_function_backward)

    @staticmethod
    def jvp(ctx, weights_tangent: Tensor | None, *outputs_tangent: Tensor | None) -> Tensor:
        # bilinear: dy = sum_k (dw_k o_k + w_k do_k), itself one mixed sum
        weights, *outputs = ctx.saved_tensors
        terms = [*outputs] if weights_tangent is not None else []
        coefficients = [weights_tangent] if weights_tangent is not None else []
        for k, tangent in enumerate(outputs_tangent):
            if tangent is not None:
                terms.append(tangent)
                coefficients.append(weights[k : k + 1])
        if not terms:
            return torch.zeros_like(outputs[0])
        return mixed_sum(terms, torch.cat([c.to(weights.dtype) for c in coefficients]))

    @staticmethod
    def vmap(info, in_dims, weights: Tensor, *outputs: Tensor):
        return _vmap_rule(info.batch_size, list(in_dims[1:]), in_dims[0], outputs, weights), 0


def _register_autocast_promotion() -> torch.library.Library:
    """``torch.ops.fastnas.mixed_sum`` called directly under autocast promotes like :func:`mixed_sum`.
    Returns the registering library, which must stay alive for the registration to last."""
    library = torch.library.Library("fastnas", "IMPL")
    for device_type in AUTOCAST_DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, outputs: list[Tensor], weights: Tensor, keys=keys) -> Tensor:
            with torch._C._ExcludeDispatchKeyGuard(keys):
                return torch.ops.fastnas.mixed_sum.default(autocast_promote(list(outputs)), weights)

        library.impl("mixed_sum", kernel, key_name, with_keyset=True)
    return library


_AUTOCAST_LIBRARY = _register_autocast_promotion()


# --------------------------------------------------------------------------- public API

OutputsLike = Union[Sequence[Tensor], Tensor]


def mixed_sum(outputs: OutputsLike, weights: Tensor) -> Tensor:
    """Fused weighted sum of K candidate-op outputs: ``y = sum_k weights[k] * outputs[k]``.

    Args:
        outputs: K >= 1 tensors of one shape, dtype (float16, bfloat16, float32 or float64) and
            device, as a list or tuple (read where they lie, never stacked), or one tensor whose
            leading dimension is K.
        weights: 1-D tensor of length K, any real values (softmax weights, simplex weights, ...),
            on the outputs' device; float32 master weights are fine with 16-bit outputs.

    Returns:
        A new tensor with the outputs' shape, dtype and memory format (contiguous, channels_last
        or any dense layout the K inputs share). 16-bit inputs accumulate in float32.

    Differentiable with respect to every output and the weights: ``dL/do_k = w_k * g`` and
    ``dL/dw_k = sum(g * o_k)`` (accumulated in float32 or float64, returned in the weights' dtype),
    each computed in one pass over memory by the backend that :func:`fastnas.get_backend` names.
    """
    if isinstance(outputs, Tensor):
        _check_tensor(outputs, "outputs")
        if outputs.dim() < 1 or outputs.shape[0] == 0:
            raise ValueError(
                f"outputs given as one tensor must have a leading dimension K >= 1, got shape {tuple(outputs.shape)}"
            )
        outputs = list(outputs.unbind(0))
    elif isinstance(outputs, (list, tuple)):
        outputs = list(outputs)
    else:
        raise TypeError(f"outputs must be a list or tuple of tensors or one tensor, got {type(outputs).__name__}")
    if len(outputs) > 1 and _under_autocast(outputs[0]):
        outputs = autocast_promote(outputs)
    if torch.compiler.is_compiling():
        _validate(outputs, weights)
        return torch.ops.fastnas.mixed_sum(outputs, weights)  # traced as one opaque op
    transformed = forward_ad._current_level >= 0 or (
        torch._C._functorch.peek_interpreter_stack() is not None and _functorch_wrapped((weights, *outputs))
    )
    name = (
        None
        if transformed or not outputs or not isinstance(outputs[0], Tensor)
        else backend.get_backend(outputs[0].device)
    )
    if name in backend.COMPILED_BACKENDS:
        # checks, layout and autograd node in C++ (csrc/mixed_sum_autograd.cpp): the backward never
        # enters Python. When the op refuses its arguments, the Python checks say which and why.
        try:
            return torch.ops.fastnas._mixed_sum_autograd(weights, outputs)
        except (RuntimeError, TypeError, ValueError):
            _validate(outputs, weights)
            raise
    outputs = _validated_in_one_layout(outputs, weights)
    if transformed:
        return _MixedSumTransformable.apply(weights, *outputs)
    return _MixedSumFunction.apply(kernels_for(name), weights, *outputs)
