"""The compiled extension is really loaded and reports its capabilities."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
    cli = subprocess.run([sys.executable, "-m", "hermes", "info"], **run).stdout  # python -m hermes
    assert cli == out


def test_version_flag_and_a_missing_extension_is_announced(tmp_path, capsys):
    from hermes.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"hermes {hermes.__version__}"
    # an extension that does not load is said once at import (the fallbacks are much slower)
    code = "import sys; sys.modules['hermes._C'] = None; import hermes.ops"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stderr
    assert "pure-PyTorch paths run" in err


class _FakeExtension:
    """An extension compiled with CUDA whose runtime sees no device (driver too old)."""

    pa_cuda_compiled = True

    def __init__(self, count: int):
        self.count = count

    def build_info(self):
        return {"cuda_compiled": True, "cuda_device_count": self.count,
                "cuda_runtime_version": 13000,
                "cuda_error": "CUDA driver version is insufficient for CUDA runtime version"}

    def pa_bias_gelu(self, *args):  # presence marks the prior-attention kernels
        raise AssertionError("must not be launched")

    def aggregate_add_cuda(self, *args):
        raise AssertionError("must not be launched")


@pytest.mark.parametrize("count", [0, 1])
def test_cuda_kernels_gated_on_the_extension_seeing_a_device(monkeypatch, count):
    """A CUDA build that cannot reach the GPU (runtime newer than the driver) must fall back to
    the PyTorch paths with a warning, not fail at every launch."""
    from hermes.ops import _extension, _prior_kernels, aggregate

    monkeypatch.setattr(_extension, "_C", _FakeExtension(count))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _extension.cuda_kernels_usable.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        if count == 0:
            with pytest.warns(RuntimeWarning, match="driver version is insufficient"):
                assert not _extension.cuda_kernels_usable()
        else:
            assert _extension.cuda_kernels_usable()
        assert _prior_kernels.native_available(cuda, torch.float32) == bool(count)
        assert (aggregate._native(cuda, "aggregate_add") is not None) == bool(count)
        assert aggregate._native(torch.device("cpu"), "aggregate_add") is None  # fake has none
    finally:
        _extension.cuda_kernels_usable.cache_clear()


def test_subpackages_after_a_plain_import():
    """README's ``hermes.ops.capabilities()`` works after ``import hermes`` alone (checked in
    a fresh interpreter: here other tests have imported hermes.ops already)."""
    import subprocess
    import sys

    code = ("import hermes; assert 'extension_loaded' in hermes.ops.capabilities(); "
            "assert hermes.models.build and hermes.data.load_collection\n"
            "try:\n    hermes.nothing\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert "has no attribute 'nothing'" in out.stdout


def test_info_on_a_machine_without_a_driver():
    """cudart reports a missing driver as an insufficient one: hermes info says both."""
    from hermes.info import format_capabilities
    from hermes.ops import capabilities

    info = {**capabilities(), "extension_loaded": True, "extension_path": "x", "openmp": True,
            "openmp_threads": 2, "cuda_compiled": True, "cuda_archs": ["sm_90"],
            "cuda_runtime_version": "13.0", "cuda_device_count": 0,
            "cuda_error": "CUDA driver version is insufficient for CUDA runtime version"}
    for torch_sees, said in ((False, True), (True, False)):
        text = format_capabilities({**info, "torch_cuda_available": torch_sees})
        assert ("or no NVIDIA driver or GPU at all" in text) is said
