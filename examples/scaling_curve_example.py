"""Test-time scaling on the paper's 1/x example: L_t grows towards |F'| while the error falls.

G(y, x) = y - eta (x y - 1) is globally Lipschitz in x and a contraction in y for
0 < eta x < 2; its fixed point is F(x) = 1/x, whose Lipschitz constant on [0.5, 2] is
max 1/x^2 = 4. Run: python examples/scaling_curve_example.py [out.png]
"""
import sys

import torch

from imp_fast.scaling import plot_scaling_curve, relative_l2, scaling_curve

torch.set_num_threads(1)
eta = 0.5
x = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)[:, None]  # 64 samples, one scalar each


def G(y, x):
    return y - eta * (x * y - 1)


curve = scaling_curve(
    G, x, target=1 / x, metric=relative_l2,
    ts=[1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100],
    directions=torch.ones(1, 1, dtype=torch.float64),  # the one input direction
    eps=1e-4, dtype=torch.float64, metric_name="relative L2 error",
)
print(curve.table())
plot_scaling_curve(curve, sys.argv[1] if len(sys.argv) > 1 else "docs/scaling_curve_example.png",
                   title="G(y, x) = y - 0.5 (x y - 1): fixed point 1/x on [0.5, 2]")
