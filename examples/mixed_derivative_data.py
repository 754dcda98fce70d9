"""Values, some slopes and some curvatures, each with its own error size.

An experiment measures ``f(x) = exp(-x/2) sin(3x)`` at 15 points (noise sd
0.1), its slope at 6 points (sd 0.05) and its second derivative at 4 points
(sd 0.5). The instruments' error sizes for slopes and curvatures are known
and passed with those observations; :func:`gpgrad.fit` learns the value noise
and the kernel's hyperparameters from all of the data (with ten derivative
measurements their noise levels could not be told apart from zero; with more,
leave out ``noise=`` and ``fit`` learns one level per kind). The figure
compares the derivative's 95 % band from the values alone with the band from
all three kinds, which is much narrower near the measured slopes and
curvatures.

Run ``python examples/mixed_derivative_data.py [--quick] [--out FIG.png]``.
"""

import argparse

import numpy as np

import gpgrad
from gpgrad import kernels


def f(x):
    return np.exp(-x / 2) * np.sin(3 * x)


def df(x):
    return np.exp(-x / 2) * (3 * np.cos(3 * x) - 0.5 * np.sin(3 * x))


def d2f(x):
    return np.exp(-x / 2) * (-8.75 * np.sin(3 * x) - 3 * np.cos(3 * x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer optimizer starts")
    p.add_argument("--out", default="mixed_derivative_data.png")
    a = p.parse_args(argv)
    restarts = 1 if a.quick else 4

    rng = np.random.default_rng(1)
    xv = np.sort(rng.uniform(0, 4, 15))
    xg = np.array([0.3, 1.0, 1.7, 2.4, 3.1, 3.8])
    xh = np.array([0.6, 1.5, 2.6, 3.4])
    yv = f(xv) + 0.1 * rng.normal(size=xv.size)
    yg = df(xg) + 0.05 * rng.normal(size=xg.size)
    yh = d2f(xh) + 0.5 * rng.normal(size=xh.size)

    obs_values = gpgrad.values(xv[:, None], yv)
    obs = [
        obs_values,
        gpgrad.gradients(xg[:, None], yg[:, None], noise=0.05**2),
        gpgrad.second_partials(xh[:, None], 0, 0, yh, noise=0.5**2),
    ]
    only = gpgrad.fit(gpgrad.GP(kernels.Matern52()), obs_values, restarts=restarts)
    both = gpgrad.fit(gpgrad.GP(kernels.Matern52()), *obs, restarts=restarts)
    print("values only:\n" + only.summary())
    print("values, slopes and curvatures:\n" + both.summary())
    fitted = float(np.sqrt(both.params["noise.value"]))
    print(f"noise sd of the values: fitted {fitted:.3g}, true 0.1")

    grid = np.linspace(0, 4, 300)[:, None]
    g_only = only.posterior.gradient(grid)
    g_both = both.posterior.gradient(grid)
    true = df(grid[:, 0])
    out = {}
    for name, g in [("values only", g_only), ("all data", g_both)]:
        m, s = g.mean[:, 0], g.std[:, 0]
        rmse = float(np.sqrt(np.mean((m - true) ** 2)))
        out[name] = {"rmse": rmse, "band": float(np.mean(2 * 1.96 * s))}
        print(
            f"{name:>12}: df/dx RMSE {rmse:.3f}, mean 95% band width "
            f"{out[name]['band']:.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = grid[:, 0]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    fv = both.posterior.value(grid)
    ax0.fill_between(x, fv.mean - 1.96 * fv.std, fv.mean + 1.96 * fv.std, alpha=0.3)
    ax0.plot(x, fv.mean, label="posterior mean (all data)")
    ax0.errorbar(xv, yv, yerr=0.2, fmt="k.", ms=4, lw=0.8, label="values ± 2 sd")
    ax0.plot(x, f(x), "k--", lw=1, label="true f")
    ax0.set_ylabel("f(x)")
    ax0.legend(fontsize=8)
    for g, label, color in [
        (g_only, "band from values only", "tab:orange"),
        (g_both, "band from values + slopes + curvatures", "tab:blue"),
    ]:
        m, s = g.mean[:, 0], g.std[:, 0]
        ax1.fill_between(x, m - 1.96 * s, m + 1.96 * s, alpha=0.3, color=color,
                         label=label)  # fmt: skip
        ax1.plot(x, m, color=color, lw=1)
    ax1.errorbar(xg, yg, yerr=0.1, fmt="ks", ms=4, label="measured slopes ± 2 sd")
    for xi in xh:
        ax1.axvline(xi, color="0.6", lw=0.8, ls=":")
    ax1.plot(x, true, "k--", lw=1, label="true df/dx")
    ax1.set_xlabel("x (dotted: where curvature was measured)")
    ax1.set_ylabel("df/dx")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    plt.close(fig)
    print(f"wrote {a.out}")
    return out | {"fit": both}


if __name__ == "__main__":
    main()
