"""GPU time of the mixed sum's kernels alone, and host time per call (stages of ``benchmarks/gpu_check.sh``).

``kernels``: the forward and the backward of each GPU backend (``cuda``, ``triton``; through the
registered ops ``torch.ops.fastnas.mixed_sum`` and ``mixed_sum_backward`` under ``fastnas.set_backend``),
eager ``sum(w * o)`` and ``torch.compile`` of it, at K = 8, 40 and 112, float32 and bfloat16,
[64,16,32,32], [64,64,32,32] and one input of 64 MiB, with the K inputs aligned (separate tensors)
or misaligned (slices of one stacked tensor at an odd element offset). Each time is the median of
many repetitions of CUDA events around the call, with a sleep kernel queued before each repetition
that outlasts the host's time to enqueue the call: the events then bracket the GPU's work alone,
launch gaps excluded (every repetition checks that the sleep did outlast the host; ``covered``).
Inputs rotate over enough sets that the bytes touched between two uses of one set exceed three
times the L2 cache, so L2 does not serve them. Each time is set against a device-to-device copy of
the same number of bytes (reads plus writes) timed the same way in the same run: ``of_copy``.
Bytes moved: forward (K+1)·N, backward (2K+1)·N elements. The measurements run in priority order
(the cases of the targets first, eager and ``torch.compile`` at K=8 next, then the rest; see
``priority_order``) until the budget is spent; what was not reached is listed.

``host``: host microseconds per forward+backward (``fastnas.mixed_sum`` then ``autograd.grad``) of
each backend and of eager ``sum(w * o)`` on tiny tensors: N calls back to back with no
synchronisation (the GPU keeps up, so the host never waits for it), against the GPU's time for the
same call measured as above.

Run:  python benchmarks/gpu_kernels.py kernels --json kernels.json [--budget-s 120] [--dry]
      python benchmarks/gpu_kernels.py host --json host.json [--budget-s 20] [--dry]
With ``--dry`` both run on the CPU at tiny sizes (the CPU backends, compile with the ``eager``
backend), labelled as stand-ins.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import DRY_LABEL, Deadline, device_for, stage_arguments, write_json  # noqa: E402

import fastnas  # noqa: E402

MiB = 1 << 20
EXIT_BUDGET_SPENT = 3  # stopped by its own budget before every measurement ran (the shell says "cut short")
L2_MULTIPLE = 3  # bytes cycled between two uses of one input set, in units of the L2 size
MAX_SET_BYTES = 32 << 30  # never rotate more than this much input memory


@dataclass(frozen=True)
class Grid:
    """What the kernel stage measures: shapes, dtypes, K values, repetitions."""

    shapes: tuple[tuple[int, ...], ...]
    big_bytes: int  # one more shape: a flat input of this many bytes per dtype
    dtypes: tuple[torch.dtype, ...]
    ks: tuple[int, ...]  # the first is the reference K, the second the "K=40 within 10%" one
    reps: int
    min_reps: int
    compile_units: int = 1000  # at most this many units get a torch.compile measurement

    def shapes_for(self, dtype: torch.dtype) -> list[tuple[int, ...]]:
        element = torch.empty(0, dtype=dtype).element_size()
        return [*self.shapes, (self.big_bytes // element,)]


GPU_GRID = Grid(((64, 64, 32, 32), (64, 16, 32, 32)), 64 * MiB, (torch.float32, torch.bfloat16), (8, 40, 112), 40, 10)
DRY_GRID = Grid(((2, 3, 4, 5),), 4096, (torch.float32, torch.bfloat16), (2, 3), 3, 2, compile_units=1)


@dataclass(frozen=True)
class Unit:
    """Inputs of one measurement: shape, dtype, K, alignment."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    K: int
    aligned: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def bytes_moved(self, which: str) -> int:
        """Each input read once and each output written once: forward (K+1)·N, backward (2K+1)·N."""
        return ((self.K + 1) if which == "fwd" else (2 * self.K + 1)) * self.numel * self.element_size


