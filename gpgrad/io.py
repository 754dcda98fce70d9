"""Saving and loading a GP or a conditioned posterior without pickle.

A model file is a standard ``.npz`` archive (a zip of ``.npy`` arrays, readable
with ``numpy.load(path, allow_pickle=False)``) holding one extra member,
``gpgrad.json``: a plain JSON document with

- ``format`` (``"gpgrad-model"``), ``format_version`` and the gpgrad version;
- ``object``: ``"GP"`` or ``"Posterior"``;
- ``gp``: the kernel tree (class names and hyperparameters), noise, mean,
  ``normalize_y``, backend, dtype, device and method;
- ``observations`` (a posterior only): for each functional its kind and the
  names of its arrays (``X``, targets, noise, and ``dims`` / ``U`` / ``i`` /
  ``j`` where the kind has them);
- ``arrays``: for every array member its dtype, shape and SHA-256 digest, so a
  member that was altered or swapped is refused on load;
- ``log_marginal_likelihood`` (a posterior only): checked after re-conditioning.

Numbers that are Python floats are written into the JSON (``repr`` round-trips
every float64 exactly); arrays and tensors go into ``.npy`` members as numpy
arrays. Nothing in the file is executed on load: kernel classes are looked up
by name among gpgrad's own kernels only, and arrays are read with
``allow_pickle=False``. Loading rebuilds the GP and, for a posterior,
conditions it again on the stored observations, which reproduces its
predictions exactly (the same arithmetic on the same numbers).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
import zipfile
import zlib

import numpy as np

from . import backend as B
from . import kernels as _kernels
from ._typing import Device
from ._version import __version__
from .exceptions import GPGradWarning
from .functionals import KINDS, Functional
from .gp import GP
from .kernels.base import REGISTRY as _kernel_registry
from .posterior import Posterior

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

#: identifies a gpgrad model file
FORMAT = "gpgrad-model"
#: bumped whenever the layout changes incompatibly; older versions stay readable
FORMAT_VERSION = 1
_META = "gpgrad.json"


class _Writer:
    """Collects arrays under unique names while the JSON is built."""

    def __init__(self):
        self.arrays = {}

    def add(self, name, value):
        arr = np.ascontiguousarray(B.to_numpy(value))
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"cannot save {name}: arrays of dtype {arr.dtype}")
        key = name
        t = 1
        while key in self.arrays:
            t += 1
            key = f"{name}_{t}"
        self.arrays[key] = arr
        return key

    def value(self, name, v):
        """A JSON-able description of a scalar or an array (stored aside)."""
        if v is None:
            return None
        if B.is_tensor(v) or isinstance(v, np.ndarray):
            return {"array": self.add(name, v), "tensor": bool(B.is_tensor(v))}
        if isinstance(v, bool):
            raise TypeError(f"cannot save {name}: got a bool")
        if isinstance(v, (int, float, np.floating, np.integer)):
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"cannot save {name}: it is {f}")
            return f
        raise TypeError(f"cannot save {name} of type {type(v).__name__}")


# --------------------------------------------------------------------------
# kernels


def _registered(k):
    """The registered class of kernel ``k``, or None for foreign classes."""
    cls = _kernel_registry.get(type(k).__name__)
    return cls if type(k) is cls else None


def _kernel_to_json(k, w, path="kernel"):
    name = type(k).__name__
    if _registered(k) is None:
        raise TypeError(
            f"cannot save a kernel of class {type(k).__module__}.{name}: only gpgrad's "
            f"built-in kernels ({', '.join(sorted(_kernel_registry))}) and their "
            "sums, products and scalings can be saved"
        )
    if not getattr(k, "_saveable", True):
        raise TypeError(
            f"cannot save a kernel of class {name} yet: {path} has settings the "
            "model file format does not describe"
        )
    out = {"class": name}
    if isinstance(k, _kernels.Scale):
        out["scale"] = w.value(f"{path}.scale", k.scale)
    elif not isinstance(k, (_kernels.Sum, _kernels.Product)):
        out["params"] = {
            p: w.value(f"{path}.{p}", getattr(k, p)) for p in k._param_names
        }
    out.update({s: int(getattr(k, s)) for s in k._settings})
    if isinstance(k, _kernels.Warped):
        # the wrapped kernel, and the box the inputs are rescaled from
        out["children"] = [_kernel_to_json(k.kernel, w, f"{path}.kernel")]
        out["box"] = {
            "lower": w.value(f"{path}.lower", k.lower),
            "upper": w.value(f"{path}.upper", k.upper),
            "margin": w.value(f"{path}.margin", k.margin),
            "floor": w.value(f"{path}.floor", k.floor),
        }
    elif hasattr(k, "children"):
        out["children"] = [
            _kernel_to_json(c, w, f"{path}.{i}") for i, c in enumerate(k.children)
        ]
    return out


def _kernel_from_json(spec, r, path="kernel"):
    if not isinstance(spec, dict) or "class" not in spec:
        raise ValueError(f"{path}: expected an object with a 'class', got {spec!r}")
    name = spec["class"]
    cls = _kernel_registry.get(name)
    if cls is None:
        raise ValueError(
            f"{path}: unknown kernel class {name!r}; this file needs a kernel that "
            "this version of gpgrad does not have"
        )
    children = [
        _kernel_from_json(c, r, f"{path}.{i}")
        for i, c in enumerate(spec.get("children", []))
    ]
    settings = {s: int(spec[s]) for s in cls._settings}
    if issubclass(cls, _kernels.Scale):
        (child,) = children
        return cls(child, r.value(spec["scale"]))
    params = {p: r.value(v) for p, v in spec.get("params", {}).items()}
    if "box" in spec:
        box = spec["box"]
        need = {"lower", "upper", "margin"}
        if not isinstance(box, dict) or not need <= set(box) <= need | {"floor"}:
            raise ValueError(
                f"{path}: expected a box with lower, upper, margin (and floor), "
                f"got {box!r}"
            )
        (child,) = children
        return cls(child, **params, **{b: r.value(v) for b, v in box.items()})
    if children:
        return cls(*children)
    return cls(**params, **settings)


# --------------------------------------------------------------------------
# GP and observations


def _dtype_name(gp):
    return str(gp.dtype).replace("torch.", "")


def _gp_to_json(gp, w):
    if isinstance(gp.noise, dict):
        noise = {"by_kind": {k: w.value(f"noise.{k}", v) for k, v in gp.noise.items()}}
    else:
        noise = w.value("noise", gp.noise)
    return {
        "kernel": _kernel_to_json(gp.kernel, w),
        "noise": noise,
        "mean": w.value("mean", gp.mean),
        "normalize_y": bool(gp.normalize_y),
        "backend": gp.backend,
        "dtype": _dtype_name(gp),
        "device": None if gp.device is None else str(gp.device),
        "method": _method_to_json(gp.method),
    }


def _method_to_json(method):
    if isinstance(method, str):
        return method
    # a configured solver such as CG(tol=..., ...): its options are plain values
    opts = dict(vars(method))
    json.dumps(opts, allow_nan=False)  # refuses anything not JSON-able
    return {"class": type(method).__name__, "options": opts}


def _method_from_json(spec, path):
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and spec.get("class") == "CG":
        from .solvers.iterative import CG

        return CG(**spec["options"])
    raise ValueError(f"{path}: unknown solver method {spec!r}")


def _obs_to_json(f, t, w):
    out = {
        "kind": f.kind,
        "X": w.add(f"obs{t}.X", f.X),
        "y": w.add(f"obs{t}.y", f.y),
        "noise": w.value(f"obs{t}.noise", f.noise),
    }
    for name in f.fields:
        out[name] = w.add(f"obs{t}.{name}", getattr(f, name))
    return out


def save(obj: GP | Posterior, path: str | os.PathLike) -> None:
    """Write a :class:`~gpgrad.GP` or a conditioned :class:`~gpgrad.Posterior`.

    Parameters
    ----------
    obj : GP or Posterior
        A posterior is stored as its GP plus its observations (points,
        targets, per-observation noise and index/direction arrays); loading
        conditions again.
    path : str or os.PathLike
        The file to write (conventionally ``*.npz``; the name is used as
        given). An existing file is replaced.

    Notes
    -----
    The file is an ``.npz`` archive with a ``gpgrad.json`` member; see
    :mod:`gpgrad.io` for the layout. Tensors are stored as numpy arrays (their
    autograd history is not kept) and come back on the GP's device and dtype.
    """
    if isinstance(obj, Posterior):
        gp, observations, what = obj.gp, obj.observations, "Posterior"
    elif isinstance(obj, GP):
        gp, observations, what = obj, None, "GP"
    else:
        raise TypeError(
            f"gpgrad.save expects a gpgrad.GP or a gpgrad.Posterior, got "
            f"{type(obj).__name__}"
        )
    path = _check_path(path)
    w = _Writer()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gpgrad_version": _version(),
        "object": what,
        "gp": _gp_to_json(gp, w),
    }
    if observations is not None:
        meta["observations"] = [
            _obs_to_json(f, t, w) for t, f in enumerate(observations)
        ]
        lml = np.asarray(B.to_numpy(obj.log_marginal_likelihood()), dtype=np.float64)
        # a consistency check on load; JSON has no NaN/inf, so skip it then
        meta["log_marginal_likelihood"] = (
            lml.tolist() if np.all(np.isfinite(lml)) else None
        )
    meta["arrays"] = {
        k: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _digest(a)}
        for k, a in w.arrays.items()
    }
    text = json.dumps(meta, indent=1, allow_nan=False)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_META, text)
            for key, arr in w.arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arr, allow_pickle=False)
                zf.writestr(key + ".npy", buf.getvalue())
        # write-then-rename: an interrupted save never leaves a half file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_path(path):
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def _version():
    return __version__


def _digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------
# loading


class _Reader:
    """Looks up stored arrays, converting them for the GP being rebuilt."""

    def __init__(self, arrays, path, backend, dtype, device):
        self.arrays = arrays
        self.path = path
        self.gp_backend = backend
        self.dtype = dtype  # "float64" or "float32"
        self.device = device  # a torch device, or None for numpy

    def array(self, key):
        if not isinstance(key, str) or key not in self.arrays:
            raise ValueError(f"{self.path}: the file refers to a missing array {key!r}")
        return self.arrays[key]

    def value(self, spec):
        if spec is None or isinstance(spec, float):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return float(spec)
        if isinstance(spec, dict) and "array" in spec:
            arr = self.array(spec["array"])
            if spec.get("tensor") and self.gp_backend == "torch":
                return self.tensor(arr)
            return arr
        raise ValueError(f"{self.path}: malformed value {spec!r}")

    def tensor(self, arr, keep_dtype=False):
        import torch

        dtype = None if keep_dtype else _torch_dtype(self.dtype)
        return torch.as_tensor(arr, dtype=dtype, device=self.device)


def _torch_dtype(name):
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def load(path: str | os.PathLike, *, device: Device = None) -> GP | Posterior:
    """Read a GP or posterior written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
    device : str or torch.device, optional
        For a torch-backend model, the device to rebuild it on (default: the
        device it was saved from).

    Returns
    -------
    GP or Posterior
        A posterior is re-conditioned on its stored observations; its
        predictions equal those of the saved one.

    Raises
    ------
    ValueError
        The file is not a gpgrad model file, is truncated or corrupted, was
        written by a newer format version, or its parts disagree (an array whose
        digest, dtype or shape differs from the one recorded, a missing array,
        an unknown kernel class).
    """
    path = _check_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path}")
    meta, arrays = _read_archive(path)
    try:
        return _rebuild(meta, arrays, path, device)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(
            f"{path}: malformed gpgrad model file ({type(exc).__name__}: {exc})"
        ) from exc


def _read_archive(path):
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if _META not in names:
                raise ValueError(
                    f"{path} is a zip/npz archive but not a gpgrad model file (it "
                    f"has no {_META!r}); write model files with gpgrad.save"
                )
            raw = zf.read(_META)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ValueError(
            f"{path} is not a gpgrad model file, or it is truncated or corrupted "
            f"({exc})"
        ) from exc
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: the {_META} member is not valid JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gpgrad model file (format is not {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in format version {version} by gpgrad "
            f"{meta.get('gpgrad_version')}, but this gpgrad reads versions up to "
            f"{FORMAT_VERSION}; upgrade gpgrad to load it"
        )
    recorded = meta.get("arrays")
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: malformed gpgrad model file (no array table)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != _META}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        # ValueError: a member that is not a plain array (pickled objects are
        # refused) or whose .npy header is damaged
        raise ValueError(
            f"{path}: an array member is truncated, corrupted or not a plain "
            f"array ({exc})"
        ) from exc
    missing = sorted(set(recorded) - set(arrays))
    extra = sorted(set(arrays) - set(recorded))
    if missing or extra:
        raise ValueError(
            f"{path}: the arrays in the file do not match its description "
            f"(missing {missing}, unexpected {extra}); the file was altered or "
            "assembled from different saves"
        )
    for key, info in recorded.items():
        arr = arrays[key]
        if (
            not isinstance(info, dict)
            or arr.dtype.str != info.get("dtype")
            or list(arr.shape) != info.get("shape")
            or _digest(arr) != info.get("sha256")
        ):
            raise ValueError(
                f"{path}: array {key!r} does not match the digest, dtype or shape "
                "recorded when the file was saved; the file is corrupted or was "
                "altered"
            )
    return meta, arrays


def _rebuild(meta, arrays, path, device):
    g = meta["gp"]
    backend = g["backend"]
    if backend not in ("numpy", "torch"):
        raise ValueError(f"{path}: unknown backend {backend!r}")
    dtype_name = g["dtype"]
    if dtype_name not in ("float64", "float32"):
        raise ValueError(f"{path}: unsupported dtype {dtype_name!r}")
    if backend == "torch":
        import torch

        dev = device if device is not None else g.get("device") or "cpu"
        dev = torch.device(dev)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"{path} was saved on {dev}, which this machine does not have; "
                "pass gpgrad.load(path, device='cpu')"
            )
        dtype = _torch_dtype(dtype_name)
    else:
        if device not in (None, "cpu"):
            raise ValueError(
                f"{path} holds a numpy-backend model, which runs on the CPU; "
                f"got device={device!r}"
            )
        dev = None
        dtype = np.dtype(dtype_name)
    r = _Reader(arrays, path, backend, dtype_name, dev)
    kernel = _kernel_from_json(g["kernel"], r)
    noise = g["noise"]
    if isinstance(noise, dict) and "by_kind" in noise:
        noise = {k: r.value(v) for k, v in noise["by_kind"].items()}
    else:
        noise = r.value(noise)
    gp = GP(
        kernel,
        noise=noise,
        mean=r.value(g["mean"]),
        normalize_y=bool(g["normalize_y"]),
        backend=backend,
        device=dev,
        dtype=dtype,
        method=_method_from_json(g["method"], path),
    )
    what = meta.get("object")
    if what == "GP":
        return gp
    if what != "Posterior":
        raise ValueError(f"{path}: unknown object type {what!r}")
    obs = [_obs_from_json(o, r, path) for o in meta["observations"]]
    if not obs:
        raise ValueError(f"{path}: a saved posterior has no observations")
    post = gp.condition(*obs)
    _check_lml(post, meta.get("log_marginal_likelihood"), path)
    return post


def _obs_from_json(o, r, path):
    kind = o["kind"]
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown observation kind {kind!r}")

    def arr(key):
        a = r.array(o[key])
        # points and targets go to the GP's backend; index arrays stay numpy
        return r.tensor(a, keep_dtype=True) if r.gp_backend == "torch" else a

    fields = {name: r.array(o[name]) for name in KINDS[kind].fields}
    return Functional.build(kind, arr("X"), arr("y"), r.value(o["noise"]), **fields)


def _check_lml(post, saved, path):
    if saved is None:
        return
    now = np.asarray(B.to_numpy(post.log_marginal_likelihood()), dtype=np.float64)
    saved = np.asarray(saved, dtype=np.float64)
    if now.shape != saved.shape:
        raise ValueError(
            f"{path}: the re-conditioned posterior's batch shape {now.shape} differs "
            f"from the saved one {saved.shape}"
        )
    tol = 1e-4 if "float32" in str(post.gp.dtype) else 1e-8
    if not np.allclose(now, saved, rtol=tol, atol=tol):
        warnings.warn(
            f"{path}: the log marginal likelihood after loading ({now.tolist()}) "
            f"differs from the saved one ({saved.tolist()}); predictions may differ "
            "from the saved model's (a different gpgrad or BLAS version)",
            GPGradWarning,
            stacklevel=3,
        )
