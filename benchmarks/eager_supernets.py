"""Straightforward eager supernets: the oracle of the spaces' tests and the baseline of their benchmark.

Written the way the reference search code computes (DARTS's ``model_search.py``, PC-DARTS, xautodl's
``NAS201SearchCell`` and ``TinyNetworkDarts``): every candidate op of every edge is an ``nn.Module``
called on its own (its own ReLU, native BatchNorm and pooling), ``none`` returns a real zero tensor,
and an edge is ``sum(w * op(x))``. Module names are those of the reference code, so these supernets and
:mod:`fastnas.spaces` load each other's state_dicts; architecture parameters carry the names the
fastnas networks use (``alphas_normal``/``alphas_reduce``/``betas_*``, ``alphas``).

The weighting modes are re-implemented here independently (softmax, simplex, GDAS Gumbel sampling,
uniform sampling); with equally seeded ``generator``s the two implementations draw the same samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DARTS_PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]
NB201_PRIMITIVES = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


class EagerZero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class EagerIdentity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def _relu_conv_bn(C_in, C_out, k, stride, padding, affine, bias=False, dilation=1, trs=True) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C_in, C_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias),
        nn.BatchNorm2d(C_out, affine=affine, track_running_stats=trs),
    )


class EagerSeq(nn.Module):
    """A module whose state lives under ``op`` (DARTS's ReLUConvBN, SepConv, DilConv layouts)."""

    def __init__(self, op: nn.Sequential):
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class EagerDartsFactorizedReduce(nn.Module):
    def __init__(self, C_in: int, C_out: int, affine: bool):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _sep(C, k, stride, p, affine=False):
    return EagerSeq(
        nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, stride, p, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, 1, p, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=affine),
        )
    )


def _dil(C, k, stride, p, d, affine=False):
    return EagerSeq(
        nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, k, stride, p, dilation=d, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            nn.BatchNorm2d(C, affine=affine),
        )
    )


def darts_op(name: str, C: int, stride: int) -> nn.Module:
    """A DARTS candidate op as DARTS's MixedOp builds it (pools followed by an affine-free BatchNorm)."""
    if name == "none":
        return EagerZero(stride)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride=stride, padding=1), nn.BatchNorm2d(C, affine=False))
    if name == "avg_pool_3x3":
        return nn.Sequential(
            nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False), nn.BatchNorm2d(C, affine=False)
        )
    if name == "skip_connect":
        return EagerIdentity() if stride == 1 else EagerDartsFactorizedReduce(C, C, affine=False)
    if name == "sep_conv_3x3":
        return _sep(C, 3, stride, 1)
    if name == "sep_conv_5x5":
        return _sep(C, 5, stride, 2)
    if name == "dil_conv_3x3":
        return _dil(C, 3, stride, 2, 2)
    if name == "dil_conv_5x5":
        return _dil(C, 5, stride, 4, 2)
    raise ValueError(name)


