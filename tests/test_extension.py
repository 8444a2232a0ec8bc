"""The compiled extension is really loaded and reports its capabilities."""

from __future__ import annotations

import subprocess
import sys

import hermes
import hermes.ops
from hermes.ops._extension import extension_required


def test_extension_loaded_when_required():
    caps = hermes.ops.capabilities()
    if extension_required():
        assert caps["extension_loaded"], (
            "hermes._C is expected but not loaded: "
            f"{caps['extension_error']} (is the source tree shadowing the installed package?)"
        )
        import hermes._C as native  # noqa: F401  - must import for real, not via a fallback

        assert caps["extension_path"] and caps["extension_path"].endswith(".so")
    assert caps["hermes_version"] == hermes.__version__


def test_capabilities_fields_are_consistent():
    caps = hermes.ops.capabilities()
    if not caps["extension_loaded"]:
        return
    assert caps["openmp_threads"] >= 1
    if caps["cuda_compiled"]:
        assert caps["cuda_archs"] and all(a.startswith("sm_") for a in caps["cuda_archs"])
        assert caps["cuda_runtime_version"] > 0
        assert caps["cuda_device_count"] == len(caps["cuda_devices"])
        if caps["cuda_device_count"] == 0:
            assert caps["cuda_error"]
    else:
        assert caps["cuda_archs"] == []


def test_info_module_prints_report(tmp_path):
    run = dict(capture_output=True, text=True, check=True, cwd=tmp_path)  # cwd: not the source tree
    out = subprocess.run([sys.executable, "-m", "hermes.info"], **run).stdout
    assert "native extension" in out and "OpenMP" in out and "CUDA kernels" in out
    loaded = hermes.ops.capabilities()["extension_loaded"]
    assert ("native extension : loaded" in out) == loaded
    js = subprocess.run([sys.executable, "-m", "hermes.info", "--json"], **run).stdout
    assert f'"extension_loaded": {str(loaded).lower()}' in js