def priority_order(grid: Grid, fastnas_providers: list[str]) -> list[tuple[str, Unit]]:
    """Every (provider, unit) in the order they are measured. First what the targets need: fastnas's
    backends on aligned inputs at the first K, at the second K, then misaligned at the first K; then
    eager and ``torch.compile`` at the first K, aligned, for context; then fastnas on the remaining
    cases, eager on them, and ``torch.compile`` last (aligned only: its compilations are the slowest
    part)."""
    k = grid.ks
    tiers = [(k[0], True), (k[1], True), (k[0], False)] if len(k) > 1 else [(k[0], True), (k[0], False)]
    tiers += [(K, aligned) for aligned in (True, False) for K in k if (K, aligned) not in tiers]
    units = [
        Unit(shape, dtype, K, aligned)
        for K, aligned in tiers
        for dtype in grid.dtypes
        for shape in grid.shapes_for(dtype)
    ]
    compiled = [u for u in units if u.aligned][: grid.compile_units]
    first = [u for u in units if (u.K, u.aligned) == tiers[0]]
    head = [u for u in units if (u.K, u.aligned) in tiers[:3]]
    order = [(p, u) for u in head for p in fastnas_providers]
    order += [("eager", u) for u in first] + [("compile", u) for u in first if u in compiled]
    order += [(p, u) for u in units if u not in head for p in fastnas_providers]
    order += [("eager", u) for u in units if u not in first]
    order += [("compile", u) for u in compiled if u not in first]
    return order


