"""The embedded default model ships with the package and runs the demo end to end."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from hermes.cli import main
from hermes.inference.commands import example_path
from hermes.models.default import default_model, default_model_path


def test_embedded_model_is_shipped_small_and_self_describing():
    path = default_model_path()
    assert path.is_file(), f"embedded model missing at {path}"
    assert path.stat().st_size <= 20 * 2**20
    model = default_model()
    meta = model.hermes_metadata
    assert meta["preprocess"]["spacing"] and meta["trained_steps"] > 0
    groups = model.vocab.groups
    assert {g["modality"] for g in groups.values()} >= {"CT", "T1"}
    assert "grey_matter" in model.vocab.tasks and "lungs" in model.vocab.tasks
    assert (path.parent / "MODEL_CARD.md").is_file()


def test_demo_runs_with_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu", "--fast"]) == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out + printed.err
    labels = nib.load(out / "labels.nii.gz")
    src = nib.load(example_path())
    assert labels.shape == src.shape and np.allclose(labels.affine, src.affine)
    names = json.loads((out / "labels.json").read_text())
    assert names and (out / "preview.png").stat().st_size > 1000
    assert np.asarray(labels.dataobj).max() > 0  # something was segmented


def test_embedded_modality_head_reads_the_image():
    """The shipped head was trained with shuffled modality priors: on the bundled T1 example,
    the hypotheses agree on T1 above the default threshold (0.6)."""
    import hermes

    res = hermes.segment(str(example_path()), modality="auto", device="cpu", fast=True,
                         tasks=["brain"])
    assert res.modality == "T1" and res.detection["confidence"] >= 0.6, res.detection
    assert "modality_head" in default_model().hermes_metadata
