"""How far a float32 NAS-Bench-201 supernet step (C=16, N=5, batch 64) lies from the float64 eager
supernet (xautodl's computation): over 3 seeds, the largest error of the logits, of each weight
gradient (of any parameter with more than one dimension) and of the architecture gradient, each
relative to the float64 tensor's largest magnitude, and the largest searched-conv bias gradient.

Not a timed test: a measurement to run by hand when a change moves the rounding, e.g.::

    python benchmarks/step_numerics.py            # fastnas
    python benchmarks/step_numerics.py --eager    # the eager supernet in float32, channels_last
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eager_supernets import EagerNB201Network  # noqa: E402

from fastnas.spaces import nb201  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eager", action="store_true", help="measure the eager supernet in float32 instead")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    worst = {"logits": 0.0, "weight grads": 0.0, "alphas grad": 0.0, "conv bias grads (abs)": 0.0}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = nb201.Network(C=16, N=5)
        ref = EagerNB201Network(C=16, N=5).double()
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in net.state_dict().items()})
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        if args.eager:
            eager = EagerNB201Network(C=16, N=5)
            eager.load_state_dict(net.state_dict())
            net, x_in = eager, x.contiguous(memory_format=torch.channels_last)
        else:
            x_in = x
        out = net(x_in)
        F.cross_entropy(out, y).backward()
        out64 = ref(x.double())
        F.cross_entropy(out64, y).backward()
        worst["logits"] = max(worst["logits"], rel(out.detach(), out64.detach()))
        grads64 = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            q = grads64[name]
            if p.grad is None or q.grad is None:
                continue
            if name.endswith("bias") and ".edges." in name:
                worst["conv bias grads (abs)"] = max(worst["conv bias grads (abs)"], float(p.grad.abs().max()))
            elif name == "alphas":
                worst["alphas grad"] = max(worst["alphas grad"], rel(p.grad, q.grad))
            elif p.dim() > 1:
                worst["weight grads"] = max(worst["weight grads"], rel(p.grad, q.grad))
    print("eager float32" if args.eager else "fastnas float32", {k: f"{v:.2e}" for k, v in worst.items()})


if __name__ == "__main__":
    main()
