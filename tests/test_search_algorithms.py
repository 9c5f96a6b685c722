"""Every search algorithm runs an epoch of a tiny search, in ERM and bilevel form, on both spaces."""

from __future__ import annotations

import math

import pytest
import torch
from search_helpers import TINY, load_checkpoint, tiny_cells

from fastnas.search import ALGORITHMS, SearchConfig, run_search
from fastnas.search.algorithms import gumbel_tau, make_arch_optimizer
from fastnas.search.loop import build_network
from fastnas.spaces import darts, nb201

# every algorithm on every space it supports, in both forms on NAS-Bench-201 and on the DARTS space
# for the PC-DARTS family (DARTS space only); the slower DARTS supernet runs the others in bilevel form
CASES = [
    (alg, space, mode)
    for alg, a in ALGORITHMS.items()
    for space in ("nb201", "darts")
    for mode in ("erm", "bilevel")
    if space in a.spaces
    and not (a.second_order and mode == "erm")
    and not (space == "darts" and mode == "erm" and a.partial_channels == 1)
]


def _arch_state(out: str) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out)
    names = [k for k in ckpt["model"] if k.split(".")[-1].startswith(("alphas", "betas"))]
    return {k: ckpt["model"][k] for k in names}


@pytest.mark.parametrize("alg,space,mode", CASES, ids=["-".join(c) for c in CASES])
def test_algorithm_runs_an_epoch(tmp_path, alg, space, mode):
    a = ALGORITHMS[alg]
    cfg = SearchConfig(
        space=space,
        algorithm=alg,
        mode=mode,
        out=str(tmp_path),
        epochs=1,
        cells=tiny_cells(space),
        log=lambda s: None,
        **TINY,
    )
    # the architecture before training: the same seed builds the same network
    torch.manual_seed(cfg.seed)
    net0 = build_network(cfg, a, 10, 1)
    before = {n: p.detach().clone() for n, p in net0.named_parameters() if any(p is q for q in net0.arch_parameters())}

    result = run_search(cfg)

    (record,) = result["history"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "entropy", "images_per_sec"):
        assert math.isfinite(record[key]), key
    after = _arch_state(str(tmp_path))
    assert set(after) == set(before)
    moved = any(not torch.equal(after[k], before[k]) for k in before)
    if a.arch_optimizer is None:  # rs-ws: nothing learnt; the answer is the best of the random cells
        assert not moved
        assert 0.0 <= result["rs_ws_selection_acc"] <= 100.0
    else:
        assert moved, "the architecture step did not move the architecture parameters"
    if a.arch == "simplex":
        net = build_network(cfg, a, 10, 1)
        for k, w in after.items():
            assert torch.isfinite(w).all() and (w >= 0).all()
            p = dict(net.named_parameters())[k]
            seg = net.arch_simplex_segments(p)
            parts = [w] if seg is None else list(torch.split(w, list(seg), -1))
            for part in parts:
                torch.testing.assert_close(part.sum(-1), torch.ones(part.shape[:-1]))
    # the exported architecture parses back
    if space == "nb201":
        assert nb201.parse_arch_string(result["arch"])
    else:
        assert darts.parse_genotype(result["arch"])
    if a.gumbel_tau is not None:
        assert record["tau"] == pytest.approx(10.0)


def test_gdas_temperature_schedule():
    a = ALGORITHMS["gdas"]
    taus = [gumbel_tau(a, e, 5) for e in range(5)]
    assert taus[0] == 10.0 and taus[-1] == pytest.approx(0.1)
    assert all(t1 > t2 for t1, t2 in zip(taus, taus[1:]))
    assert gumbel_tau(ALGORITHMS["darts"], 0, 5) is None


def test_arch_optimizers_and_defaults():
    cfg = SearchConfig(space="darts", channels=4, cells=3)
    net = build_network(cfg, ALGORITHMS["gaea-pc-darts"], 10, 1)
    opt = make_arch_optimizer(ALGORITHMS["gaea-pc-darts"], net)
    segs = sorted((g["segments"] or ()) for g in opt.param_groups)
    assert segs == [(), (2, 3, 4, 5)] and all(g["lr"] == 0.1 for g in opt.param_groups)
    net = build_network(cfg, ALGORITHMS["darts"], 10, 1)
    opt = make_arch_optimizer(ALGORITHMS["darts"], net)
    assert isinstance(opt, torch.optim.Adam)
    g = opt.param_groups[0]
    assert g["lr"] == 3e-4 and g["betas"] == (0.5, 0.999) and g["weight_decay"] == 1e-3
    assert make_arch_optimizer(ALGORITHMS["rs-ws"], net) is None


def test_bf16_autocast_keeps_float32_architecture(tmp_path):
    cfg = SearchConfig(
        space="nb201",
        algorithm="gaea-darts",
        mode="erm",
        out=str(tmp_path),
        epochs=1,
        cells=1,
        amp="bf16",
        log=lambda s: None,
        **TINY,
    )
    result = run_search(cfg)
    assert math.isfinite(result["history"][0]["train_loss"])
    for w in _arch_state(str(tmp_path)).values():
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
