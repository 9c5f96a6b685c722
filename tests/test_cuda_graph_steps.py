"""On a CUDA GPU: the run steps captured in CUDA graphs (``--cuda-graphs``) give the results of the
same steps run uncaptured and of the plain eager run, and eager steps never synchronise with the
host (``torch.cuda.set_sync_debug_mode``).

Skipped without CUDA; the GPU check (``benchmarks/gpu_check.sh``) runs this file. Tiny networks and
a few steps: well under a minute on one GPU. On CPU, ``tests/test_runs_steps.py`` checks the same
step functions on their static buffers, uncaptured.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from search_helpers import load_checkpoint
from step_helpers import compute_every_op, tiny_search, tiny_train

from fastnas.__main__ import main
from fastnas.runs import engine
from fastnas.runs.steps import COMPILE_BACKEND_ENV, CapturedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 4  # per epoch: two eager warm-up steps, the capture, a replay (the next epoch: capture, 3 replays)


def search(out, algorithm: str, mode: str, space: str = "nb201", **kw) -> dict:
    return tiny_search(out, algorithm, mode, space, **{"limit_batches": STEPS, "epochs": 2, "device": "cuda", **kw})


def train(out, **kw) -> dict:
    return tiny_train(out, **{"limit_batches": STEPS, "epochs": 2, "device": "cuda", **kw})


@pytest.fixture
def every_op_computed(monkeypatch) -> None:
    compute_every_op(monkeypatch)


class StepKinds:
    """The CapturedSteps the runs make; ``capture = False`` makes them run uncaptured (the same code,
    static buffers and optimizer settings as captured steps, without the graphs)."""

    def __init__(self, monkeypatch) -> None:
        self.made: list[CapturedStep] = []
        self.capture = True
        kinds = self

        class Recorded(CapturedStep):
            def __init__(self, fn, capture: bool, **kwargs) -> None:
                super().__init__(fn, capture=capture and kinds.capture, **kwargs)
                kinds.made.append(self)

        monkeypatch.setattr(engine, "CapturedStep", Recorded)

    def captures(self) -> int:
        return sum(s.captures for s in self.made)


@pytest.fixture
def step_kinds(monkeypatch) -> StepKinds:
    return StepKinds(monkeypatch)


def assert_models_close(a_out, b_out, rtol: float, atol: float) -> None:
    """Every floating-point tensor of the two runs' networks (weights, architecture parameters,
    BatchNorm statistics) within the tolerances."""
    ma, mb = load_checkpoint(str(a_out))["model"], load_checkpoint(str(b_out))["model"]
    assert set(ma) == set(mb)
    for name in ma:
        if ma[name].is_floating_point():
            torch.testing.assert_close(ma[name], mb[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_histories_close(a: dict, b: dict, rtol: float) -> None:
    assert len(a["history"]) == len(b["history"])
    for got, want in zip(a["history"], b["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=rtol)


def test_captured_step_replays_new_arguments():
    """A captured SGD step of a linear layer, fed new data every call (copied into its static
    buffers), equals the eager step over six calls, a reset (new capture) included."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(8, 4).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]

    def step_of(net, opt):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    captured, eager = CapturedStep(step_of(nets[0], opts[0]), capture=True), step_of(nets[1], opts[1])
    for i in range(6):
        x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
        torch.testing.assert_close(captured(x, y), eager(x, y))
        if i == 3:
            captured.reset()
    assert captured.eager_calls == 2 and captured.captures == 2
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q)


# DARTS (softmax, Adam), GAEA (simplex), DARTS' unrolled step, GDAS bilevel (samples as graph
# inputs) and GDAS ERM (the architecture stepped inside the weight step)
CASES = [("darts", "bilevel"), ("gaea-darts", "bilevel"), ("darts-2nd", "bilevel"), ("gdas", "bilevel")]
CASES += [("gdas", "erm")]


@pytest.mark.parametrize("algorithm, mode", CASES, ids=["-".join(c) for c in CASES])
def test_search_steps_replayed_equal_uncaptured(tmp_path, every_op_computed, step_kinds, algorithm, mode):
    """NAS-Bench-201, two epochs of four steps (a capture per kind of step and epoch, five replays):
    the weights, architecture parameters and losses of the replayed steps are those of the same
    steps run uncaptured, within float32 rounding."""
    graphs = search(tmp_path / "graphs", algorithm, mode, cuda_graphs=True)
    assert step_kinds.captures() == 2 * (1 + (mode == "bilevel"))
    step_kinds.capture = False
    uncaptured = search(tmp_path / "uncaptured", algorithm, mode, cuda_graphs=True)
    assert_histories_close(graphs, uncaptured, rtol=1e-5)
    assert_models_close(tmp_path / "graphs", tmp_path / "uncaptured", rtol=1e-5, atol=1e-6)


