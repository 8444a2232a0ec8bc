"""Loading of the compiled extension ``hermes._C`` and the report of what it can do."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

try:
    from hermes import _C  # type: ignore[attr-defined]

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    _CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")):
        # `python -m ...` or a script run inside a clone imports the clone, not the install
        warnings.warn(
            f"hermes is imported from the source checkout {_CHECKOUT}, which has no compiled "
            "extension: the slower pure-PyTorch paths run. Run from another folder (the "
            "installed package has the extension) or install in place (`pip install -e .`).",
            stacklevel=2)
    else:
        warnings.warn(
            f"hermes' native extension hermes._C did not load ({_LOAD_ERROR}): the slower "
            "pure-PyTorch paths run. Reinstall hermes (`pip install --force-reinstall "
            "--no-deps hermes-seg`, or `pip install .` in its source folder).", stacklevel=2)


def extension():
    """Return the compiled module ``hermes._C``.

    Raises:
        RuntimeError: when the extension is not importable, with the import error.
    """
    if _C is None:
        raise RuntimeError(
            "the native extension hermes._C is not available "
            f"({_LOAD_ERROR}); reinstall with `pip install .` from the source tree"
        )
    return _C


def extension_loaded() -> bool:
    """True when ``hermes._C`` was imported."""
    return _C is not None


def capabilities() -> dict[str, Any]:
    """What this installation can run.

    Returns a dict with: ``extension_loaded`` (bool), ``extension_error`` (str or None),
    ``extension_path``, ``openmp`` (bool), ``openmp_threads`` (int), ``cuda_compiled`` (bool),
    ``cuda_archs`` (list like ``["sm_80", ...]``), ``cuda_runtime_version`` (int),
    ``cuda_devices`` (names the extension sees now), ``cuda_device_count`` (int),
    ``cuda_error`` (why no device, or ""), ``torch_version``, ``torch_cuda_available`` and
    ``hermes_version``.
    """
    from hermes._version import __version__

    info: dict[str, Any] = {
        "hermes_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda_available": bool(torch.cuda.is_available()),
        "extension_loaded": _C is not None,
        "extension_error": _LOAD_ERROR,
        "extension_path": getattr(_C, "__file__", None),
    }
    if _C is None:
        info.update(
            openmp=False,
            openmp_threads=1,
            cuda_compiled=False,
            cuda_archs=[],
            cuda_runtime_version=0,
            cuda_devices=[],
            cuda_device_count=0,
            cuda_error="extension not loaded",
        )
        return info
    built = dict(_C.build_info())
    info.update(
        openmp=bool(built["openmp"]),
        openmp_threads=int(built["openmp_max_threads"]),
        cuda_compiled=bool(built["cuda_compiled"]),
        cuda_archs=list(built["cuda_archs"]),
        cuda_runtime_version=int(built["cuda_runtime_version"]),
        cuda_devices=list(built["cuda_devices"]),
        cuda_device_count=int(built["cuda_device_count"]),
        cuda_error=str(built["cuda_error"]),
    )
    return info


def extension_required() -> bool:
    """Whether this environment demands the compiled extension (``HERMES_REQUIRE_EXTENSION``).

    Defaults to true: an installed package always ships ``hermes._C``; set the variable to ``0``
    only for a deliberately pure-Python run.
    """
    return os.environ.get("HERMES_REQUIRE_EXTENSION", "1") not in ("0", "false", "no")


@functools.cache
def cuda_kernels_usable() -> bool:
    """Whether the extension's CUDA kernels can run here: compiled in, and its CUDA runtime sees
    a device (checked once). A runtime newer than the driver supports (e.g. an extension built
    with CUDA 13 on a driver for CUDA 12) sees none although torch does: the kernels would fail
    at every launch, so the PyTorch paths are used instead, with one warning naming the cause.
    """
    if _C is None:
        return False
    built = dict(_C.build_info())
    if not built["cuda_compiled"]:
        return False
    if int(built["cuda_device_count"]) > 0:
        return True
    if torch.cuda.is_available():
        warnings.warn(
            "hermes: the native CUDA kernels cannot run on this machine "
            f"({built['cuda_error'] or 'the extension sees no CUDA device'}; extension built "
            f"with CUDA runtime {built['cuda_runtime_version']}, torch with CUDA "
            f"{torch.version.cuda}); using the PyTorch implementations on the GPU instead. "
            "Rebuild hermes with an nvcc matching the driver to get the fused kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False
