"""gpgrad: exact Gaussian-process inference over functions and their derivatives.

>>> import numpy as np, gpgrad
>>> from gpgrad import kernels
>>> X = np.random.default_rng(0).uniform(-1, 1, (20, 2))
>>> y = np.sin(X[:, 0]) * X[:, 1]
>>> post = gpgrad.GP(kernels.RBF(lengthscale=0.7), noise=1e-6).condition(X, y)
>>> post.gradient(X[:3]).mean.shape
(3, 2)
"""

from . import acquisition as acquisition
from . import auto as auto
from . import fit as fit  # the module is callable: gpgrad.fit(gp, X, y)
from . import kernels
from ._version import __version__
from .auto import AveragedPosterior, fit_auto
from .exceptions import GPGradWarning, JitterWarning, NotPositiveDefiniteError
from .functionals import (
    Functional,
    directional,
    gradients,
    hessians,
    partials,
    second_partials,
    values,
)
from .gp import GP
from .io import load, save
from .posterior import Posterior, Prediction
from .solvers.iterative import CG
from .solvers.select import InsufficientMemoryError

__all__ = [
    "__version__",
    "GP",
    "Posterior",
    "Prediction",
    "Functional",
    "values",
    "gradients",
    "partials",
    "directional",
    "second_partials",
    "hessians",
    "kernels",
    "GPGradWarning",
    "JitterWarning",
    "NotPositiveDefiniteError",
    "save",
    "load",
    "fit",
    "fit_auto",
    "AveragedPosterior",
    "auto",
    "acquisition",
    "CG",
    "InsufficientMemoryError",
]
