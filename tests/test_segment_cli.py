"""The ``hermes segment`` and ``hermes demo`` commands."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from segment_helpers import grid, phantom  # noqa: E402

import hermes  # noqa: E402
import hermes.models as hm  # noqa: E402
from hermes.cli import main  # noqa: E402
from hermes.data.io import load_image, save_image  # noqa: E402
from hermes.inference.commands import example_path  # noqa: E402
from hermes.inference.result import save_marker  # noqa: E402
from hermes.inference.segment import SegmentationInputError  # noqa: E402

torch.set_num_threads(1)
T1_TASKS = ["gm", "wm", "csf"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = hm.build("tiny", tasks=[*T1_TASKS, "liver"], modalities=["CT", "T1"],
                   groups={"brain": {"tasks": T1_TASKS, "modality": "T1"},
                           "abdomen": {"tasks": ["liver"], "modality": "CT"}})
    path = tmp_path_factory.mktemp("model") / "tiny.hermes"
    hm.save(net, path, metadata={"preprocess": {"spacing": [6.0, 6.0, 6.0]},
                                 "train_config": {"crop_size": [32, 32, 32]}})
    return path


def test_bundled_example_is_a_real_t1():
    img, aff = load_image(example_path())
    assert img.shape == (77, 95, 80) and img.dtype == np.uint8
    np.testing.assert_allclose(np.diag(aff)[:3], [2.0, 2.0, 2.0])
    assert 0.2 < (img > 0).mean() < 0.8  # a brain, not an empty or synthetic block
    assert example_path().stat().st_size < 2_000_000


def test_segment_command(tmp_path, ckpt, capsys):
    aff = grid(np.diag([-2.0, 2.0, 3.0]), (48, 44, 30))
    img, _ = phantom(aff, (48, 44, 30))
    src = save_image(tmp_path / "in" / "head.nii.gz", img + 100, aff)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(src), "-o", str(out), "--model", str(ckpt), "--modality",
               "T1", "--tasks", "gm,csf", "--device", "cpu", "--fast", "--per-structure"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "modality: T1" in printed and str(out / "labels.nii.gz") in printed
    assert "gm" in printed and "csf" in printed and "wm" not in printed
    names = json.loads((out / "labels.json").read_text())
    assert names["labels"] == {"0": "background", "1": "gm", "2": "csf"}
    assert names["settings"]["fast"] and names["settings"]["overlap"] == 0.25
    lab, lab_aff = load_image(out / "labels.nii.gz")
    assert lab.shape == (48, 44, 30)
    np.testing.assert_allclose(lab_aff, aff, atol=1e-5)
    assert sorted(p.name for p in (out / "structures").iterdir()) == ["csf.nii.gz", "gm.nii.gz"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    # a second run refuses to overwrite, then overwrites with --force
    rc = main(["segment", "-i", str(src), "-o", str(out), "--model", str(ckpt), "--modality",
               "T1", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "--force" in err and len(err.strip().splitlines()) == 1
    # tasks separated by spaces and commas; overlap and mirroring from the command line; a
    # training run's folder as the model
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.hermes").write_bytes(ckpt.read_bytes())
    rc = main(["segment", "-i", str(src), "-o", str(out), "--model", str(run), "--modality",
               "T1", "--device", "cpu", "--fast", "-q", "--force", "--no-preview",
               "--tasks", "gm", "wm,csf", "--overlap", "0.4", "--tta"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == ""
    names = json.loads((out / "labels.json").read_text())
    assert names["labels"] == {"0": "background", "1": "gm", "2": "wm", "3": "csf"}
    assert names["settings"]["overlap"] == 0.4 and names["settings"]["tta"]
    assert names["hermes_version"] == hermes.__version__
    # the first run's masks and preview are gone: the folder holds one segmentation
    assert not (out / "structures").exists() and not (out / "preview.png").exists()


def test_segment_command_checks_the_output_folder_first(tmp_path, ckpt, capsys, monkeypatch):
    aff = grid(np.diag([2.0, 2.0, 2.0]), (40, 40, 40))
    img, _ = phantom(aff, (40, 40, 40))
    src = save_image(tmp_path / "img.nii.gz", img, aff)
    import hermes.inference.commands as commands
    import hermes.inference.segment as seg

    monkeypatch.setattr(commands.os, "access", lambda path, mode: Path(path) != tmp_path)
    monkeypatch.setattr(seg, "segment", lambda *a, **k: pytest.fail("inference ran"))
    rc = main(["segment", "-i", str(src), "-o", str(tmp_path / "new" / "out"), "--model",
               str(ckpt), "--device", "cpu", "--modality", "T1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path} is not a writable folder" in err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "liverr", "--modality", "T1"], "unknown task 'liverr'"),
    (["--modality", "XR"], "unknown modality 'XR'"),
])
def test_segment_command_errors(tmp_path, ckpt, capsys, argv, message):
    aff = grid(np.diag([2.0, 2.0, 2.0]), (40, 40, 40))
    img, _ = phantom(aff, (40, 40, 40))
    src = save_image(tmp_path / "img.nii.gz", img, aff)
    rc = main(["segment", "-i", str(src), "-o", str(tmp_path / "o"), "--model", str(ckpt),
               "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the reason
    assert rc == 1 and message in err[-1] and err[-1].startswith("hermes segment: error: ")
    assert sum(line.startswith("hermes segment: error") for line in err) == 1
    assert not (tmp_path / "o" / "labels.nii.gz").exists()


def test_segment_command_takes_one_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse kept the last of repeated -i
        main(["segment", "-i", "a.nii.gz", "-i", "b.nii.gz", "-o", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "-i given twice" in capsys.readouterr().err
    for bad in ("1", "-0.1", "half"):
        with pytest.raises(SystemExit) as exit_:
            main(["segment", "-i", "a.nii.gz", "-o", str(tmp_path / "o"), "--overlap", bad])
        assert exit_.value.code == 2 and "--overlap: must be a number in [0, 1)" in \
            capsys.readouterr().err
    # TotalSegmentator's `-o seg.nii.gz`: -o is a folder here, said before anything runs
    rc = main(["segment", "-i", "a.nii.gz", "-o", str(tmp_path / "seg.nii.gz")])
    assert rc == 1 and "names a file: -o is the output folder" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_demo_command(tmp_path, ckpt, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "-o", str(out), "--model", str(ckpt), "--device", "cpu", "--fast"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("labels.nii.gz", "statistics.csv", "preview.png"):
        assert str(out / name) in printed and (out / name).is_file()
    names = json.loads((out / "labels.json").read_text())
    assert names["modality"] == "T1" and list(names["labels"].values())[1:] == T1_TASKS
    lab, aff = load_image(out / "labels.nii.gz")
    img, img_aff = load_image(example_path())
    assert lab.shape == img.shape
    np.testing.assert_allclose(aff, img_aff, atol=1e-5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user file")
    rc = main(["demo", "-o", str(tmp_path / "mine"), "--model", str(ckpt), "--device", "cpu"])
    assert rc == 1 and "--force" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user file"


def test_entry_point_exit_code_and_one_line_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hermes.cli", "segment", "-i", str(tmp_path / "nope.nii.gz"),
         "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
        cwd=tmp_path)  # not the source tree: the installed package
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"hermes segment: error: input {tmp_path / 'nope.nii.gz'} "
                                   "does not exist")
    assert not (tmp_path / "out").exists()


def test_output_piped_into_a_closed_reader_is_not_an_error(tmp_path):
    """`hermes tasks official | head -1`: the reader goes away before hermes writes."""
    proc = subprocess.Popen([sys.executable, "-m", "hermes", "tasks", "official"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # long before the interpreter has started and written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_unsure_modality_detection_names_the_option(tmp_path, ckpt, capsys, monkeypatch):
    import hermes.inference.segment as seg

    aff = grid(np.diag([2.0, 2.0, 3.0]), (40, 40, 24))
    img, _ = phantom(aff, (40, 40, 24))
    src = save_image(tmp_path / "head.nii.gz", img + 100, aff)
    real = seg.segment
    # the detector is never sure enough at this threshold: the CLI's message, not the API's
    monkeypatch.setattr(seg, "segment", lambda *a, **k: real(*a, **k, modality_threshold=1.0))
    rc = main(["segment", "-i", str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt),
               "--device", "cpu", "--fast", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "modality detection confidence" in err
    assert "pass --modality explicitly" in err and "modality=..." not in err


def test_segment_command_on_a_folder_of_images(tmp_path, ckpt, capsys, monkeypatch):
    """A folder of NIfTI/NRRD files: each case into OUTPUT/<case>/ (nnU-Net's `_0000` dropped
    from the name) with the same outputs as one `hermes segment` per file, the model loaded
    once; a case that fails is named and the others are still written."""
    import hermes.inference.segment as seg

    src = tmp_path / "scans"
    shapes = {"head_0000.nii.gz": (40, 36, 30), "scan_2024.nrrd": (36, 40, 24)}
    for name, shape in shapes.items():
        aff = grid(np.diag([2.0, 2.0, 3.0]), shape)
        save_image(src / name, phantom(aff, shape)[0] + 100, aff)
    (src / "broken.nii.gz").write_bytes(b"not an image")
    (src / "notes.txt").write_text("a sidecar file, ignored")
    (src / "._head_0000.nii.gz").write_bytes(b"macOS metadata, hidden: ignored")
    loads = []
    real_resolve = seg.resolve_model
    monkeypatch.setattr(seg, "resolve_model",
                        lambda m, d: loads.append(m) or real_resolve(m, d))
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--modality", "T1", "--device", "cpu", "--fast", "-q"]
    rc = main(["segment", "-i", str(src), "-o", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 3 case(s) failed: broken" in err
    broken = src / "broken.nii.gz"
    assert f"hermes segment: error: case broken: {broken}: " in err
    assert f"{broken}: {broken}" not in err  # the path once, in the reader's message
    assert sorted(p.name for p in out.iterdir()) == ["head", "scan_2024"]
    assert isinstance(loads[0], str) and all(not isinstance(m, str) for m in loads[1:])
    for case, file in (("head", "head_0000.nii.gz"), ("scan_2024", "scan_2024.nrrd")):
        one = tmp_path / f"one_{case}"
        assert main(["segment", "-i", str(src / file), "-o", str(one), *argv]) == 0
        a, aff_a = load_image(out / case / "labels.nii.gz")
        b, aff_b = load_image(one / "labels.nii.gz")
        assert a.shape == shapes[file] and np.array_equal(a, b) and np.allclose(aff_a, aff_b)
    # earlier outputs: refused for the whole folder before any inference runs
    monkeypatch.setattr(seg, "segment", lambda *a, **k: pytest.fail("inference ran"))
    rc = main(["segment", "-i", str(src), "-o", str(out), *argv])
    assert rc == 1 and "--force" in capsys.readouterr().err
    # numbered files: channels of one case for a multi-channel model, cases of their own for a
    # one-channel model; two files naming one case refused
    from hermes.inference.commands import folder_cases

    (src / "broken.nii.gz").unlink()
    save_image(src / "head_0001.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert folder_cases(src, 2) == [("head", [src / "head_0000.nii.gz", src / "head_0001.nii.gz"]),
                                    ("scan_2024", [src / "scan_2024.nrrd"])]
    assert [n for n, _ in folder_cases(src, 1)] == ["head_0000", "head_0001", "scan_2024"]
    (src / "head_0001.nii.gz").rename(src / "head.nrrd")
    assert main(["segment", "-i", str(src), "-o", str(tmp_path / "o2"), *argv]) == 1
    assert "head (head.nrrd, head_0000.nii.gz)" in capsys.readouterr().err


def test_segment_command_takes_channel_files(tmp_path, ckpt, capsys):
    """A two-channel model: nnU-Net channel files (``-i a_0000 a_0001``, or a folder of them)
    give the same labels as one 4-D file; files of other numbers or grids are refused by name."""
    torch.manual_seed(0)
    net = hm.build("tiny", tasks=["blob", "rim"], modalities=["T1"], in_channels=2)
    model = tmp_path / "two.hermes"
    hm.save(net, model, metadata={"preprocess": {"spacing": [6.0, 6.0, 6.0]},
                                  "train_config": {"crop_size": [32, 32, 32]}})
    aff = grid(np.diag([2.0, 2.0, 3.0]), (40, 36, 30))
    img, _ = phantom(aff, (40, 36, 30))
    chans = [img + 100, np.sqrt(img - img.min()) * 7]
    four_d = save_image(tmp_path / "four" / "case.nii.gz", np.stack(chans, -1), aff)
    src = tmp_path / "scans"
    files = [save_image(src / f"case_{i:04d}.nii.gz", c, aff) for i, c in enumerate(chans)]
    argv = ["--model", str(model), "--modality", "T1", "--device", "cpu", "--fast", "-q"]
    assert main(["segment", "-i", str(four_d), "-o", str(tmp_path / "ref"), *argv]) == 0
    ref, _ = load_image(tmp_path / "ref" / "labels.nii.gz")
    assert main(["segment", "-i", *map(str, files), "-o", str(tmp_path / "one"), *argv]) == 0
    assert main(["segment", "-i", str(src), "-o", str(tmp_path / "all"), *argv]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["case"]
    for out in (tmp_path / "one", tmp_path / "all" / "case"):
        got, _ = load_image(out / "labels.nii.gz")
        assert np.array_equal(got, ref)
    # the same through the Python API; files named out of channel order are refused
    res = hermes.segment([str(p) for p in files], model=str(model), modality="T1",
                         device="cpu", fast=True)
    assert np.array_equal(res.labels, ref)
    with pytest.raises(SegmentationInputError, match="numbered 0001, 0000: give them in "
                                                    "channel order, 0000, 0001"):
        hermes.segment([str(p) for p in files[::-1]], model=str(model), modality="T1")
    rc = main(["segment", "-i", str(files[0]), "-o", str(tmp_path / "lone"), *argv])
    assert rc == 1 and "has 1 channel, the model expects 2; nnU-Net channel files: give all " \
        "2 (case_0000 to case_0001)" in capsys.readouterr().err
    # a channel on another grid, a folder among channel files, a gap in the numbering
    other = save_image(tmp_path / "other_0001.nii.gz", chans[1], aff @ np.diag([1, 1, 1.1, 1]))
    with pytest.raises(SegmentationInputError, match="affine differs from .*case_0000"):
        hermes.segment([str(files[0]), str(other)], model=str(model), modality="T1")
    rc = main(["segment", "-i", str(files[0]), str(src), "-o", str(tmp_path / "x"), *argv])
    assert rc == 1 and "is a folder" in capsys.readouterr().err
    # `-i scans/*.nii.gz` for a one-channel model: pointed to the folder
    one = ["--model", str(ckpt), "--modality", "T1", "--device", "cpu", "--fast", "-q"]
    rc = main(["segment", "-i", *map(str, files), "-o", str(tmp_path / "g"), *one])
    assert rc == 1 and "give their folder" in capsys.readouterr().err
    files[1].rename(src / "case_0002.nii.gz")
    rc = main(["segment", "-i", str(src), "-o", str(tmp_path / "y"), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and "_0000 to _0001" in err and "case (0000, 0002)" in err
    (src / "case_0002.nii.gz").unlink()
    save_image(src / "other_0001.nii.gz", chans[1], aff)  # a case without its _0000
    rc = main(["segment", "-i", str(src), "-o", str(tmp_path / "z"), *argv])
    assert rc == 1 and "other (0001)" in capsys.readouterr().err


def test_segment_command_resumes_an_interrupted_run(tmp_path, ckpt, capsys, monkeypatch):
    """``--resume``: cases whose folder holds this model's finished segmentation (labels.json,
    written last) are skipped, unfinished ones rewritten, another model's refused."""
    import hermes.inference.segment as seg

    src = tmp_path / "scans"
    for name in ("a", "b", "c"):
        aff = grid(np.diag([2.0, 2.0, 3.0]), (36, 36, 24))
        save_image(src / f"{name}.nii.gz", phantom(aff, (36, 36, 24))[0] + 100, aff)
    out = tmp_path / "out"
    argv = ["-i", str(src), "-o", str(out), "--model", str(ckpt), "--modality", "T1",
            "--device", "cpu", "--fast", "-q"]
    assert main(["segment", *argv]) == 0
    # b interrupted while saving: its marker names its files, labels.json not yet rewritten
    (out / "b" / "labels.json").unlink()
    save_marker(out / "b").write_text(json.dumps(
        {"files": ["labels.nii.gz", "structures/leftover.nii.gz"]}))
    (out / "b" / "structures").mkdir()
    (out / "b" / "structures" / "leftover.nii.gz").write_bytes(b"from the interrupted save")
    labels = json.loads((out / "c" / "labels.json").read_text())
    (out / "c" / "labels.json").write_text(json.dumps({**labels, "model": "other.hermes"}))
    ran = []
    real = seg.segment
    monkeypatch.setattr(seg, "segment", lambda image, **k: ran.append(Path(image).name)
                        or real(image, **k))
    rc = main(["segment", *argv, "--resume"])
    err = capsys.readouterr().err
    assert rc == 1 and ran == [] and f"{out / 'c'} holds a segmentation by another model" in err
    (out / "c" / "labels.json").write_text(json.dumps(labels))
    assert main(["segment", *argv, "--resume"]) == 0 and ran == ["b.nii.gz"]
    assert json.loads((out / "b" / "labels.json").read_text())["labels"] == labels["labels"]
    assert not (out / "b" / "structures").exists() and not save_marker(out / "b").exists()
    assert main(["segment", *argv, "--resume"]) == 0 and ran == ["b.nii.gz"]  # all done
    one = ["-i", str(src / "a.nii.gz"), "-o", str(out / "a"), "--model", str(ckpt),
           "--modality", "T1", "--device", "cpu", "--fast", "--resume"]
    assert main(["segment", *one]) == 0 and ran == ["b.nii.gz"]
    assert "already holds this model's segmentation" in capsys.readouterr().err
    # other settings than the finished run's: not skipped as done, not overwritten either
    for other in (["--threshold", "0.9"], ["--tasks", "gm"], ["--tta"]):
        assert main(["segment", *one, *other]) == 1 and ran == ["b.nii.gz"]
        assert "was segmented with other settings" in capsys.readouterr().err
    assert main(["segment", *argv, "--resume", "--threshold", "0.9"]) == 1
    # a folder of the user's files (no Hermes marker, no labels.json) is not "unfinished"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labels.nii.gz").write_bytes(b"my ground truth")
    rc = main(["segment", "-i", str(src / "a.nii.gz"), "-o", str(mine), "--model", str(ckpt),
               "--modality", "T1", "--device", "cpu", "--resume", "-q"])
    assert rc == 1 and "--force" in capsys.readouterr().err
    assert (mine / "labels.nii.gz").read_bytes() == b"my ground truth"