class EagerMixedOp(nn.Module):
    """DARTS's MixedOp: ``sum(w * op(x) for every op)``."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self._ops = nn.ModuleList(darts_op(p, C, stride) for p in DARTS_PRIMITIVES)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self._ops))

    def forward_one(self, x: Tensor, weights: Tensor, index: int) -> Tensor:
        """GDAS/uniform: only op ``index``, times its weight (``none`` as a real zero tensor)."""
        return weights[index] * self._ops[index](x)


def _shuffle(x: Tensor, groups: int) -> Tensor:
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).contiguous().view(B, C, H, W)


class EagerDartsCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, k=1):
        super().__init__()
        self.reduction = reduction
        self.k = k
        if reduction_prev:
            self.preprocess0 = EagerDartsFactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = EagerSeq(_relu_conv_bn(C_prev_prev, C, 1, 1, 0, affine=False))
        self.preprocess1 = EagerSeq(_relu_conv_bn(C_prev, C, 1, 1, 0, affine=False))
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        self.strides = []
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(EagerMixedOp(C // k, stride))
                self.strides.append(stride)

    def _edge(self, e: int, h: Tensor, weights: Tensor, index) -> Tensor:
        op = self._ops[e]
        if self.k == 1:
            return op(h, weights[e]) if index is None else op.forward_one(h, weights[e], index[e])
        c = h.shape[1] // self.k  # PC-DARTS: 1/k of the channels through the ops, the rest bypass
        xt, xp = h[:, :c], h[:, c:]
        t = op(xt, weights[e]) if index is None else op.forward_one(xt, weights[e], index[e])
        if t.shape[2] != h.shape[2]:
            xp = F.max_pool2d(xp, 2, 2)
        return _shuffle(torch.cat([t, xp], dim=1), self.k)

    def forward(self, s0, s1, weights, index=None, betas=None):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            if betas is None:
                s = sum(self._edge(offset + j, h, weights, index) for j, h in enumerate(states))
            else:
                s = sum(betas[offset + j] * self._edge(offset + j, h, weights, index) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier :], dim=1)


class _EagerArch:
    """The weighting modes, written out the way DARTS, GAEA and GDAS compute them."""

    def _setup(self, arch, sampler):
        self.arch, self.sampler, self.tau, self.generator = arch, sampler, 10.0, None

    def _init(self, *shape):
        if self.arch == "logits":
            return nn.Parameter(1e-3 * torch.randn(*shape))
        return nn.Parameter(torch.full(shape, 1.0 / shape[-1]))

    def weights_of(self, p: Tensor):
        """(weights [E, K], index or None)."""
        if self.sampler is None:
            return (F.softmax(p, dim=-1) if self.arch == "logits" else p), None
        gen = self.generator
        noise_device = gen.device if gen is not None else p.device  # a CPU generator may drive a GPU network
        if self.sampler == "uniform":
            index = torch.randint(p.shape[-1], (p.shape[0],), generator=gen, device=noise_device).tolist()
            return torch.ones_like(p), index
        logits = p if self.arch == "logits" else p.clamp_min(1e-30).log()
        while True:
            u = torch.empty(p.shape, dtype=p.dtype, device=noise_device).exponential_(generator=gen)
            gumbels = -u.log().to(p.device)
            probs = F.softmax((logits.log_softmax(dim=1) + gumbels) / self.tau, dim=1)
            if torch.isfinite(gumbels).all() and torch.isfinite(probs).all():
                break
        index = probs.max(-1, keepdim=True)[1]
        one_h = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        return one_h - probs.detach() + probs, index.view(-1).tolist()


class EagerDartsNetwork(_EagerArch, nn.Module):
    """DARTS's search network (PC-DARTS's with ``partial_channels > 1``; with ``stem="imagenet"`` the
    three-convolution stem of PC-DARTS's ``model_search_imagenet.py``, its ReLUs in place as there),
    parameters named like :class:`fastnas.spaces.darts.Network`'s."""

    def __init__(self, C=16, num_classes=10, layers=8, steps=4, multiplier=4, stem_multiplier=3, *,
                 in_channels=3, arch="logits", sampler=None, partial_channels=1, stem="cifar"):  # fmt: skip
        super().__init__()
        self._setup(arch, sampler)
        self._steps = steps
        self.k = partial_channels
        C_curr = stem_multiplier * C
        if stem == "imagenet":
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C_curr // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_curr // 2),
                nn.ReLU(inplace=True), nn.Conv2d(C_curr // 2, C_curr, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )  # fmt: skip
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True), nn.Conv2d(C_curr, C_curr, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )  # fmt: skip
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = stem == "imagenet"
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(
                EagerDartsCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, self.k)
            )
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        E = sum(2 + i for i in range(steps))
        self.alphas_normal = self._init(E, len(DARTS_PRIMITIVES))
        self.alphas_reduce = self._init(E, len(DARTS_PRIMITIVES))
        if self.k > 1:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(E))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(E))

    def _betas(self, b: Tensor) -> Tensor:
        if self.arch == "simplex":
            return b
        parts, start = [], 0
        for n in range(2, self._steps + 2):
            parts.append(F.softmax(b[start : start + n], dim=-1))
            start += n
        return torch.cat(parts)

    def forward(self, x: Tensor) -> Tensor:
        wn, idx_n = self.weights_of(self.alphas_normal)
        wr, idx_r = self.weights_of(self.alphas_reduce)
        bn = br = None
        if self.k > 1:
            bn, br = self._betas(self.betas_normal), self._betas(self.betas_reduce)
        if hasattr(self, "stem0"):
            s0 = self.stem0(x)
            s1 = self.stem1(s0)  # rectifies s0 in place, as PC-DARTS's does
        else:
            s0 = s1 = self.stem(x)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, wr, idx_r, br)
            else:
                s0, s1 = s1, cell(s0, s1, wn, idx_n, bn)
        return self.classifier(self.global_pooling(s1).view(s1.shape[0], -1))


# --------------------------------------------------------------------------- NAS-Bench-201


class EagerPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def nb201_op(name: str, C: int, affine: bool, trs: bool) -> nn.Module:
    """A NAS-Bench-201 candidate op at stride 1 with C_in == C_out, as xautodl builds it."""
    if name == "none":
        return EagerZero(1)
    if name == "skip_connect":
        return EagerIdentity()
    if name == "nor_conv_1x1":
        return EagerSeq(_relu_conv_bn(C, C, 1, 1, 0, affine, bias=not affine, trs=trs))
    if name == "nor_conv_3x3":
        return EagerSeq(_relu_conv_bn(C, C, 3, 1, 1, affine, bias=not affine, trs=trs))
    if name == "avg_pool_3x3":
        return EagerPool()
    raise ValueError(name)


class EagerNB201Cell(nn.Module):
    """xautodl's NAS201SearchCell at stride 1, C_in == C_out."""

    def __init__(self, C: int, max_nodes: int = 4, op_names=NB201_PRIMITIVES, affine=False, trs=True):
        super().__init__()
        self.max_nodes = max_nodes
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                self.edges[f"{i}<-{j}"] = nn.ModuleList(nb201_op(n, C, affine, trs) for n in op_names)
        self.edge2index = {key: i for i, key in enumerate(sorted(self.edges.keys()))}

    def forward(self, x: Tensor, weightss: Tensor, index=None, gdas: bool = False) -> Tensor:
        """``index`` (one op per edge): only that op, times its weight (uniform sampling, xautodl's
        ``forward_select``/``forward_dynamic`` with ones); with ``gdas`` also the edge's other weights
        as scalars, as xautodl's ``forward_gdas`` (0 forward, ``sum(dL/dnode)`` backward)."""
        nodes = [x]
        for i in range(1, self.max_nodes):
            inter = []
            for j in range(i):
                key = f"{i}<-{j}"
                e = self.edge2index[key]
                if index is None:
                    inter.append(sum(layer(nodes[j]) * w for layer, w in zip(self.edges[key], weightss[e])))
                elif gdas:
                    inter.append(
                        sum(
                            w * layer(nodes[j]) if k == index[e] else w
                            for k, (layer, w) in enumerate(zip(self.edges[key], weightss[e]))
                        )
                    )
                else:
                    inter.append(weightss[e][index[e]] * self.edges[key][index[e]](nodes[j]))
            nodes.append(sum(inter))
        return nodes[-1]


class EagerResBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int):
        super().__init__()
        self.conv_a = EagerSeq(_relu_conv_bn(inplanes, planes, 3, 2, 1, True))
        self.conv_b = EagerSeq(_relu_conv_bn(planes, planes, 3, 1, 1, True))
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, 0), nn.Conv2d(inplanes, planes, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class EagerNB201Network(_EagerArch, nn.Module):
    """xautodl's TinyNetworkDarts (returning logits only), parameters named like
    :class:`fastnas.spaces.nb201.Network`'s."""

    def __init__(self, C=16, N=5, num_classes=10, max_nodes=4, *, in_channels=3, arch="logits", sampler=None,
                 affine=False, track_running_stats=True):  # fmt: skip
        super().__init__()
        self._setup(arch, sampler)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, C_curr in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                self.cells.append(EagerResBlock(C_prev, C_curr))
            for _ in range(N):
                self.cells.append(EagerNB201Cell(C_curr, max_nodes, NB201_PRIMITIVES, affine, track_running_stats))
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        E = max_nodes * (max_nodes - 1) // 2
        self.alphas = self._init(E, len(NB201_PRIMITIVES))

    def forward(self, x: Tensor) -> Tensor:
        weights, index = self.weights_of(self.alphas)
        feature = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, EagerNB201Cell):
                feature = cell(feature, weights, index, gdas=self.sampler == "gdas")
            else:
                feature = cell(feature)
        out = self.global_pooling(self.lastact(feature))
        return self.classifier(out.view(out.size(0), -1))


# --------------------------------------------------------------------------- comparing a supernet with its oracle


def run_step(net: nn.Module, x: Tensor, grad_seed: int = 0, sample_seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward and backward of ``net`` on ``x`` (samplers drawing from a generator seeded with
    ``sample_seed``, output gradient drawn from ``grad_seed``): ``(logits, {name: grad})`` with a zero
    tensor for parameters that got no gradient."""
    net.generator = torch.Generator(device=x.device).manual_seed(sample_seed)
    net.zero_grad(set_to_none=True)
    logits = net(x)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=logits.dtype)
    logits.backward(g.to(logits.device))
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}
    return logits.detach(), grads
