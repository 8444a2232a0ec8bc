"""Checkpoint round trip, corruption and mismatch errors, and the official-weight importer."""

from __future__ import annotations

import os

import pytest
import torch

import hermes
import hermes.models as hm
from hermes.models.checkpoint import MAGIC


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return hm.build(
        "tiny", tasks=["a/liver", "a/spleen", "b/gm"], modalities=["CT", "T1"],
        groups={"a": {"tasks": ["a/liver", "a/spleen"], "modality": "CT"}},
    ).eval()


def _run(model, x):
    with torch.no_grad():
        return model(x, tasks=["a/spleen", "b/gm"], modality="T1")


def test_round_trip_restores_everything(tiny, tmp_path):
    path = tmp_path / "model.hermes"
    hm.save(tiny, path, metadata={"note": "unit test"})
    header = hm.read_header(path)
    assert header["hermes_version"] == hermes.__version__
    assert header["vocab"]["tasks"] == ["a/liver", "a/spleen", "b/gm"]
    assert header["config"]["preset"] == "tiny" and header["metadata"] == {"note": "unit test"}
    loaded = hm.load(path)
    assert loaded.vocab.group("a") == ["a/liver", "a/spleen"]
    x = torch.randn(1, 1, 32, 16, 16)
    a, b = _run(tiny, x), _run(loaded, x)
    assert torch.equal(a.seg_logits, b.seg_logits)
    assert torch.equal(a.modality_logits, b.modality_logits)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left
    # a training run's folder stands for its model.hermes; another folder is named as such
    assert hm.read_header(tmp_path) == header and hm.is_hermes_checkpoint(tmp_path)
    assert torch.equal(_run(hm.load(tmp_path), x).seg_logits, a.seg_logits)
    (tmp_path / "sub").mkdir()
    with pytest.raises(hm.CheckpointError, match="folder without model.hermes"):
        hm.load(tmp_path / "sub")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_models_of_other_dtypes_load_as_saved(tiny, tmp_path, dtype):
    """A float64 or half model comes back in its dtype with its exact weights (it was cast to
    float32 without a word)."""
    import copy

    model = copy.deepcopy(tiny).to(dtype)
    hm.save(model, tmp_path / "m.hermes")
    loaded = hm.load(tmp_path / "m.hermes")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert b.dtype == a.dtype and torch.equal(a, b), name


