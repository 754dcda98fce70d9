"""Type aliases for annotations.

Arrays are numpy arrays or torch tensors (torch is imported for type checkers
only, so numpy-only installs never import it).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Union

import numpy as np
from numpy.typing import ArrayLike as _NumpyArrayLike

if TYPE_CHECKING:
    import torch

#: a numpy array or a torch tensor
Array = Union[np.ndarray, "torch.Tensor"]
#: what the public constructors accept as an array: nested sequences, numpy
#: arrays or torch tensors
ArrayLike = Union[_NumpyArrayLike, "torch.Tensor"]
#: a hyperparameter: a number, an array of them, or a tensor (autograd)
Param = float | ArrayLike
#: an array namespace (``array_api_compat.numpy`` or ``array_api_compat.torch``)
Namespace = ModuleType
#: a torch device (or its name); None on numpy
Device = Union[str, "torch.device", None]
#: the numpy or torch dtype of a backend
DType = Union[np.dtype, type, "torch.dtype"]

__all__ = ["Array", "ArrayLike", "DType", "Device", "Namespace", "Param"]
