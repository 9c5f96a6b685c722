"""How steps run: no host reads inside a step, --compile, the static buffers of --cuda-graphs (on CPU).

The compile tests trace with dynamo's ``eager`` backend (``FASTNAS_COMPILE_BACKEND``): an inductor
compile of even a tiny supernet takes minutes on a 2-core machine; only NAS-Bench-201 cells are
traced (a DARTS cell is ~700 calls to trace). The CUDA graph capture itself is tested on a GPU, in
``tests/test_cuda_graph_steps.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
from search_helpers import assert_same_state, expect_one_line_error, load_checkpoint
from step_helpers import compute_every_op, tiny_search, tiny_train
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import NB201_ARCH

from fastnas.runs import engine
from fastnas.runs.batches import EpochBatches, Normalizer, epoch_batches
from fastnas.runs.config import RunError
from fastnas.runs.data import load_dataset
from fastnas.runs.steps import COMPILE_BACKEND_ENV, CapturedStep, check_cuda_graphs
from fastnas.search import ALGORITHMS, SearchConfig
from fastnas.search import loop as search_loop
from fastnas.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- host reads

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


class _HostOps(TorchDispatchMode):
    """ATen calls that read a value on the host, or build a tensor from host data, counted into
    ``active[-1]`` unless ``ignore(tensor)``."""

    def __init__(self, active: list[Counter], ignore) -> None:
        super().__init__()
        self.active, self.ignore = active, ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy") and not self.ignore(args[0]):
            self.active[-1][name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts, during each step of ``EpochRun.train_steps`` and during the rest of it, the calls of
    ``Tensor.item/tolist/__float__/__int__/__bool__/__index__`` (patched) and of the ATen ops behind
    them and behind ``torch.tensor``. Not counted: tensors in an optimizer's state (Adam's step
    count, which lives on the host unless capturable), and ``F.one_hot``'s check of its indices,
    which reads their range on the host on CPU only (on CUDA its scatter checks them on the device).
    Yields ``(per_step, outside)``: a Counter per step, and one for the epoch loop around the steps."""
    per_step: list[Counter] = []
    outside = Counter()
    active: list[Counter] = []
    host_state: set[int] = set()
    in_one_hot = []

    def ignore(t) -> bool:
        return not active or bool(in_one_hot) or id(t) in host_state

    one_hot = torch.nn.functional.one_hot

    def unchecked_one_hot(*args, **kwargs):
        in_one_hot.append(True)
        try:
            return one_hot(*args, **kwargs)
        finally:
            in_one_hot.pop()

    monkeypatch.setattr(torch.nn.functional, "one_hot", unchecked_one_hot)

    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if not ignore(self):
                active[-1][_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    real_train_steps = engine.EpochRun.train_steps

    def train_steps(self, epoch, steps, step):
        def counted_step(i):
            host_state.clear()
            for opt in (getattr(self, "a_opt", None), self.w_opt):
                for st in opt.state.values() if opt is not None else ():
                    host_state.update(id(v) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() == 0)
            per_step.append(Counter())
            active.append(per_step[-1])
            try:
                return step(i)
            finally:
                active.pop()

        active.append(outside)
        try:
            with _HostOps(active, ignore):
                return real_train_steps(self, epoch, steps, counted_step)
        finally:
            active.pop()

    monkeypatch.setattr(engine.EpochRun, "train_steps", train_steps)
    return per_step, outside


HOST_READ_CASES = [
    ("gaea-darts", "bilevel", "nb201"),
    ("darts-2nd", "bilevel", "nb201"),
    ("gdas", "erm", "nb201"),
    ("rs-ws", "bilevel", "nb201"),
    ("gaea-pc-darts", "bilevel", "darts"),
]


@pytest.mark.parametrize("algorithm, mode, space", HOST_READ_CASES, ids=["-".join(c) for c in HOST_READ_CASES])
def test_no_host_reads_inside_search_steps(tmp_path, monkeypatch, host_reads, algorithm, mode, space):
    """Every op computed (samplers would read their sample on the host otherwise): after the first
    step (GAEA checks its parameters once, optimizers create their state) a step reads nothing on
    the host and builds no tensor from host data; the epoch loop reads its sums once."""
    compute_every_op(monkeypatch)
    per_step, outside = host_reads
    tiny_search(tmp_path, algorithm, mode, space)
    assert len(per_step) == 3
    assert all(not c for c in per_step[1:]), per_step
    assert outside == Counter(tolist=1), outside  # the epoch's loss and accuracy, read at its end


def test_sampled_ops_read_their_sample_on_the_host(tmp_path, host_reads):
    """The default GDAS forward computes only the sampled ops and reads each sample once on the
    host: one ``tolist`` per architecture parameter of op weights per forward (bilevel: 2 forwards)."""
    per_step, _ = host_reads
    tiny_search(tmp_path, "gdas", "bilevel", "darts")
    for counts in per_step[1:]:
        assert counts["tolist"] == 2 * 2 and set(counts) <= {"tolist", "_local_scalar_dense"}, counts


def test_no_host_reads_inside_train_steps(tmp_path, host_reads):
    per_step, outside = host_reads
    tiny_train(tmp_path, limit_batches=3)
    assert len(per_step) == 3 and all(not c for c in per_step[1:]), per_step
    assert outside == Counter(tolist=1), outside


def test_epoch_batches_slice_normalise_and_split():
    """Batches of the epoch's images: the rank's slice, normalised as ImageData.normalize does,
    cut into micro-batches; the augmentation and the mask drawn batch after batch."""
    data = load_dataset("digits")
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    norm = Normalizer(data, torch.device("cpu"))
    batches = epoch_batches(data, order, 3, 8, norm, rank=1, world=2, accum_steps=2)
    assert len(batches) == 3
    (x0, y0), (x1, y1) = batches[2]
    idx = order[16:24][4:]
    torch.testing.assert_close(torch.cat([x0, x1]), data.normalize(data.x_train[idx]), rtol=0, atol=0)
    assert torch.equal(torch.cat([y0, y1]), data.y_train[idx])
    with pytest.raises(IndexError):
        batches[3]
    calls = []

    def augment(x, gen):
        calls.append(("augment", len(x)))
        return x + 1

    def mask(x, gen):
        calls.append(("mask", len(x)))
        return torch.zeros(len(x), 1, *x.shape[2:], dtype=torch.bool)

    gen = torch.Generator()
    batches = epoch_batches(data, order, 2, 8, norm, gen, augment=augment, cutout_mask=mask)
    assert calls == [("augment", 8), ("mask", 8)] * 2
    assert isinstance(batches, EpochBatches) and (batches[1][0][0] == 0).all()


# --------------------------------------------------------------------------- --compile


@pytest.fixture
def traced(monkeypatch):
    """--compile traces with dynamo's eager backend (no code generation); dynamo starts afresh."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


def assert_models_close(a: dict, b: dict, atol: float) -> None:
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_search_matches_eager_and_resumes_bit_identically(tmp_path, monkeypatch, traced):
    """GDAS (ERM) with --compile: one graph per cell shape (3) and no other, results those of the eager
    search computing every op, and a run stopped and resumed equals the uninterrupted one bit for bit."""
    kw = dict(epochs=2, limit_batches=2)
    full = tiny_search(tmp_path / "full", "gdas", "erm", compile=True, **kw)
    assert traced["stats"]["unique_graphs"] == 3, dict(traced["stats"])
    tiny_search(tmp_path / "part", "gdas", "erm", compile=True, stop_after=1, **kw)
    tiny_search(tmp_path / "part", "gdas", "erm", compile=True, resume=True, **kw)
    assert traced["stats"]["unique_graphs"] == 3  # new networks, the same graphs
    assert_same_state(load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "part")))
    compute_every_op(monkeypatch)
    eager = tiny_search(tmp_path / "eager", "gdas", "erm", **kw)
    for got, want in zip(full["history"], eager["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    a, b = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "eager"))
    assert_models_close(a["model"], b["model"], atol=1e-5)


def test_compiled_second_order_search(tmp_path, traced):
    """darts-2nd's unrolled step through compiled cells: one graph per cell shape with the
    architecture's gradient and one without (the weight step), the eager search's result."""
    compiled = tiny_search(tmp_path / "compiled", "darts-2nd", "bilevel", compile=True)
    assert traced["stats"]["unique_graphs"] == 2 * 3, dict(traced["stats"])
    eager = tiny_search(tmp_path / "eager", "darts-2nd", "bilevel")
    assert compiled["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-5)
    a, b = load_checkpoint(str(tmp_path / "compiled")), load_checkpoint(str(tmp_path / "eager"))
    assert_models_close(a["model"], b["model"], atol=1e-5)


def test_compiled_train(tmp_path, traced):
    """train --compile: the whole network in one graph (evaluation runs eagerly), the eager result."""
    compiled = tiny_train(tmp_path / "compiled", compile=True, epochs=2)
    assert traced["stats"]["unique_graphs"] == 1, dict(traced["stats"])
    eager = tiny_train(tmp_path / "eager", epochs=2)
    for got, want in zip(compiled["history"], eager["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["test_acc"] == pytest.approx(want["test_acc"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_compiled_search_under_ddp(tmp_path):
    """Two gloo ranks, compiled cells inside DDP, GAEA-GDAS (ERM): the ranks finish with the same
    architecture (the trainer compares it bit for bit after every epoch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **{COMPILE_BACKEND_ENV: "eager"})
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastnas", "search",
        "--algorithm", "gaea-gdas", "--mode", "erm", "--epochs", "1", "--batch-size", "16", "--channels", "4",
        "--limit-batches", "2", "--no-progress", "--compile", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    torch.manual_seed(0)  # the run's seed: its initial architecture
    cfg = SearchConfig(algorithm="gaea-gdas", channels=4, cells=1)
    before = search_loop.build_network(cfg, ALGORITHMS["gaea-gdas"], 10, 1).alphas.detach()
    after = load_checkpoint(str(out))["model"]["alphas"]
    assert not torch.equal(after, before), "no architecture step"
    torch.testing.assert_close(after.sum(-1), torch.ones(after.shape[0]))


# --------------------------------------------------------------------------- --cuda-graphs


@pytest.fixture
def static_buffers(monkeypatch):
    """--cuda-graphs on CPU: the step functions run on their static buffers, uncaptured."""
    monkeypatch.setattr(engine, "check_cuda_graphs", lambda *args: None)


@pytest.mark.parametrize("algorithm, mode", [("gaea-darts", "bilevel"), ("darts-2nd", "bilevel"), ("darts", "erm")])
def test_static_buffer_steps_equal_plain_steps(tmp_path, static_buffers, algorithm, mode):
    """The steps --cuda-graphs captures, run on their static buffers, give the plain run's result
    bit for bit over two epochs (the buffers are refilled every step, the steps reset every epoch)."""
    kw = dict(epochs=2, limit_batches=3)
    tiny_search(tmp_path / "plain", algorithm, mode, **kw)
    tiny_search(tmp_path / "static", algorithm, mode, cuda_graphs=True, **kw)
    assert_same_state(load_checkpoint(str(tmp_path / "plain")), load_checkpoint(str(tmp_path / "static")))


def test_static_buffer_train_steps_equal_plain_steps(tmp_path, static_buffers):
    tiny_train(tmp_path / "plain", epochs=2)
    tiny_train(tmp_path / "static", epochs=2, cuda_graphs=True)
    assert_same_state(load_checkpoint(str(tmp_path / "plain")), load_checkpoint(str(tmp_path / "static")))


def test_captured_step_copies_its_arguments_into_static_buffers():
    seen = []

    def fn(batch, scale):
        seen.append(batch[0]["x"])
        return batch[0]["x"] * scale + batch[1]

    step = CapturedStep(fn, capture=False)
    a = step([{"x": torch.ones(3)}, torch.zeros(3)], 2.0)
    b = step([{"x": torch.full((3,), 5.0)}, torch.ones(3)], 2.0)
    assert a.tolist() == [2.0] * 3 and b.tolist() == [11.0] * 3
    assert seen[0] is seen[1]  # one static buffer, refilled
    assert step.eager_calls == 2 and step.graph is None
    with pytest.raises(ValueError, match="changed from 2.0 to 3.0"):
        step([{"x": torch.ones(3)}, torch.zeros(3)], 3.0)
    with pytest.raises(ValueError, match="changed"):
        step([{"x": torch.ones(4)}, torch.zeros(3)], 2.0)
    with pytest.raises(ValueError, match="structure"):
        step([{"y": torch.ones(3)}, torch.zeros(3)], 2.0)


def test_cuda_graphs_refusals(tmp_path, capsys):
    """--cuda-graphs: one line naming what it needs, before anything is written."""
    args = ["--out", str(tmp_path / "run"), "--cuda-graphs", "--epochs", "1"]
    expect_one_line_error("search", args, capsys, "--cuda-graphs needs a CUDA device")
    expect_one_line_error("train", [*args, "--arch", NB201_ARCH], capsys, "--cuda-graphs needs a CUDA device")
    expect_one_line_error("rank", args, capsys, "--cuda-graphs needs a CUDA device")
    assert not (tmp_path / "run").exists()
    cuda = torch.device("cuda", 0)
    with pytest.raises(RunError, match="one process"):
        check_cuda_graphs(cuda, 2, "none")
    with pytest.raises(RunError, match="fp16"):
        check_cuda_graphs(cuda, 1, "fp16")
    check_cuda_graphs(cuda, 1, "bf16")


def test_compile_and_cuda_graphs_do_not_define_a_run():
    """--resume may switch --compile and --cuda-graphs (how steps run, not what they compute)."""
    for cfg in (SearchConfig(compile=True, cuda_graphs=True), TrainConfig(compile=True, cuda_graphs=True)):
        assert not {"compile", "cuda_graphs"} & set(cfg.run_defining())
