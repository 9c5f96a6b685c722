"""fastnas.optim.GAEA against the exponentiated-gradient formula of GAEA's reference code."""

from __future__ import annotations

import pytest
import torch

from fastnas.optim import GAEA, simplex_normalize

SEGMENTS = (2, 3, 4, 5)


def _reference_rows(theta: torch.Tensor, grad: torch.Tensor, lr: float, floor: float = 1e-5, lam: float = 0.0):
    """theta * exp(-lr * (grad + lam * (log theta + 1))), clamped at floor, divided by the row sum."""
    g = grad + lam * (torch.log(theta) + 1.0)
    x = (theta * torch.exp(-lr * g)).clamp_min(floor)
    return x / x.sum(-1, keepdim=True)


def _reference_segments(theta: torch.Tensor, grad: torch.Tensor, lr: float, segments, floor: float = 1e-5):
    x = (theta * torch.exp(-lr * grad)).clamp_min(floor)
    return torch.cat([s / s.sum(-1, keepdim=True) for s in torch.split(x, list(segments), -1)], -1)


def _random_simplex(*shape, dtype=torch.float64, segments=None, gen=None):
    return simplex_normalize(torch.rand(*shape, dtype=dtype, generator=gen) + 0.05, segments=segments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_update_matches_formula(dtype, lam):
    gen = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (14, 8), (3, 1, 7), (4,)]
    params = [torch.nn.Parameter(_random_simplex(*s, dtype=dtype, gen=gen)) for s in shapes]
    opt = GAEA(params, lr=0.7, entropy_weight=lam)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, dtype=dtype, generator=gen) * 2
        opt.step()
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        for p, b in zip(params, before):
            torch.testing.assert_close(p.detach(), _reference_rows(b, p.grad, 0.7, lam=lam), **tol)


