"""How a run's steps execute: compiled networks, CUDA graphs, statistics kept on the device.

* :func:`compile_network` (``--compile``): a supernet compiles each kind of cell once
  (``net.compile_cells()``, regional compilation, every op computed); any other network compiles
  whole (``nn.Module.compile``). In place, after ``.to(device)`` and before DDP. The environment
  variable ``FASTNAS_COMPILE_BACKEND`` names another ``torch.compile`` backend (``aot_eager``
  traces forward and backward without generating code: tests, debugging).
* :class:`CapturedStep` (``--cuda-graphs``): a step function whose tensor arguments are copied
  into static buffers, run eagerly a few times, then captured in a CUDA graph and replayed.
* :func:`step_stats`: a micro-batch's loss sum and correct count as one float64 device tensor, so
  that a step reads nothing on the host; the epoch loop sums them and reads them once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastnas import switches
from fastnas.runs.config import RunError

COMPILE_BACKEND_ENV = switches.COMPILE_BACKEND
CAPTURE_WARMUP_CALLS = 2  # eager calls of a step before its capture: optimizer state, lazy caches


def step_stats(loss: Tensor, logits: Tensor, y: Tensor) -> Tensor:
    """``[loss * len(y), correct predictions]`` of a micro-batch, float64, on the device."""
    correct = (logits.detach().argmax(-1) == y).sum()
    return torch.stack([loss.detach().double() * len(y), correct.double()])


# --------------------------------------------------------------------------- --compile


def compile_options() -> dict[str, Any]:
    """Options of ``torch.compile`` for ``--compile``: the backend of ``FASTNAS_COMPILE_BACKEND`` if set."""
    backend = switches.compile_backend()
    return {"backend": backend} if backend else {}


def compile_network(net: nn.Module) -> None:
    """Compile ``net`` in place for training (see the module docstring). Call after ``.to(device)``."""
    options = compile_options()
    if not hasattr(net, "compile_cells"):
        net.compile(**options)
        return
    net.compile_cells(**options)
    # a bilevel search traces each kind of cell twice: with the architecture's gradient (its step)
    # and without (the weight step); compile_cells leaves room for one graph per cell
    cells = sum(1 for m in net.modules() if hasattr(m, "compile_nodes"))
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * cells)


@contextlib.contextmanager
def eager(enabled: bool = True) -> Iterator[None]:
    """Run compiled code eagerly in the body (evaluation: other batch sizes and modes would each
    compile a graph of their own)."""
    if not enabled:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


# --------------------------------------------------------------------------- --cuda-graphs


def check_cuda_graphs(device: torch.device, processes: int, amp: str) -> None:
    """RunError (one line) unless ``--cuda-graphs`` can run here."""
    if device.type != "cuda":
        raise RunError(f"--cuda-graphs needs a CUDA device (--device cuda), not {device.type}")
    if processes > 1:
        raise RunError("--cuda-graphs runs in one process: DDP's gradient hooks are not captured")
    if amp == "fp16":
        raise RunError(
            "--cuda-graphs does not support --amp fp16: loss scaling reads the gradients' overflow flag on the "
            "host every step; use --amp bf16"
        )


class CapturedStep:
    """``fn(*args)`` with every tensor in ``args`` (nested lists, tuples, dicts) first copied into a
    static buffer of its own, and ``fn`` called on the buffers.

    With ``capture`` (CUDA), the first ``warmup`` calls run eagerly (on a side stream, as capture
    requires; they are real steps), the next one captures ``fn`` in a CUDA graph and every later
    call only copies its arguments and replays the graph. The tensors ``fn`` returns are then
    static too: each replay overwrites them, so a caller uses them before the next call. Without
    ``capture`` (CPU) every call runs ``fn`` eagerly on the buffers: the same data path, which the
    tests check.

    ``fn`` must read nothing on the host, and its Python values (a learning rate, the shapes and
    non-tensor arguments, which must not change) are fixed at capture: :meth:`reset` forgets the
    graph when they change (the epoch loop does at every epoch). Each graph has a memory pool of
    its own (what its step allocates: about one step's activations), so that steps may replay in
    any order.
    """

    def __init__(self, fn: Callable[..., Any], capture: bool, warmup: int = CAPTURE_WARMUP_CALLS) -> None:
        self.fn = fn
        self.capture = capture
        self.warmup = warmup
        self.eager_calls = 0
        self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: list[Any] | None = None
        self._spec = None
        self._out: Any = None
        self._side: torch.cuda.Stream | None = None  # where the warm-up calls run

    def reset(self) -> None:
        """Forget the captured graph; the next call captures again (after no more eager calls)."""
        self.graph = None
        self._out = None

    def _load(self, args: tuple) -> tuple:
        """Copy ``args`` into the static buffers (allocated on the first call); return them as arguments."""
        flat, spec = tree_flatten(args)
        if self._static is None:
            self._static = [a.detach().clone() if isinstance(a, Tensor) else a for a in flat]
            self._spec = spec
        else:
            if spec != self._spec:
                raise ValueError(f"a captured step's arguments changed structure: {spec} != {self._spec}")
            for i, (buf, a) in enumerate(zip(self._static, flat)):
                if isinstance(buf, Tensor):
                    if not isinstance(a, Tensor) or a.shape != buf.shape or a.dtype != buf.dtype:
                        raise ValueError(f"a captured step's argument {i} changed: {buf.shape}, {buf.dtype} before")
                    buf.copy_(a, non_blocking=True)
                elif a != buf:
                    raise ValueError(f"a captured step's argument {i} changed from {buf!r} to {a!r}")
        return tree_unflatten(self._static, self._spec)

    def __call__(self, *args: Any) -> Any:
        static = self._load(args)
        if self.graph is not None:
            self.graph.replay()
            return self._out
        if not self.capture:
            self.eager_calls += 1
            return self.fn(*static)
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            if self._side is None:
                self._side = torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                out = self.fn(*static)
            torch.cuda.current_stream().wait_stream(self._side)
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self.fn(*static)
        self.graph = graph
        self.captures += 1
        graph.replay()  # capturing ran nothing
        return self._out