def test_output_folder_checks_before_inference(tmp_path):
    """A DICOM series' own folder, a broken link and an input's name are refused up front;
    the input clash is named even with --force (which could not help)."""
    from hermes.inference.commands import _check_outdir

    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"slice")
    for given in (series, series / "IM0001.dcm"):
        with pytest.raises(FileExistsError, match="is the input DICOM series' folder"):
            _check_outdir(series, True, [given])
    _check_outdir(series / "seg", False, [series])  # a sub-folder of its own is fine
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "missing")
    with pytest.raises(FileExistsError, match="broken symbolic link"):
        _check_outdir(broken, True, [series])
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "labels.nii.gz").write_bytes(b"input")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="would overwrite the input"):
            _check_outdir(clash, force, [clash / "labels.nii.gz"])


def test_resume_does_not_skip_a_segmentation_of_another_image(tmp_path, ckpt, capsys):
    aff = grid(np.diag([2.0, 2.0, 3.0]), (36, 36, 24))
    img = phantom(aff, (36, 36, 24))[0] + 100
    a, b = save_image(tmp_path / "a.nii.gz", img, aff), save_image(tmp_path / "b.nii.gz",
                                                                    img[::-1], aff)
    argv = ["-o", str(tmp_path / "out"), "--model", str(ckpt), "--modality", "T1",
            "--device", "cpu", "--fast"]
    assert main(["segment", "-i", str(a), *argv, "-q"]) == 0
    assert main(["segment", "-i", str(a), *argv, "--resume"]) == 0
    assert "already holds this model's segmentation: skipped" in capsys.readouterr().err
    rc = main(["segment", "-i", str(b), *argv, "--resume"])
    assert rc == 1 and "holds a segmentation of another image" in capsys.readouterr().err
    assert main(["segment", "-i", str(b), *argv, "--resume", "--force", "-q"]) == 0
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels["inputs"][0]["path"] == str(b.resolve())