def rotation_sets(bytes_per_set: int, l2_bytes: int) -> int:
    """How many input sets to rotate over so that L2 does not serve a set from its last use."""
    wanted = max(2, math.ceil(L2_MULTIPLE * l2_bytes / max(bytes_per_set, 1)) + 1)
    return max(1, min(wanted, 64, MAX_SET_BYTES // max(bytes_per_set, 1)))


@dataclass
class InputSet:
    outputs: list[torch.Tensor]  # the K inputs
    leaves: list[torch.Tensor]  # the same memory as autograd leaves (for eager/compile backward)
    grad: torch.Tensor


def make_sets(unit: Unit, n_sets: int, device: str, seed: int = 0) -> list[InputSet]:
    """Random inputs (never zeros): aligned = K separate tensors; misaligned = slices of one stacked
    tensor that starts one element into its storage, so no input is 16-byte aligned."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=unit.dtype)

    sets = []
    for _ in range(n_sets):
        if unit.aligned:
            outputs = [randn(*unit.shape) for _ in range(unit.K)]
        else:
            flat = randn(unit.K * unit.numel + 1)
            outputs = list(flat[1:].view(unit.K, *unit.shape).unbind(0))
        leaves = [o.detach().requires_grad_() for o in outputs]
        sets.append(InputSet(outputs, leaves, randn(*unit.shape)))
    return sets


def eager_sum(outputs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum as every NAS code base writes it."""
    return sum(w * o for w, o in zip(weights, outputs))


# --------------------------------------------------------------------------- timers


@dataclass
class Sample:
    """Repetitions of one call: GPU microseconds (CPU in a dry run), host enqueue microseconds, the
    sleep queued before each, and the fraction of repetitions whose sleep outlasted the host."""

    times_us: list[float]
    host_us: list[float]
    sleep_us: float = 0.0
    covered: float = 1.0

    @property
    def median_us(self) -> float:
        return statistics.median(self.times_us)

    def summary(self) -> dict:
        q = statistics.quantiles(self.times_us, n=10) if len(self.times_us) >= 2 else [self.median_us] * 9
        return dict(
            median_us=round(self.median_us, 3),
            p10_us=round(q[0], 3),
            p90_us=round(q[-1], 3),
            reps=len(self.times_us),
            host_us=round(statistics.median(self.host_us), 2),
            sleep_us=round(self.sleep_us, 1),
            covered=round(self.covered, 3),
        )


Setup = Callable[[int], Callable[[], object]]  # rep index -> the call to time (untimed preparation done)


class CpuTimer:
    """Dry-run stand-in: host clock around each call."""

    def measure(self, setup: Setup, reps: int) -> Sample:
        times = []
        for i in range(reps):
            call = setup(i)
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e6)
        return Sample(times, times)


class GpuTimer:
    """CUDA events around each call with a sleep kernel queued before it (see the module docstring).

    Each repetition starts from an idle GPU (synchronised): the sleep starts as soon as it is
    queued, so when it lasts longer than the host takes to queue the call, every kernel of the call
    is queued before the sleep ends and the events bracket GPU work alone. That is checked per
    repetition (``covered``), and the measurement is repeated once with a longer sleep if it fails.
    """

    MAX_SLEEP_US = 20_000.0

    def cycles_per_us(self) -> float:
        """The sleep kernel's cycles per microsecond at the clock the GPU runs now (read every time:
        clocks move)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000)
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        torch.cuda.synchronize()
        return 1_000_000 / max(start.elapsed_time(end) * 1e3, 1e-3)

    def host_us(self, setup: Setup, reps: int = 3) -> float:
        """Host time to enqueue one call (no synchronisation), the largest of a few."""
        worst = 0.0
        for i in range(reps):
            call = setup(i)
            start = time.perf_counter()
            call()
            worst = max(worst, (time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        return worst

    def measure(self, setup: Setup, reps: int, sleep_us: float | None = None) -> Sample:
        if sleep_us is None:
            sleep_us = min(self.MAX_SLEEP_US, 3 * self.host_us(setup) + 50)
        cycles = int(sleep_us * self.cycles_per_us())
        marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(reps)]
        host = []
        for i, (before_sleep, start, end) in enumerate(marks):
            call = setup(i)
            torch.cuda.synchronize()  # an idle GPU and an empty queue: the host never waits on a full one
            before_sleep.record()
            torch.cuda._sleep(cycles)
            start.record()
            t0 = time.perf_counter()
            call()
            host.append((time.perf_counter() - t0) * 1e6)
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) * 1e3 for _, start, end in marks]
        slept = [before.elapsed_time(start) * 1e3 for before, start, _ in marks]
        covered = sum(s > 1.2 * h + 5 for s, h in zip(slept, host)) / reps
        sample = Sample(times, host, statistics.median(slept), covered)
        if covered < 0.9 and sleep_us < self.MAX_SLEEP_US:  # the host was slower than guessed: once more
            return self.measure(setup, reps, min(self.MAX_SLEEP_US, 4 * max(host) + 100))
        return sample


# --------------------------------------------------------------------------- the kernel stage


class BrokenContext(RuntimeError):
    """A CUDA error that leaves the context unusable (an illegal address, say)."""


class KernelStage:
    def __init__(self, dry: bool, deadline: Deadline, path: str):
        self.dry, self.deadline, self.path = dry, deadline, path
        self.device = device_for(dry)
        self.grid = DRY_GRID if dry else GPU_GRID
        self.timer = CpuTimer() if dry else GpuTimer()
        props = None if dry else torch.cuda.get_device_properties(0)
        self.l2_bytes = getattr(props, "L2_cache_size", 50 * MiB) if props else 0
        wanted = ("cpu", "reference") if dry else ("cuda", "triton")
        available = fastnas.available_backends(self.device)
        self.backends = [b for b in wanted if b in available]
        self.result = {
            "dry": dry,
            "label": DRY_LABEL if dry else "",
            "device": "cpu" if dry else torch.cuda.get_device_name(),
            "l2_bytes": self.l2_bytes,
            "backends": self.backends,
            "missing_backends": [b for b in wanted if b not in available],
            "method": (
                "host clock (dry run)"
                if dry
                else "CUDA events around each call after a sleep kernel covering the host's enqueue; "
                f"inputs rotated over >= {L2_MULTIPLE}x L2; medians"
            ),
            "rows": [],
            "copies": [],
            "not_reached": [],
            "stopped_by_budget": False,
        }
        self._unit: Unit | None = None
        self._sets: list[InputSet] = []
        self._weights: torch.Tensor | None = None
        self._copies: dict[tuple[int, torch.dtype], dict] = {}

    # inputs of the current unit, rebuilt when the unit changes
    def inputs(self, unit: Unit) -> tuple[list[InputSet], torch.Tensor]:
        if unit != self._unit:
            self._sets, self._unit = [], None
            self.empty_cache()
            n_sets = 1 if self.dry else rotation_sets((unit.K + 1) * unit.numel * unit.element_size, self.l2_bytes)
            self._sets = make_sets(unit, n_sets, self.device)
            gen = torch.Generator(device=self.device).manual_seed(1)
            self._weights = torch.softmax(torch.randn(unit.K, generator=gen, device=self.device), 0)
            self._unit = unit
        return self._sets, self._weights

    def empty_cache(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def reps_for(self, unit: Unit, which: str) -> int:
        """Fewer repetitions for the largest calls, so a measurement takes about 0.1 s of GPU time."""
        if self.dry:
            return self.grid.reps
        expected_us = unit.bytes_moved(which) / 3e12 * 1e6  # ~3 TB/s
        return int(min(self.grid.reps, max(self.grid.min_reps, 100_000 / max(expected_us, 1.0))))

    def copy(self, nbytes: int, dtype: torch.dtype) -> dict:
        """A device-to-device copy moving ``nbytes`` (half read, half written; at most 1 GiB copied:
        the copy's bandwidth is flat long before that), rotated like the inputs."""
        element = torch.empty(0, dtype=dtype).element_size()
        count = max(1, min(nbytes // 2, 1 << 30) // element)
        if (count, dtype) in self._copies:
            return self._copies[(count, dtype)]
        n_sets = 1 if self.dry else rotation_sets(2 * count * element, self.l2_bytes)
        gen = torch.Generator(device=self.device).manual_seed(2)
        sources = [torch.randn(count, generator=gen, device=self.device, dtype=dtype) for _ in range(n_sets)]
        targets = [torch.empty_like(s) for s in sources]

        def setup(i: int) -> Callable[[], object]:
            return lambda: targets[i % n_sets].copy_(sources[i % n_sets])

        setup(0)()
        moved = 2 * count * element
        sample = self.timer.measure(setup, self.grid.reps)
        row = dict(bytes=moved, sets=n_sets, **sample.summary())
        row["GBps"] = round(moved / sample.median_us / 1e3, 3)
        self._copies[(count, dtype)] = row
        self.result["copies"].append(row)
        return row

    def calls(self, provider: str, which: str, unit: Unit) -> Setup:
        sets, weights = self.inputs(unit)
        n = len(sets)
        if provider.startswith("fastnas-"):
            if which == "fwd":
                return lambda i: lambda s=sets[i % n]: torch.ops.fastnas.mixed_sum(s.outputs, weights)
            return lambda i: (
                lambda s=sets[i % n]: torch.ops.fastnas.mixed_sum_backward(s.grad, s.outputs, weights, True)
            )
        fn = eager_sum
        if provider == "compile":
            torch._dynamo.reset()  # a fresh compilation per unit: no recompile limit reached
            fn = torch.compile(eager_sum, dynamic=False, backend="eager" if self.dry else "inductor")
        if which == "fwd":
            return lambda i: lambda s=sets[i % n]: fn(s.outputs, weights)
        leaf_weights = weights.detach().requires_grad_()

        def backward(i: int) -> Callable[[], object]:
            s = sets[i % n]
            y = fn(s.leaves, leaf_weights)  # the forward, untimed
            return lambda: torch.autograd.grad(y, [leaf_weights, *s.leaves], s.grad)

        return backward

    def measure(self, provider: str, unit: Unit) -> None:
        """Forward and backward of one provider on one unit, each a row of the results."""
        rows = self.result["rows"]
        for which in ("fwd", "bwd"):
            row = dict(
                provider=provider,
                **{"pass": which},
                shape=list(unit.shape),
                dtype=str(unit.dtype).removeprefix("torch."),
                K=unit.K,
                aligned=unit.aligned,
                bytes=unit.bytes_moved(which),
            )
            try:
                setup = self.calls(provider, which, unit)
                start = time.perf_counter()
                setup(0)()  # compile, autotune, first allocations: outside the timing
                setup(1)()
                if not self.dry:
                    torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - start, 3)
                sample = self.timer.measure(setup, self.reps_for(unit, which))
                row.update(sample.summary(), sets=len(self._sets))
                row["GBps"] = round(row["bytes"] / sample.median_us / 1e3, 3)
                copy = self.copy(row["bytes"], unit.dtype)
                row["copy_GBps"] = copy["GBps"]
                row["of_copy"] = round(row["GBps"] / copy["GBps"], 3)
            except Exception as exc:  # one failed measurement must not end the stage
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                rows.append(row)
                if "CUDA error" in row["error"] or "illegal" in row["error"]:
                    raise BrokenContext(f"{provider} {which} {describe(unit)}: {row['error']}") from exc
                self._sets, self._unit = [], None
                self.empty_cache()
                continue
            rows.append(row)

    def run(self) -> int:
        providers = [f"fastnas-{b}" for b in self.backends]
        order = priority_order(self.grid, providers)
        self.result["planned"] = len(order) * 2
        for index, (provider, unit) in enumerate(order):
            needed = 25.0 if provider == "compile" and not self.dry else 3.0
            if self.deadline.left() < needed:
                self.result["stopped_by_budget"] = True
                self.result["not_reached"] = [f"{p} {describe(u)}" for p, u in order[index:]]
                break
            backend = provider.removeprefix("fastnas-") if provider.startswith("fastnas-") else None
            fastnas.set_backend(backend)
            try:
                self.measure(provider, unit)
            except BrokenContext as exc:  # every later call would fail too
                self.result["fatal"] = f"the CUDA context broke at {exc}"
                write_json(self.path, self.result)
                print(self.result["fatal"], file=sys.stderr)
                return 1
            finally:
                fastnas.set_backend(None)
            write_json(self.path, self.result)
            print(f"[{self.deadline.seconds - self.deadline.left():6.1f}s] {provider} {describe(unit)}", flush=True)
        write_json(self.path, self.result)
        return EXIT_BUDGET_SPENT if self.result["stopped_by_budget"] else 0


def describe(unit: Unit) -> str:
    return (
        f"{'x'.join(map(str, unit.shape))} {str(unit.dtype).removeprefix('torch.')} K={unit.K} "
        f"{'aligned' if unit.aligned else 'misaligned'}"
    )


# --------------------------------------------------------------------------- the host stage

HOST_CASES = ((2, 16, 8, 8), (8, 40))  # tiny tensors: the GPU's work is a few microseconds


def host_stage(dry: bool, deadline: Deadline, path: str) -> int:
    device = device_for(dry)
    shape, ks = HOST_CASES
    calls_per_loop, loops = (20, 3) if dry else (100, 7)
    wanted = ("cpu", "reference") if dry else ("cuda", "triton", "reference")
    available = fastnas.available_backends(device)
    result = {
        "dry": dry,
        "label": DRY_LABEL if dry else "",
        "device": "cpu" if dry else torch.cuda.get_device_name(),
        "shape": list(shape),
        "method": (
            f"host: {calls_per_loop} forward+backward calls back to back, no synchronisation, median of "
            f"{loops} loops; device: "
            + ("the host clock around a call (dry run)" if dry else "CUDA events after a covering sleep, median")
        ),
        "rows": [],
        "missing_backends": [b for b in wanted if b not in available],
        "stopped_by_budget": False,
    }
    timer = CpuTimer() if dry else GpuTimer()
    providers = [f"fastnas-{b}" for b in wanted if b in available] + ["eager"]
    for K in ks:
        unit = Unit(shape, torch.float32, K, True)
        s = make_sets(unit, 1, device)[0]
        weights = torch.softmax(torch.randn(K, device=device), 0).requires_grad_()
        for provider in providers:
            if deadline.left() < 2:
                result["stopped_by_budget"] = True
                break
            backend = provider.removeprefix("fastnas-") if provider != "eager" else None
            fn = eager_sum if provider == "eager" else fastnas.mixed_sum
            row = dict(provider=provider, K=K, dtype="float32")
            fastnas.set_backend(backend)
            try:

                def call(s=s, fn=fn, weights=weights) -> object:
                    return torch.autograd.grad(fn(s.leaves, weights), [weights, *s.leaves], s.grad)

                for _ in range(5):
                    call()
                loop_us = []
                for _ in range(loops):
                    if not dry:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(calls_per_loop):
                        call()
                    loop_us.append((time.perf_counter() - start) * 1e6 / calls_per_loop)
                if not dry:
                    torch.cuda.synchronize()
                gpu = timer.measure(lambda i: call, 30 if not dry else 3)
                row.update(host_us=round(statistics.median(loop_us), 2), gpu_us=round(gpu.median_us, 2))
                row["host_over_gpu"] = round(row["host_us"] / max(row["gpu_us"], 1e-3), 2)
                row["covered"] = gpu.covered
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                fastnas.set_backend(None)
            result["rows"].append(row)
            write_json(path, result)
    write_json(path, result)
    return EXIT_BUDGET_SPENT if result["stopped_by_budget"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["kernels", "host"])
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)
    if args.stage == "host":
        return host_stage(args.dry, deadline, args.json)
    return KernelStage(args.dry, deadline, args.json).run()


if __name__ == "__main__":
    sys.exit(main())