def test_search_cli_with_cuda_graphs_resumes_an_eager_run(tmp_path, every_op_computed, step_kinds):
    """``fastnas search --cuda-graphs`` end to end: GDAS stopped after an eager epoch, resumed with
    CUDA graphs (Adam's step counts move to the device) for the last, against the eager run."""
    common = ["--algorithm", "gdas", "--epochs", "2", "--device", "cuda", "--batch-size", "16", "--channels", "4"]
    common += ["--cells", "1", "--limit-batches", str(STEPS), "--no-progress", "--rs-samples", "0"]
    out, plain = tmp_path / "run", tmp_path / "plain"
    assert main(["search", *common, "--out", str(plain)]) == 0
    assert main(["search", *common, "--out", str(out), "--stop-after", "1"]) == 0
    assert main(["search", "--out", str(out), "--resume", "--cuda-graphs", "--device", "cuda"]) == 0
    assert step_kinds.captures() == 2  # the arch step and the weight step of epoch 2
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and (out / "arch.txt").read_text().strip() == result["arch"]
    history = json.loads((out / "history.json").read_text())
    want = json.loads((plain / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for got, ref in zip(history, want):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    assert_models_close(out, plain, rtol=1e-4, atol=1e-5)


def test_train_steps_replayed_equal_uncaptured(tmp_path, step_kinds):
    graphs = train(tmp_path / "graphs", cuda_graphs=True)
    assert [s.captures for s in step_kinds.made] == [2]
    step_kinds.capture = False
    uncaptured = train(tmp_path / "uncaptured", cuda_graphs=True)
    assert_histories_close(graphs, uncaptured, rtol=1e-5)
    assert_models_close(tmp_path / "graphs", tmp_path / "uncaptured", rtol=1e-5, atol=1e-6)


def test_compiled_cells_inside_cuda_graphs(tmp_path, monkeypatch, step_kinds):
    """--compile --cuda-graphs: the compiled cells (AOTAutograd without code generation: forward and
    backward graphs) replay inside the captured steps, with the uncompiled replay's result."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    try:
        compiled = search(tmp_path / "compiled", "gdas", "erm", compile=True, cuda_graphs=True)
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = limit
    assert step_kinds.captures() == 2
    plain = search(tmp_path / "plain", "gdas", "erm", cuda_graphs=True)
    assert_histories_close(compiled, plain, rtol=1e-4)
    assert_models_close(tmp_path / "compiled", tmp_path / "plain", rtol=1e-4, atol=1e-5)


@pytest.fixture
def no_sync_in_steps(monkeypatch):
    """Every step after a run's first (GAEA checks its parameters once on the host) runs under
    ``torch.cuda.set_sync_debug_mode("error")``: a synchronising call, a host read or a copy of
    host data raises."""
    real = engine.EpochRun.train_steps
    checked = []

    def train_steps(self, epoch, steps, step):
        def strict(i):
            if epoch == 0 and i == 0:
                return step(i)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(i)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                checked.append(i)

        return real(self, epoch, steps, strict)

    monkeypatch.setattr(engine.EpochRun, "train_steps", train_steps)
    return checked


SYNC_CASES = [("gaea-darts", "bilevel", "nb201"), ("darts-2nd", "bilevel", "nb201"), ("gdas", "erm", "nb201")]
SYNC_CASES += [("gdas", "bilevel", "nb201"), ("gaea-pc-darts", "bilevel", "darts")]


@pytest.mark.parametrize("algorithm, mode, space", SYNC_CASES, ids=["-".join(c) for c in SYNC_CASES])
def test_search_steps_never_synchronise(tmp_path, every_op_computed, no_sync_in_steps, algorithm, mode, space):
    search(tmp_path, algorithm, mode, space, epochs=1)
    assert len(no_sync_in_steps) == STEPS - 1


def test_train_steps_never_synchronise(tmp_path, no_sync_in_steps):
    train(tmp_path, epochs=1)
    assert len(no_sync_in_steps) == STEPS - 1