def test_floor_applies_before_normalisation():
    theta = torch.nn.Parameter(torch.tensor([[0.5, 0.5, 1e-9], [0.25, 0.25, 0.5]], dtype=torch.float64))
    opt = GAEA([theta], lr=1.0, floor=1e-3)
    theta.grad = torch.tensor([[0.0, 30.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    ref = _reference_rows(theta.detach().clone(), theta.grad, 1.0, floor=1e-3)
    opt.step()
    torch.testing.assert_close(theta.detach(), ref)
    # clamped entries are floor / row sum: 1e-3 / (0.5 + 2e-3)
    assert theta[0, 1].item() == pytest.approx(1e-3 / 0.502)


def test_grouped_segments_match_formula_and_mix_with_rows():
    gen = torch.Generator().manual_seed(2)
    alphas = torch.nn.Parameter(_random_simplex(14, 8, gen=gen))
    betas = [torch.nn.Parameter(_random_simplex(14, gen=gen, segments=SEGMENTS)) for _ in range(2)]
    opt = GAEA([{"params": [alphas]}, {"params": betas, "segments": SEGMENTS}], lr=0.1)
    for _ in range(4):
        before = [t.detach().clone() for t in (alphas, *betas)]
        for t in (alphas, *betas):
            t.grad = torch.randn(t.shape, dtype=t.dtype, generator=gen) * 5
        opt.step()
        torch.testing.assert_close(alphas.detach(), _reference_rows(before[0], alphas.grad, 0.1))
        for b, b0 in zip(betas, before[1:]):
            torch.testing.assert_close(b.detach(), _reference_segments(b0, b.grad, 0.1, SEGMENTS))
            for s in torch.split(b.detach(), list(SEGMENTS)):
                assert s.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stays_on_simplex_under_adversarial_gradients(dtype):
    gen = torch.Generator().manual_seed(3)
    rows = torch.nn.Parameter(_random_simplex(6, 5, dtype=dtype, gen=gen))
    segs = torch.nn.Parameter(_random_simplex(2, 14, dtype=dtype, gen=gen, segments=SEGMENTS))
    opt = GAEA([{"params": [rows]}, {"params": [segs], "segments": SEGMENTS}], lr=0.1, entropy_weight=0.5)
    big = torch.finfo(dtype).max
    for i in range(10_000):
        kind = i % 5
        if kind == 0:  # huge random gradients of alternating sign
            g1, g2 = (torch.randn(t.shape, dtype=dtype, generator=gen) * 1e30 * (-1) ** i for t in (rows, segs))
        elif kind == 1:  # push one op up without bound
            g1, g2 = torch.zeros_like(rows), torch.zeros_like(segs)
            g1[:, 0], g2[:, 0] = -big, -big
        elif kind == 2:  # infinite gradients both ways
            g1, g2 = torch.full_like(rows, float("inf")), torch.full_like(segs, float("inf"))
            g1[:, 1], g2[:, 3] = -float("inf"), -float("inf")
        elif kind == 3:  # everything pushed down
            g1, g2 = torch.full_like(rows, big), torch.full_like(segs, big)
        else:  # ordinary noise
            g1, g2 = (torch.randn(t.shape, dtype=dtype, generator=gen) for t in (rows, segs))
        rows.grad, segs.grad = g1, g2
        opt.step()
    for t, s in ((rows, None), (segs, SEGMENTS)):
        v = t.detach()
        assert torch.isfinite(v).all()
        assert (v > 0).all()
        parts = [v] if s is None else list(torch.split(v, list(s), -1))
        for part in parts:
            torch.testing.assert_close(part.sum(-1), torch.ones(part.shape[:-1], dtype=dtype))


def test_entropic_regulariser_pulls_towards_uniform():
    theta = torch.nn.Parameter(torch.tensor([[0.9, 0.05, 0.05]], dtype=torch.float64))
    opt = GAEA([theta], lr=0.1, entropy_weight=2.0)
    for _ in range(200):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    torch.testing.assert_close(theta.detach(), torch.full_like(theta, 1 / 3), atol=1e-6, rtol=0)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(_random_simplex(6, 5, gen=gen))
    b = torch.nn.Parameter(_random_simplex(14, gen=gen, segments=SEGMENTS))
    opt = GAEA([{"params": [a]}, {"params": [b], "segments": SEGMENTS, "lr": 0.3}], lr=0.1, entropy_weight=0.01)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    sd = opt.state_dict()
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    opt2 = GAEA([{"params": [a2]}, {"params": [b2]}], lr=5.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["segments"] == SEGMENTS and opt2.param_groups[1]["lr"] == 0.3
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["entropy_weight"] == 0.01
    assert opt2.state[a2]["step"] == 1
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    for o, x, y in ((opt, a, b), (opt2, a2, b2)):
        x.grad, y.grad = ga.clone(), gb.clone()
        o.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_bad_arguments_name_the_argument():
    p = torch.nn.Parameter(torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="lr"):
        GAEA([p], lr=-1.0)
    with pytest.raises(ValueError, match="floor"):
        GAEA([p], floor=0.0)
    with pytest.raises(ValueError, match="entropy_weight"):
        GAEA([p], lr=0.5, entropy_weight=2.0)
    with pytest.raises(ValueError, match="segments"):
        GAEA([{"params": [p], "segments": (1, 1)}])
    with pytest.raises(TypeError, match="floating point"):
        GAEA([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="segments"):
        simplex_normalize(torch.rand(2, 5), segments=(2, 2))


def test_first_step_refuses_logits_naming_the_parameter():
    from fastnas.spaces import nb201

    net = nb201.Network(C=4, N=1, num_classes=3)  # DARTS-style logits, not simplex weights
    net.alphas.data.normal_()
    opt = GAEA(net.arch_parameters(), lr=0.1)
    net.alphas.grad = torch.randn_like(net.alphas)
    before = net.alphas.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(6, 5\)\) has negative"):
        opt.step()
    assert torch.equal(net.alphas.detach(), before)  # nothing was stepped


def test_first_step_refuses_pc_darts_edge_weights_without_segments():
    from fastnas.spaces import darts

    net = darts.Network(C=4, layers=2, num_classes=3, arch="simplex", partial_channels=2)
    for p in net.arch_parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"must sum to 1.*segments.*arch_simplex_segments"):
        GAEA(net.arch_parameters(), lr=0.1).step()
    groups: dict = {}
    for p in net.arch_parameters():
        groups.setdefault(net.arch_simplex_segments(p), []).append(p)
    GAEA([{"params": ps, "segments": seg} for seg, ps in groups.items()], lr=0.1).step()
    for p in net.arch_parameters():
        seg = net.arch_simplex_segments(p)
        for part in torch.split(p.detach(), list(seg) if seg else [p.shape[-1]], -1):
            torch.testing.assert_close(part.sum(-1), torch.ones(part.shape[:-1]))


def test_first_step_names_named_parameters_and_checks_segments():
    p = torch.nn.Parameter(torch.full((3, 4), 0.5))  # rows sum to 2
    p.grad = torch.zeros_like(p)
    opt = GAEA([{"params": [p], "param_names": ["alphas"]}], lr=0.1)
    with pytest.raises(ValueError, match="GAEA parameter 'alphas' .*each row must sum to 1"):
        opt.step()
    q = torch.nn.Parameter(torch.full((2, 4), 0.25))  # rows are simplices, but not segments (2, 2)
    q.grad = torch.zeros_like(q)
    with pytest.raises(ValueError, match=r"segments \(2, 2\) of a row must sum to 1"):
        GAEA([q], segments=(2, 2)).step()
    r = torch.nn.Parameter(torch.tensor([[0.5, float("nan")]]))
    r.grad = torch.zeros_like(r)
    with pytest.raises(ValueError, match="non-finite"):
        GAEA([r]).step()