def test_save_is_atomic_and_keeps_old_file_on_failure(tiny, tmp_path, monkeypatch):
    path = tmp_path / "model.hermes"
    hm.save(tiny, path)
    before = path.read_bytes()

    def broken_fsync(fd):  # fails after the new bytes were written to the temporary file
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        hm.save(tiny, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.hermes"]


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask):
    from hermes.files import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_truncated_file(tiny, tmp_path):
    path = tmp_path / "m.hermes"
    hm.save(tiny, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(hm.CheckpointError, match="truncated"):
        hm.load(path)
    path.write_bytes(data[:30])
    with pytest.raises(hm.CheckpointError, match="truncated"):
        hm.load(path)


def test_corrupted_file(tiny, tmp_path):
    path = tmp_path / "m.hermes"
    hm.save(tiny, path)
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(hm.CheckpointError, match="corrupted"):
        hm.load(path)


def test_corrupted_headers_and_trailing_bytes(tiny, tmp_path):
    import json
    import struct

    path = tmp_path / "m.hermes"
    hm.save(tiny, path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[len(MAGIC): len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header, payload = json.loads(data[start: start + n]), data[start + n:]

    def rewrite(head: bytes, length: int | None = None, tail: bytes = payload) -> None:
        path.write_bytes(MAGIC + struct.pack("<Q", len(head) if length is None else length)
                         + head + tail)

    cases = [
        (lambda: rewrite(json.dumps(header).encode(), length=1 << 62), "exceeds the file size"),
        (lambda: rewrite(b"[1, 2]"), "not an object"),
        (lambda: rewrite(json.dumps({k: v for k, v in header.items()
                                     if k != "payload_sha256"}).encode()), "no payload_sha256"),
        (lambda: rewrite(json.dumps(header).encode(), tail=payload + b"xy"),
         "2 unexpected bytes after the weights"),
        (lambda: rewrite(json.dumps({**header, "payload_bytes": "12"}).encode()),
         r"wrong type of payload_bytes"),
        (lambda: rewrite(json.dumps({**header, "format_version": "1", "config": []}).encode()),
         r"wrong type of format_version, config"),
        (lambda: rewrite(json.dumps({**header, "metadata": [1]}).encode()),
         r"wrong type of metadata"),
    ]
    for corrupt, words in cases:
        corrupt()
        with pytest.raises(hm.CheckpointError, match=words):
            hm.load(path)
        if "weights" not in words:  # the header alone is already bad
            with pytest.raises(hm.CheckpointError, match=words):
                hm.read_header(path)
    with pytest.raises(hm.CheckpointError, match="is a folder without model.hermes"):
        hm.load(tmp_path)
    # a newer format, whatever its fields look like: not "corrupted"
    for newer in ({"format_version": 99}, {**header, "format_version": 99, "config": [1]}):
        rewrite(json.dumps(newer).encode())
        with pytest.raises(hm.CheckpointError, match="upgrade hermes"):
            hm.read_header(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, imported by dynamo
def test_compiled_and_wrapped_models_save_loadable_checkpoints(tiny, tmp_path):
    hm.save(torch.compile(tiny), tmp_path / "c.hermes")  # no compilation happens until called
    loaded = hm.load(tmp_path / "c.hermes")
    ref = tiny.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_not_a_checkpoint_and_missing(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(hm.CheckpointError, match="from_official"):
        hm.load(plain)
    with pytest.raises(hm.CheckpointError, match="does not exist"):
        hm.load(tmp_path / "nope.hermes")


def test_mismatched_weights_are_named(tiny, tmp_path, monkeypatch):
    path = tmp_path / "m.hermes"
    hm.save(tiny, path)
    header = hm.read_header(path)
    # rewrite the header so that its config no longer matches the stored weights
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[len(MAGIC): len(MAGIC) + 8])
    payload = data[len(MAGIC) + 8 + n:]
    header["config"]["fusion_depths"] = [2, 1, 1, 1, 1]
    head = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + payload)
    with pytest.raises(hm.CheckpointError, match="does not match the architecture: missing"):
        hm.load(path)


def test_official_weights_reproduce_official_logits(official_fixture):
    fx = official_fixture
    model = hm.from_official(fx["official_state_dict"])
    cfg = fx["config"]
    assert model.config.base_width == cfg["base_ch"]
    assert len(model.vocab.tasks) == cfg["tn"] and len(model.vocab.modalities) == cfg["mn"]
    with torch.no_grad():
        seg, mod = model(fx["input"], task_idx=fx["tgt_idx"], modality_idx=fx["mod_idx"])
    ref_seg, ref_mod = fx["seg_logits"], fx["mod_logits"]
    assert seg.shape == ref_seg.shape and mod.shape == ref_mod.shape
    # float32, relative to the logits' scale (|logit| up to ~34): the official code rerun on this
    # machine itself differs from the stored logits by 6e-4 absolute (1.7e-5 relative)
    assert (seg - ref_seg).abs().max() <= 1e-4 * ref_seg.abs().max()
    assert (mod - ref_mod).abs().max() <= 1e-4 * max(1.0, ref_mod.abs().max().item())


def test_official_checkpoint_file_and_ema_preference(official_fixture, tmp_path):
    sd = official_fixture["official_state_dict"]
    bumped = {k: v + 1.0 if k == "out.norm.bias" else v for k, v in sd.items()}
    path = tmp_path / "latest.pth"
    torch.save({"epoch": 3, "model_state_dict": bumped,
                "ema_model_state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    ema = hm.from_official(path)  # EMA weights preferred, DDP prefix stripped
    raw = hm.from_official(path, use_ema=False)
    torch.testing.assert_close(ema.task_head.norm.bias, sd["out.norm.bias"])
    torch.testing.assert_close(raw.task_head.norm.bias, sd["out.norm.bias"] + 1.0)
    # the imported model saves and reloads as a native checkpoint
    hm.save(ema, tmp_path / "converted.hermes")
    assert hm.load(tmp_path / "converted.hermes").config == ema.config


def test_files_that_are_no_official_weights_are_named(tmp_path):
    """What users pass by mistake gets a reason, not torch's unpickling advice: a run's training
    state, an empty file, a failed download (HTML), a torch file holding other objects."""
    import numpy as np

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.hermes").write_bytes(b"x")
    torch.save({"step": 1, "rng": np.random.get_state()}, run / "last.ckpt")
    for load in (hm.from_official, hm.load):  # evaluate and finetune load through hm.load
        with pytest.raises(hm.CheckpointError, match="training state .*use .*model.hermes"):
            load(run / "last.ckpt")
    with pytest.raises(hm.CheckpointError, match="is a folder"):
        hm.from_official(run)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(hm.CheckpointError, match="is an empty file"):
        hm.from_official(tmp_path / "empty.pth")
    (tmp_path / "empty.hermes").write_bytes(b"")  # no training state either
    with pytest.raises(hm.CheckpointError, match="empty.hermes is not a Hermes checkpoint"):
        hm.load(tmp_path / "empty.hermes")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html>Not Found</html>")
    with pytest.raises(hm.CheckpointError, match="no Hermes model"):
        hm.from_official(tmp_path / "page.pth")
    torch.save({"rng": np.random.get_state()}, tmp_path / "other.pth")
    with pytest.raises(hm.CheckpointError, match="holds Python objects besides tensors") as err:
        hm.from_official(tmp_path / "other.pth")
    assert "weights_only=False" not in str(err.value) and "\x1b" not in str(err.value)


def test_official_importer_errors(official_fixture, tmp_path):
    sd = dict(official_fixture["official_state_dict"])
    with pytest.raises(hm.CheckpointError, match="task and"):
        hm.from_official(sd, tasks=["only_one"])
    sd.pop("out.norm.weight")
    with pytest.raises(hm.CheckpointError, match="missing"):
        hm.from_official(sd)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(hm.CheckpointError, match="no Hermes model .* no PyTorch file"):
        hm.from_official(bad)
    level = {k: v for k, v in official_fixture["official_state_dict"].items()
             if not k.startswith("prior_fuse_6.")}
    with pytest.raises(hm.CheckpointError, match=r"\('prior_fuse_6.attn_layers.\*' missing\)"):
        hm.from_official(level)
    # wrapper prefixes in any order: torch.compile of a DDP model, DDP of a compiled one
    full = official_fixture["official_state_dict"]
    for prefix in ("_orig_mod.module.", "module._orig_mod."):
        model = hm.from_official({prefix + k: v for k, v in full.items()})
        torch.testing.assert_close(model.task_head.norm.bias, full["out.norm.bias"])


def test_tasks_command_reads_official_weights(official_fixture, tmp_path, capsys):
    from hermes.cli import main

    path = tmp_path / "hermes_r.pth"
    torch.save({"model_state_dict": official_fixture["official_state_dict"]}, path)
    assert main(["tasks", str(path)]) == 0
    out = capsys.readouterr().out
    n = official_fixture["config"]["tn"]
    assert out.startswith(f"{path} (official weights): {n} tasks")


def test_official_vocabulary_tables():
    vocab = hm.official_vocabulary()
    assert len(vocab.tasks) == 72 and len(vocab.usable_tasks()) == 71
    assert vocab.modalities[:5] == ["CT", "PET", "T1", "T2", "CINE"]
    assert vocab.task_index("lits/liver") == 0 and vocab.task_index("autopet/lesion") == 70
    assert len(vocab.group("amos_ct")) == 15 and len(vocab.group("amos_mr")) == 13
    assert len(vocab.group("structseg_head_neck")) == 22
    assert vocab.modality_index("cine MRI") == 4 and vocab.modality_index("t1w") == 2
    with pytest.raises(KeyError, match="unknown task"):
        vocab.task_index("reserved/unused_71")


def test_full_size_official_shapes_give_official_vocabulary():
    torch.manual_seed(0)
    src = hm.build("tiny", tasks=[f"t{i}" for i in range(72)], modalities=list("abcdef"),
                   num_blocks=(2, 2, 2, 2), fusion_depths=(2, 2, 4, 2, 2))
    # export our weights under official names, then import them back
    from hermes.models.official import _translate

    ours = src.state_dict()
    official = {}
    for key in _official_keys(ours):
        official[key] = ours[_translate(key)]
    model = hm.from_official(official)
    assert model.vocab.task_index("bcv/liver") == 24
    assert model.vocab.modality_index("PET") == 1


def _official_keys(ours):
    """Official names for all our keys, by inverting the translation on candidate names."""
    from hermes.models.official import _BLOCK_PARTS, _FUSION, _HEADS

    inv_fusion = {v: k for k, v in _FUSION.items()}
    inv_block = {v: k for k, v in _BLOCK_PARTS.items()}
    inv_heads = {v: k for k, v in _HEADS.items()}
    out = []
    for k in ours:
        p = k.split(".")
        if p[0] == "stem":
            out.append(("inc.conv1." if p[1] == "conv" else "inc.conv2.") + ".".join(p[2:]))
        elif p[0] == "down":
            out.append(f"down{int(p[1]) + 1}.conv.{int(p[3]) + 1}." + ".".join(p[4:]))
        elif p[0] == "up":
            out.append(f"up{int(p[1]) + 1}.conv.{p[3]}." + ".".join(p[4:]))
        elif p[0] == "fusion":
            name = inv_fusion[int(p[1])]
            if p[2] == "task_priors":
                out.append(f"{name}.task_prior")
            elif p[2] == "modality_priors":
                out.append(f"{name}.modality_prior")
            else:
                part = ".".join(p[5:-1])
                out.append(f"{name}.attn_layers.{p[4]}.{inv_block[part]}.{p[-1]}")
        else:
            out.append(f"{inv_heads['.'.join(p[:-1])]}.{p[-1]}")
    return out


def test_tasks_command_names_the_input_channels(tmp_path, capsys):
    from hermes.cli import main

    for channels in (1, 3):
        path = tmp_path / f"c{channels}.hermes"
        hm.save(hm.build("tiny", tasks=["tumour"], modalities=["T1"], in_channels=channels), path)
        assert main(["tasks", str(path)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert ("3 input channels" in first) == (channels == 3), first


def test_training_state_is_checksummed(tmp_path):
    import numpy as np

    from hermes.models.checkpoint import read_training_state, write_training_state

    state = {"step": 7, "w": torch.randn(50, 40), "rng": np.random.get_state()}
    write_training_state(tmp_path / "last.ckpt", state)
    back = read_training_state(tmp_path / "last.ckpt")
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    raw = (tmp_path / "last.ckpt").read_bytes()
    for where in (60, len(raw) // 2, len(raw) - 1):  # header, a tensor, the zip's end
        damaged = bytearray(raw)
        damaged[where] ^= 0x01
        (tmp_path / "bad.ckpt").write_bytes(bytes(damaged))
        with pytest.raises(hm.CheckpointError, match="bad.ckpt is damaged"):
            read_training_state(tmp_path / "bad.ckpt")
    torch.save(state, tmp_path / "old.ckpt")  # an older Hermes' state: no checksum, still read
    assert read_training_state(tmp_path / "old.ckpt")["step"] == 7
    (tmp_path / "junk.ckpt").write_bytes(b"not a state")
    with pytest.raises(hm.CheckpointError, match="cannot read training state .*junk.ckpt"):
        read_training_state(tmp_path / "junk.ckpt")
    # given as a model, even without model.hermes beside it (an unfinished run): named, and
    # the run to finish rather than a model file that is not there
    for load in (hm.load, hm.from_official):
        with pytest.raises(hm.CheckpointError, match="training state .*not a model, and its run "
                                                     "has not written .*model.hermes yet: "
                                                     "finish the run"):
            load(tmp_path / "last.ckpt")


def test_non_finite_weights_are_refused(tmp_path, monkeypatch):
    import hermes.models.checkpoint as ckpt

    model = hm.build("tiny", tasks=["liver"], modalities=["CT"])
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite weights in .*not written"):
        hm.save(model, tmp_path / "nan.hermes")
    with pytest.raises(IsADirectoryError, match="is a folder: give the file to write"):
        hm.save(model, tmp_path)
    with pytest.raises(ValueError, match="task names must be non-empty"):
        hm.build("tiny", tasks=["liver", ""], modalities=["CT"])
    assert not (tmp_path / "nan.hermes").exists()
    monkeypatch.setattr(ckpt, "non_finite_tensors", lambda state: [])  # as a bad writer would
    hm.save(model, tmp_path / "nan.hermes")
    monkeypatch.undo()
    with pytest.raises(hm.CheckpointError, match="nan.hermes has NaN or infinite weights"):
        hm.load(tmp_path / "nan.hermes")