def test_resume_skips_only_the_same_modality_outputs_and_model_file(tmp_path, ckpt, capsys):
    import shutil

    aff = grid(np.diag([2.0, 2.0, 3.0]), (36, 36, 24))
    a = save_image(tmp_path / "a.nii.gz", phantom(aff, (36, 36, 24))[0] + 100, aff)
    model = tmp_path / "m.hermes"
    shutil.copy(ckpt, model)
    argv = ["segment", "-i", str(a), "-o", str(tmp_path / "out"), "--model", str(model),
            "--device", "cpu", "--fast", "-q"]
    assert main([*argv, "--modality", "T1"]) == 0
    assert main([*argv, "--modality", "T1", "--resume"]) == 0  # the same: skipped
    capsys.readouterr()
    for extra, reason in ((["--modality", "CT"], "other settings: modality T1 (here CT)"),
                          (["--modality", "T1", "--largest-component"], "post-processing"),
                          (["--modality", "T1", "--per-structure"], "without structures")):
        assert main([*argv, *extra, "--resume"]) == 1
        assert reason in capsys.readouterr().err
    os.utime(model, ns=(1, 1))  # the model file replaced (retrained into the same path)
    assert main([*argv, "--modality", "T1", "--resume"]) == 1
    assert "an earlier version of the model file" in capsys.readouterr().err


def test_demo_checks_its_output_as_segment_does(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "names a file: -o is the output folder" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
    (tmp_path / "afile").write_text("mine")
    assert main(["demo", "-o", str(tmp_path / "afile")]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
