"""A 2-D gradient field and Hessian-based curvature from scattered noisy values.

Noisy values of ``f(x, y) = sin(x) cos(y) + 0.1 x²`` at random points are
fitted with an RBF GP with one lengthscale per input (ARD). On a grid we draw
the posterior mean of ``f`` with its gradient field (arrows), and the
Hessian's determinant ``det H = f_xx f_yy − f_xy²`` with the mean curvature
``tr H``: where ``det H < 0`` the surface is a saddle, where ``det H > 0`` it is
a bowl (``tr H > 0``) or a cap (``tr H < 0``). The true ``det H = 0`` curve is
overlaid, and points where the posterior is not sure of the sign of
``f_xx`` (its 95 % interval contains 0) are marked.

Run ``python examples/gradient_field_2d.py [--quick] [--out FIG.png]``.
"""

import argparse

import numpy as np

import gpgrad
from gpgrad import kernels


def f(X):
    x, y = X[..., 0], X[..., 1]
    return np.sin(x) * np.cos(y) + 0.1 * x**2


def grad(X):
    x, y = X[..., 0], X[..., 1]
    return np.stack([np.cos(x) * np.cos(y) + 0.2 * x, -np.sin(x) * np.sin(y)], -1)


def hess(X):
    x, y = X[..., 0], X[..., 1]
    fxx = -np.sin(x) * np.cos(y) + 0.2
    fxy = -np.cos(x) * np.sin(y)
    fyy = -np.sin(x) * np.cos(y)
    return np.stack([np.stack([fxx, fxy], -1), np.stack([fxy, fyy], -1)], -2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer points, coarser grid")
    p.add_argument("--out", default="gradient_field_2d.png")
    a = p.parse_args(argv)
    n, m = (60, 12) if a.quick else (150, 25)

    rng = np.random.default_rng(2)
    X = rng.uniform(-3, 3, (n, 2))
    y = f(X) + 0.05 * rng.normal(size=n)
    res = gpgrad.fit(
        gpgrad.GP(kernels.RBF()), X, y, ard=True, restarts=1 if a.quick else 3
    )
    print(res.summary())

    g1 = np.linspace(-3, 3, m)
    XX, YY = np.meshgrid(g1, g1)
    G = np.column_stack([XX.ravel(), YY.ravel()])
    post = res.posterior
    fm = post.value(G).mean.reshape(m, m)
    g = post.gradient(G)
    h = post.hessian(G)
    H = h.mean
    det = (H[:, 0, 0] * H[:, 1, 1] - H[:, 0, 1] ** 2).reshape(m, m)
    tr = (H[:, 0, 0] + H[:, 1, 1]).reshape(m, m)
    g_err = float(np.sqrt(np.mean((g.mean - grad(G)) ** 2)))
    h_err = float(np.sqrt(np.mean((H - hess(G)) ** 2)))
    g_cov = float(np.mean(np.abs(g.mean - grad(G)) <= 1.96 * g.std))
    unsure = np.abs(H[:, 0, 0]) < 1.96 * h.std[:, 0, 0]
    print(
        f"gradient RMSE {g_err:.3f} ({100 * g_cov:.0f}% inside 95% intervals), "
        f"Hessian RMSE {h_err:.3f}; sign of f_xx unsure at {unsure.sum()} of "
        f"{m * m} grid points"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Xf = np.stack([XX, YY], -1)
    Ht = hess(Xf)
    det_true = Ht[..., 0, 0] * Ht[..., 1, 1] - Ht[..., 0, 1] ** 2
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.8))
    c = ax0.contourf(XX, YY, fm, 20, cmap="viridis")
    fig.colorbar(c, ax=ax0, label="posterior mean of f")
    step = 2 if m > 15 else 1  # fewer arrows on a fine grid
    sel = ((np.arange(m * m) // m) % step == 0) & ((np.arange(m * m) % m) % step == 0)
    gm = g.mean[sel]
    ax0.quiver(G[sel, 0], G[sel, 1], gm[:, 0], gm[:, 1], color="w", width=0.004)
    ax0.plot(X[:, 0], X[:, 1], "r.", ms=3, label="samples")
    ax0.set_title("posterior mean and gradient field")
    ax0.legend(fontsize=8, loc="lower left")
    lim = np.max(np.abs(det))
    c = ax1.contourf(XX, YY, det, 20, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(c, ax=ax1, label="det H (posterior mean): < 0 saddle")
    ax1.contour(XX, YY, tr, [0.0], colors="k", linewidths=1, linestyles="dotted")
    ax1.contour(XX, YY, det_true, [0.0], colors="k", linewidths=1.2)
    ax1.plot(G[unsure, 0], G[unsure, 1], "kx", ms=3, label="sign of f_xx unsure")
    ax1.set_title("det H; true det H = 0 solid, tr H = 0 dotted", fontsize=10)
    ax1.legend(fontsize=8, loc="lower left")
    for ax in (ax0, ax1):
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    plt.close(fig)
    print(f"wrote {a.out}")
    return {"gradient_rmse": g_err, "hessian_rmse": h_err, "coverage": g_cov}


if __name__ == "__main__":
    main()
