"""Fine-tuning modes: freezing is exact, new tasks are learned, distillation, CLI."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import hermes.data as hd
import hermes.models as hm
from hermes.data.synthetic import generate_collection
from hermes.models.extend import extend_vocabulary
from hermes.training.finetune import (
    AlignedCollection,
    Distiller,
    count_trainable,
    distillation_loss,
    finetune,
    frozen_layout,
    make_param_groups,
    new_names,
)

TRAIN = dict(crop_size=(32, 24, 24), batch_size=2, steps=2, workers=0, checkpoint_every=10**6,
             progress=False, tensorboard=False, augment=False, lr=1e-3)


def _cache(root, datasets, name):
    y = generate_collection(root / f"src_{name}", seed=5, cases_per_dataset=2, datasets=datasets,
                            size=(24, 30))
    cfg = yaml.safe_load(y.read_text())
    cfg.pop("shared_tasks")  # dataset-prefixed task names
    cfg["name"] = name
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return hd.preprocess(hd.load_collection(y), root / f"cache_{name}", workers=1,
                         progress=False, image_order=1, spacing=6.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    old = _cache(root, ("synth_ct", "synth_t1"), "old")
    new = _cache(root, ("synth_t2",), "new")
    torch.manual_seed(0)
    base = hm.build("tiny", tasks=old.tasks, modalities=old.modalities, groups=old.groups)
    hm.save(base, root / "base.hermes")
    return root, old, new, hm.load(root / "base.hermes")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach().cpu(), b.detach().cpu())


def _assert_old_weights_kept(sb: dict, sm: dict, t_old: int) -> None:
    """Every weight of the old state ``sb`` is in ``sm`` bit for bit (task tables: the old rows
    and the null row)."""
    for k, v in sb.items():
        if k.endswith("task_priors"):
            assert _same(sm[k][:t_old], v[:t_old]) and _same(sm[k][-1], v[-1]), k
        else:
            assert _same(sm[k], v), k


def _old_ct_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of two old tasks requested on their own."""
    with torch.no_grad():
        return model(x, tasks=["synth_ct/liver", "synth_ct/kidney"], modality="CT").seg_logits


def test_new_names_and_aligned_collection(setup):
    _, old, new, base = setup
    tasks, mods = new_names(base.vocab, new)
    assert tasks == ["synth_t2/kidney", "synth_t2/bladder"] and mods == []
    ext = extend_vocabulary(base, tasks, mods, groups=new.groups)
    aligned = AlignedCollection([(new, 0.5), (old, 0.5)], ext.vocab)
    assert set(aligned.datasets) == {"synth_t2", "synth_ct", "synth_t1"}
    t2 = aligned.datasets["synth_t2"]
    assert [ext.vocab.tasks[i] for i in t2.task_indices] == list(t2.tasks)
    assert ext.vocab.modalities[t2.modality_index] == "T2"
    assert aligned.sampling_weights["synth_t2"] == pytest.approx(0.5)
    assert sum(aligned.sampling_weights.values()) == pytest.approx(1.0)
    assert {c.dataset for c in aligned.split("train")} == {"synth_t2", "synth_ct", "synth_t1"}


def test_row_freezing_is_exact_under_adamw():
    torch.manual_seed(0)
    m = hm.build("tiny", tasks=["a", "b"], modalities=["CT", "T1"])
    ext = extend_vocabulary(m, ["c"], ["US"])
    rows, params = frozen_layout(ext, 2, 2, "incremental")
    assert rows["fusion.0.task_priors"] == [0, 1, 3] and rows["fusion.0.modality_priors"] == [0, 1]
    assert not params
    before = {k: v.clone() for k, v in ext.state_dict().items()}
    opt = torch.optim.AdamW(make_param_groups(rows, params, weight_decay=0.1)(ext), lr=1e-2)
    x = torch.randn(1, 1, 32, 16, 16)
    for _ in range(2):
        out = ext(x, tasks=["a", "c"], modality="US")
        loss = out.seg_logits.square().mean() + out.modality_logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ext.state_dict()
    for k, r in rows.items():
        assert _same(after[k][r], before[k][r]), k  # frozen rows: bit-identical
    assert not _same(after["fusion.0.task_priors"][2], before["fusion.0.task_priors"][2])
    assert not _same(after["fusion.2.modality_priors"][2], before["fusion.2.modality_priors"][2])
    assert not _same(after["stem.conv.weight"], before["stem.conv.weight"])  # backbone trains
    # priors mode freezes everything but prior tables and heads
    _, pparams = frozen_layout(ext, 2, 2, "priors")
    assert pparams and all(not k.startswith(("task_head", "modality_head")) and
                           "priors" not in k for k in pparams)
    assert frozen_layout(ext, 2, 2, "full") == ({}, set())
    from hermes.models.extend import add_decoder_branch  # a branch's task head is a head

    _, bparams = frozen_layout(add_decoder_branch(ext, 2), 2, 2, "priors")
    assert "branches.0.task_head.fc1.weight" not in bparams
    assert "branches.0.up.0.blocks.0.conv1.conv.weight" in bparams
    # new decoder: the branch trains whole, the encoder tables' new rows and the new modality's
    # head row train; the main decoder's tables are frozen whole (old rows restored on export)
    brows, bparams = frozen_layout(add_decoder_branch(ext, 2), 2, 2, "incremental",
                                   new_branch="branches.0.")
    assert not any(k.startswith("branches.") for k in [*brows, *bparams])
    assert brows["modality_head.fc2.weight"] == [0, 1] and "modality_head.fc2.weight" not in bparams
    assert "fusion.0.task_priors" in brows and "fusion.0.task_priors" not in bparams
    assert "fusion.3.task_priors" in brows and "fusion.3.task_priors" in bparams
    assert "up.3.blocks.0.conv1.conv.weight" in bparams
    # incremental with frozen shared weights: only prior tables (at the scaled rate) and the
    # new modality's output row train
    rows_s, sparams = frozen_layout(ext, 2, 2, "incremental", freeze_shared=True)
    head = {"modality_head.fc2.weight": [0, 1], "modality_head.fc2.bias": [0, 1]}
    assert rows_s == {**rows, **head}
    assert sparams == {k for k, _ in ext.named_parameters()
                       if not k.endswith("priors") and k not in head}
    groups = make_param_groups(rows_s, sparams, 0.1, prior_lr_scale=20.0)(ext)
    assert [(len(g["params"]), g.get("lr_scale", 1.0)) for g in groups] == [(10, 20.0), (2, 1.0)]
    named = dict(ext.named_parameters())  # trained: the new prior rows and new head row
    expected = sum(v.numel() - len(rows_s[k]) * v[0].numel()
                   for k, v in named.items() if k.endswith("priors"))
    expected += named["modality_head.fc2.weight"].shape[1] + 1
    assert count_trainable(ext, rows_s, sparams) == expected
    assert count_trainable(ext, {}, set()) == sum(p.numel() for p in ext.parameters())


def test_distillation_loss_hand_computed():
    t = torch.tensor([0.0, 2.0, -1.0]).view(1, 3, 1, 1, 1)
    s = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1)
    valid = torch.tensor([[True, True, False]])

    def kl(ts, ss):
        p, q = 1 / (1 + math.exp(-ts)), 1 / (1 + math.exp(-ss))
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    exp = (kl(0.0, 1.0) + kl(2.0, 2.0)) / 2
    assert distillation_loss(s, t, valid).item() == pytest.approx(exp, rel=1e-5)
    assert distillation_loss(t, t, valid.new_ones(1, 3)).abs().item() < 1e-6


def test_distiller_picks_groups_of_the_same_modality():
    m = hm.build("tiny", tasks=["a/x", "a/y", "b/z"], modalities=["CT", "T1", "T2"],
                 groups={"a": {"tasks": ["a/x", "a/y"], "modality": "CT"},
                         "b": {"tasks": ["b/z"], "modality": "T1"}})
    d = Distiller(m, 1.0, null_tokens=1)
    # CT sample -> group a; T1 sample -> group b; T2 (no old group): groups rotate with
    # step + sample position, (0 + 2) % 2 -> group a, with its own modality CT
    task_idx, valid, mod = d.choose(torch.tensor([0, 1, 2]), step=0)
    assert task_idx.tolist() == [[0, 1, -1], [2, -1, -1], [0, 1, -1]]
    assert valid.tolist() == [[True, True], [True, False], [True, True]]
    assert mod.tolist() == [0, 1, 0]
    task_idx, _, mod = d.choose(torch.tensor([2]), step=1)
    assert task_idx.tolist() == [[2, -1]] and mod.tolist() == [1]


def test_priors_mode_trains_only_new_rows_and_heads(setup, tmp_path):
    _, _, new, base = setup
    res = finetune(base, new, tmp_path / "p", mode="priors", **TRAIN)
    assert res.new_tasks == ["synth_t2/kidney", "synth_t2/bladder"]
    m = hm.load(res.path)
    assert m.vocab.tasks == base.vocab.tasks + res.new_tasks
    assert m.vocab.group("synth_t2") == res.new_tasks and "synth_ct" in m.vocab.groups
    sb, sm = base.state_dict(), m.state_dict()
    t_old = len(base.vocab.tasks)
    for k, v in sb.items():
        if k.endswith("task_priors"):
            assert _same(sm[k][:t_old], v[:t_old]) and _same(sm[k][-1], v[-1])
            assert not _same(sm[k][t_old:-1], sm[k][t_old - 2:t_old])  # new rows moved
        elif k.endswith("modality_priors"):
            assert _same(sm[k], v)
        elif not k.startswith(("task_head", "modality_head")):
            assert _same(sm[k], v), k  # backbone and fusion blocks frozen
    assert not _same(sm["task_head.fc1.weight"], sb["task_head.fc1.weight"])
    meta = hm.read_header(res.path)["metadata"]
    assert meta["finetune"]["mode"] == "priors"
    assert meta["finetune"]["init_sources"]["tasks"] == {"synth_t2/kidney": "synth_ct/kidney",
                                                         "synth_t2/bladder": None}
    assert meta["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # old and new tasks in one request
        out = m(x, tasks=["synth_ct/liver", "synth_t2/bladder"], modality="T2")
    assert out.seg_logits.shape == (1, 2, 32, 32, 32)
    # hermes.segment() on the checkpoint: old and new tasks by name, and the new dataset's
    # tasks by default for its modality (from the vocabulary groups the checkpoint carries)
    import numpy as np

    import hermes

    img = np.random.default_rng(0).normal(size=(40, 36, 40)).astype(np.float32)
    with pytest.warns(UserWarning, match="other modalities than T2: synth_ct/liver"):
        seg = hermes.segment(img, tasks=["synth_ct/liver", "synth_t2/bladder"], modality="T2",
                             model=str(res.path), spacing=(6.0, 6.0, 6.0), device="cpu")
    assert seg.task_names == ["synth_ct/liver", "synth_t2/bladder"]
    assert seg.masks.shape == (2, 40, 36, 40)
    seg = hermes.segment(img, modality="T2", model=str(res.path), spacing=(6.0, 6.0, 6.0),
                         device="cpu")
    assert seg.task_names == res.new_tasks
    # the run folder records the fine-tuning settings: a resume with others is refused by name
    with pytest.raises(ValueError, match=r"mode='priors' \(now 'full'\)"):
        finetune(base, new, tmp_path / "p", mode="full", resume=True, **TRAIN)
    again = finetune(base, new, tmp_path / "p", mode="priors", resume=True, **TRAIN)
    assert again.path == res.path


def test_incremental_with_distillation_and_rehearsal(setup, tmp_path):
    _, old, new, base = setup
    res = finetune(base, new, tmp_path / "i", mode="incremental", rehearsal=old,
                   rehearsal_fraction=0.5, **TRAIN)
    m = hm.load(res.path)
    sb, sm = base.state_dict(), m.state_dict()
    t_old = len(base.vocab.tasks)
    assert _same(sm["fusion.1.task_priors"][:t_old], sb["fusion.1.task_priors"][:t_old])
    assert _same(sm["fusion.1.task_priors"][-1], sb["fusion.1.task_priors"][-1])
    key = "up.0.blocks.0.conv1.conv.weight"
    assert not _same(sm[key], sb[key])  # the rest trains
    with open(tmp_path / "i" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["extra"]) >= -1e-6 for r in rows)
    meta = hm.read_header(res.path)["metadata"]["finetune"]
    assert meta["distill_weight"] == 1.0 and meta["rehearsal_fraction"] == 0.5


def test_logged_lr_is_the_base_rate_in_every_mode(setup, tmp_path):
    """log.csv's lr is the scheduled base rate (--lr through warm-up and cosine), not the rate
    of whichever parameter group comes first (with freeze_shared: the scaled prior tables)."""
    _, _, new, base = setup
    logged = {}
    for name, opts in (("full", {"mode": "full"}),
                       ("frozen", {"mode": "incremental", "freeze_shared": True})):
        finetune(base, new, tmp_path / name, prior_lr_scale=10.0, warmup_steps=2, **opts,
                 **TRAIN)
        with open(tmp_path / name / "log.csv", newline="") as f:
            logged[name] = [float(r["lr"]) for r in csv.DictReader(f)]
    assert logged["full"] == logged["frozen"] == [5e-4, 1e-3]  # lr 1e-3, 2 warm-up steps


def test_cli_finetune_full(setup, tmp_path, capsys):
    from hermes.cli import main

    root, _, new, base = setup
    args = ["finetune", str(root / "base.hermes"), str(new.cache_dir), "--init", "random",
            "--steps", "1", "--crop", "32", "24", "24", "--workers", "0", "--no-augment",
            "--device", "cpu"]
    rc = main([*args, "--mode", "full", "--out", str(tmp_path / "f")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "new task synth_t2/kidney: prior initialised from random" in out
    m = hm.load(tmp_path / "f" / "model.hermes")
    t_old = len(base.vocab.tasks)
    # full mode: old prior rows train too
    assert not _same(m.fusion[0].task_priors[:t_old], base.fusion[0].task_priors[:t_old])
    capsys.readouterr()
    assert main([*args, "--mode", "incremental", "--new-decoder",
                 "--out", str(tmp_path / "nd")]) == 0
    assert hm.load(tmp_path / "nd" / "model.hermes").config.decoder_branches == (t_old,)
    listing_ft = capsys.readouterr().out
    assert "trained " in listing_ft and " parameters (incremental)" in listing_ft
    assert main(["tasks", str(tmp_path / "nd" / "model.hermes")]) == 0
    listing = capsys.readouterr().out
    assert f"{t_old:3d}  synth_t2/kidney  (decoder branch 0)" in listing
    assert "new tasks segmented by decoder branch 0" in listing_ft
    assert "synth_ct/liver\n" in listing


def test_incremental_with_frozen_shared_weights_keeps_old_outputs_exactly(setup, tmp_path):
    _, old, new, base = setup
    res = finetune(base, new, tmp_path / "fs", mode="incremental", freeze_shared=True,
                   prior_lr_scale=20.0, **TRAIN)
    m = hm.load(res.path)
    sb, sm = base.state_dict(), m.state_dict()
    t_old = len(base.vocab.tasks)
    _assert_old_weights_kept(sb, sm, t_old)
    for k in sb:
        if k.endswith("task_priors"):
            assert not _same(sm[k][t_old:-1], torch.zeros_like(sm[k][t_old:-1]))
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(_old_ct_logits(base, x), _old_ct_logits(m, x))  # bit for bit
    assert hm.read_header(res.path)["metadata"]["finetune"]["freeze_shared"] is True
    with pytest.raises(ValueError, match="freeze_shared"):
        finetune(base, new, tmp_path / "x", mode="full", freeze_shared=True, **TRAIN)
    with pytest.raises(ValueError, match="distill .* must be >= 0, got -1"):
        finetune(base, new, tmp_path / "x", mode="incremental", distill=-1, **TRAIN)


def test_cli_finetune_resume_takes_the_runs_own_options(setup, tmp_path, capsys):
    from hermes.cli import main

    root, _, new, _ = setup
    common = [str(root / "base.hermes"), str(new.cache_dir), "--out", str(tmp_path / "r"),
              "--workers", "0", "--device", "cpu"]
    assert main(["finetune", *common, "--mode", "incremental", "--freeze-shared", "--init",
                 "random", "--steps", "2", "--crop", "32", "24", "24", "--seed", "3",
                 "--lr", "1e-3", "--no-augment", "--quiet"]) == 0
    first = hm.load(tmp_path / "r" / "model.hermes")
    # --resume alone continues with the run's settings (mode, flags, steps, crop, seed, lr)
    assert main(["finetune", *common, "--resume", "--quiet"]) == 0
    again = hm.load(tmp_path / "r" / "model.hermes")
    meta = again.hermes_metadata["finetune"]
    assert meta["mode"] == "incremental" and meta["freeze_shared"] is True
    assert all(_same(a, b) for a, b in zip(first.state_dict().values(),
                                           again.state_dict().values(), strict=True))
    # an option given with another value is still refused by name
    assert main(["finetune", *common, "--resume", "--seed", "4"]) != 0
    assert "seed=3 (now 4)" in capsys.readouterr().err


def _torchrun_finetune(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``hermes finetune ARGS`` in two gloo processes on the CPU (each prints at its end
    whether it left the process group)."""
    script = tmp_path / "finetune_ddp.py"
    script.write_text("import sys, torch.distributed as dist\n"
                      "from hermes.cli import main\n"
                      "code = main(sys.argv[1:])\n"
                      "print('process group left:', not dist.is_initialized())\n"
                      "sys.exit(code)\n")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "finetune", *args, "--workers", "0", "--device", "cpu",
         "--crop", "32", "24", "24", "--no-augment"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, cwd=tmp_path,
        timeout=600)


def test_cli_finetune_under_torchrun(setup, tmp_path):
    """Two gloo processes, incremental with rehearsal: ranks in sync, one model written by
    rank 0 with the new tasks, no DDP gradient-layout warnings, the process group left."""
    root, old, new, _ = setup
    out = tmp_path / "ddp"
    proc = _torchrun_finetune(tmp_path, str(root / "base.hermes"), str(new.cache_dir),
                              "--rehearsal", str(old.cache_dir), "--out", str(out),
                              "--mode", "incremental", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("process group left: True") == 2
    assert "ddp: parameters in sync across 2 ranks" in proc.stdout
    assert proc.stdout.count("model written to") == 1
    assert "Grad strides do not match" not in proc.stderr
    model = hm.load(out / "model.hermes")
    assert {"synth_t2/kidney", "synth_t2/bladder"} <= set(model.vocab.tasks)
    assert model.hermes_metadata["finetune"]["mode"] == "incremental"


def test_cli_finetune_new_decoder_under_torchrun(setup, tmp_path):
    """A model with a decoder branch trains under DDP (find_unused_parameters must see the
    output's tensors, else the first backward fails with "mark a variable ready only once")."""
    root, _, new, base = setup
    out = tmp_path / "ddp_nd"
    proc = _torchrun_finetune(tmp_path, str(root / "base.hermes"), str(new.cache_dir),
                              "--out", str(out), "--mode", "incremental", "--new-decoder",
                              "--steps", "1", "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp: parameters in sync across 2 ranks" in proc.stdout
    model = hm.load(out / "model.hermes")
    assert model.config.decoder_branches == (len(base.vocab.tasks),)


def test_output_tensors_are_visible_to_ddp():
    """DDP finds the forward's tensors; the output still unpacks as (seg, modality)."""
    from torch.nn.parallel.distributed import _find_tensors

    from hermes.models.hermes_resunet import HermesOutput

    seg, mod, mask = torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 3), torch.ones(1, 2).bool()
    out = HermesOutput(seg, mod, [["a", "b"]], mask)
    assert [id(t) for t in _find_tensors(out)] == [id(seg), id(mod), id(mask)]
    s, m = out
    assert s is seg and m is mod and out[1] is mod and len(out) == 2


def test_refusals_grid_resume_base_and_nothing_new(setup, tmp_path):
    root, old, new, base = setup
    # a base trained on another grid than the new cache
    other_grid = {**new.params, "spacing": [3.0, 3.0, 3.0]}
    hm.save(base, tmp_path / "b3.hermes", metadata={"preprocess": other_grid})
    with pytest.raises(ValueError, match=r"spacing \[3.0, 3.0, 3.0\] but the cache .* has "
                                         r"\[6.0, 6.0, 6.0\]"):
        finetune(tmp_path / "b3.hermes", new, tmp_path / "g", mode="full", **TRAIN)
    with pytest.raises(ValueError, match="spacing"):  # a loaded model knows its metadata too
        finetune(hm.load(tmp_path / "b3.hermes"), new, tmp_path / "g", mode="full", **TRAIN)
    assert not (tmp_path / "g").exists()
    # images of another channel count than the base model takes: named before any run folder
    two = hm.build("tiny", tasks=old.tasks, modalities=old.modalities, groups=old.groups,
                   in_channels=2)
    with pytest.raises(ValueError, match=r"the new collection \(.*\) has 1-channel images, the "
                                         r"base model takes 2"):
        finetune(two, new, tmp_path / "g", mode="full", **TRAIN)
    assert not (tmp_path / "g").exists()
    # resuming a run with another base model of the same vocabulary
    finetune(base, new, tmp_path / "r", mode="priors", **TRAIN)
    torch.manual_seed(1)
    other = hm.build("tiny", tasks=old.tasks, modalities=old.modalities, groups=old.groups)
    with pytest.raises(ValueError, match="started with base_weights="):
        finetune(other, new, tmp_path / "r", mode="priors", resume=True, **TRAIN)
    # frozen shared weights with nothing new to train
    with pytest.raises(ValueError, match="brings none"):
        finetune(base, old, tmp_path / "n", mode="incremental", freeze_shared=True, **TRAIN)
    with pytest.warns(UserWarning, match="trains only the two heads"):
        finetune(base, old, tmp_path / "p", mode="priors", **TRAIN)


def test_finetuning_into_a_folder_another_run_writes_is_refused(setup, tmp_path, capsys):
    """The run folder is locked for the whole fine-tuning (finetune.json, the run, the
    export): a second run into it is refused before it writes anything."""
    from hermes.cli import main
    from hermes.files import LOCK_NAME, FolderBusyError, folder_lock

    root, _, new, base = setup
    out = tmp_path / "busy"
    out.mkdir()
    with folder_lock(out, "run folder"):
        with pytest.raises(FolderBusyError, match=f"run folder {out} is being written"):
            finetune(base, new, out, mode="full", **TRAIN)
        assert main(["finetune", str(root / "base.hermes"), str(new.cache_dir), "--out",
                     str(out), "--steps", "1", "--crop", "32", "24", "24", "--workers", "0",
                     "--device", "cpu", "-q"]) == 1
        assert "hermes finetune: error: run folder" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finetune(base, new, out, mode="full", **TRAIN)
    assert (out / "model.hermes").exists() and not (out / LOCK_NAME).exists()


def test_the_base_models_training_run_is_not_taken_for_a_fine_tuning_run(setup, tmp_path,
                                                                          capsys):
    """`finetune RUN COLL --out RUN [--resume]`: said to be a training run (it failed in torch
    with "a different number of parameter groups", or pointed to --resume); the run's model is
    left as it was. A checkpoint of another kind of run is named as such by the trainer."""
    from hermes.cli import main
    from hermes.training.trainer import TrainConfig, Trainer, train

    _, old, _, _ = setup
    run = tmp_path / "base_run"
    opts = {k: v for k, v in TRAIN.items() if k != "steps"}
    cfg = TrainConfig(cache_dir=str(old.cache_dir), out_dir=str(run), steps=1, **opts)
    train(cfg)
    model = (run / "model.hermes").read_bytes()
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"{run} holds a training run .*not a fine-tuning "
                                             "run: fine-tune into another --out"):
            finetune(run / "model.hermes", old, run, mode="full", resume=resume, **TRAIN)
    assert main(["finetune", str(run), str(old.cache_dir), "--out", str(run), "--resume",
                 "--workers", "0", "--device", "cpu", "-q"]) == 1
    assert "hermes finetune: error: " in capsys.readouterr().err
    assert (run / "model.hermes").read_bytes() == model
    with pytest.raises(ValueError, match="written by another kind of run .* parameter groups "
                                         r"of \[\d+\] tensors"):
        Trainer(cfg, resume=True, param_groups=make_param_groups({}, set(), 0.0))


def test_a_dataset_named_like_an_old_group_adds_its_tasks(setup):
    _, old, new, base = setup
    groups = {"synth_ct": {"tasks": ["synth_t2/bladder"], "modality": "CT"}}
    ext = extend_vocabulary(base, ["synth_t2/bladder"], [], groups=groups)
    assert ext.vocab.group("synth_ct") == [*base.vocab.group("synth_ct"), "synth_t2/bladder"]
    with pytest.raises(ValueError, match="'synth_ct' of the collection is T2, the model's group"):
        extend_vocabulary(base, ["synth_t2/bladder"], [],
                          groups={"synth_ct": {"tasks": ["synth_t2/bladder"], "modality": "T2"}})


def test_incremental_new_decoder_trains_a_branch_and_keeps_old_outputs(setup, tmp_path):
    _, old, new, base = setup
    res = finetune(base, new, tmp_path / "nd", mode="incremental", new_decoder=True, **TRAIN)
    m = hm.load(res.path)
    t_old = len(base.vocab.tasks)
    assert m.config.decoder_branches == (t_old,)
    sb, sm = base.state_dict(), m.state_dict()
    _assert_old_weights_kept(sb, sm, t_old)
    # what trained: the branch and the new rows of the encoder's fusion tables, nothing else
    assert not _same(sm["branches.0.up.3.blocks.0.conv1.conv.weight"],
                     sb["up.3.blocks.0.conv1.conv.weight"])
    assert not _same(sm["fusion.0.task_priors"][t_old:-1],
                     extend_vocabulary(base, res.new_tasks).fusion[0].task_priors[t_old:-1])
    x = torch.randn(1, 1, 32, 32, 32)
    a = _old_ct_logits(base, x)
    assert torch.equal(a, _old_ct_logits(m, x))  # old tasks on their own: bit for bit
    with torch.no_grad():
        mixed = m(x, tasks=["synth_ct/liver", "synth_t2/kidney", "synth_ct/kidney"],
                  modality="CT").seg_logits
        assert torch.equal(mixed[:, [0, 2]], a)  # mixed with a new task: still exact
    assert hm.read_header(res.path)["metadata"]["finetune"]["new_decoder"] is True
    import numpy as np

    import hermes

    img = np.random.default_rng(0).normal(size=(40, 36, 40)).astype(np.float32)
    with pytest.warns(UserWarning, match="other modalities than T2: synth_ct/liver"):
        seg = hermes.segment(img, tasks=["synth_ct/liver", "synth_t2/bladder"], modality="T2",
                             model=str(res.path), spacing=(6.0, 6.0, 6.0), device="cpu")
    assert seg.task_names == ["synth_ct/liver", "synth_t2/bladder"]
    with pytest.raises(ValueError, match="not both"):
        finetune(base, new, tmp_path / "x", mode="incremental", new_decoder=True,
                 freeze_shared=True, **TRAIN)
    with pytest.raises(ValueError, match="new_decoder"):
        finetune(base, new, tmp_path / "x", mode="priors", new_decoder=True, **TRAIN)


def test_a_second_increment_adds_a_second_branch_and_keeps_the_first_exact(setup, tmp_path):
    root, old, new, base = setup
    first = finetune(base, new, tmp_path / "b1", mode="incremental", new_decoder=True, **TRAIN)
    newer = _cache(root, ("synth_pet",), "newer")
    second = finetune(first.path, newer, tmp_path / "b2", mode="incremental", new_decoder=True,
                      **TRAIN)
    m1, m2 = hm.load(first.path), hm.load(second.path)
    t1 = len(m1.vocab.tasks)
    assert m2.config.decoder_branches == (len(base.vocab.tasks), t1)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # tasks of the main decoder and of the first branch: unchanged
        for tasks, mod in ((["synth_ct/liver"], "CT"), (["synth_t2/kidney"], "T2")):
            assert torch.equal(m1(x, tasks=tasks, modality=mod).seg_logits,
                               m2(x, tasks=tasks, modality=mod).seg_logits)
        assert m2(x, tasks=["synth_pet/lesion", "synth_t2/bladder", "synth_ct/liver"],
                  modality="PET").seg_logits.shape[1] == 3


def test_modality_mode_trains_only_the_modality_head(setup, tmp_path):
    _, old, new, base = setup
    res = finetune(base, old, tmp_path / "m", mode="modality", **TRAIN)
    sb, sm = base.state_dict(), hm.load(res.path).state_dict()
    changed = {k for k, v in sb.items() if not _same(sm[k], v)}
    assert changed and all(k.startswith("modality_head.") for k in changed)
    cfg = hm.read_header(res.path)["metadata"]["train_config"]
    assert cfg["modality_shuffle"] == 1.0 and cfg["modality_loss_weight"] == 1.0
    with pytest.raises(ValueError, match="new names"):
        finetune(base, new, tmp_path / "m2", mode="modality", **TRAIN)


def test_modality_shuffle_replaces_priors_not_targets(setup, tmp_path):
    from hermes.training.trainer import TrainConfig, Trainer

    _, old, _, _ = setup
    cfg = TrainConfig(cache_dir=str(old.cache_dir), out_dir=str(tmp_path / "s"),
                      modality_shuffle=0.5, **TRAIN)
    tr = Trainer(cfg)
    mod = torch.tensor([0, 1, -1, 0] * 64)
    first = tr._shuffled_modalities(mod)
    assert torch.equal(first, tr._shuffled_modalities(mod))  # a function of seed and step
    assert torch.equal(first[mod < 0], mod[mod < 0])  # unknown modalities stay unknown
    swapped = (first != mod).float().mean().item()
    m = len(tr.model.vocab.modalities)  # a random pick keeps the true one with p = 1/m
    assert abs(swapped - 0.75 * 0.5 * (m - 1) / m) < 0.1
    tr.step += 1
    assert not torch.equal(first, tr._shuffled_modalities(mod))
    with pytest.raises(ValueError, match="modality_shuffle"):
        TrainConfig(cache_dir=str(old.cache_dir), out_dir="x", modality_shuffle=1.5)


def test_resume_fills_options_from_the_run_except_a_rehearsal_it_lacked(tmp_path):
    import argparse
    import json

    from hermes.training.finetune_commands import _fill_options

    (tmp_path / "finetune.json").write_text(json.dumps(
        {"mode": "priors", "rehearsal_fraction": 0.0, "distill_weight": 0.0}))
    (tmp_path / "config.json").write_text(json.dumps({"steps": 7, "augment": False,
                                                      "checkpoint_every": 3}))
    names = ["mode", "init", "rehearsal_fraction", "distill", "freeze_shared", "new_decoder",
             "prior_lr_scale", "steps", "batch_size", "crop", "optimizer", "lr", "ema", "seed",
             "no_augment", "checkpoint_every"]
    args = argparse.Namespace(resume=True, rehearsal="old.yaml", **dict.fromkeys(names))
    args.seed = 4  # given: kept
    _fill_options(args, tmp_path)
    assert (args.mode, args.steps, args.no_augment, args.seed) == ("priors", 7, True, 4)
    assert args.checkpoint_every == 3  # the run's, not the default
    # the run had no rehearsal: --rehearsal now takes the default fraction (and the resume is
    # then refused by name), not the run's 0
    assert args.rehearsal_fraction == 0.5


def test_a_task_name_another_dataset_taught_the_model_is_named():
    """Dataset folders keep dataset.json's bare names: a second dataset's 'cancer' would train
    the model's 'cancer' of another dataset; fine-tuning says so (not for the model's own
    dataset or new names)."""
    from types import SimpleNamespace

    from hermes.models.vocabulary import Vocabulary
    from hermes.training.finetune import names_from_other_datasets

    vocab = Vocabulary(["liver", "cancer"], ["CT"],
                       {"Task03_Liver": {"tasks": ["liver", "cancer"], "modality": "CT"}})
    pc = SimpleNamespace(datasets={
        "Task07_Pancreas": SimpleNamespace(tasks=["pancreas", "cancer"]),
        "Task03_Liver": SimpleNamespace(tasks=["liver", "cancer"])})
    assert names_from_other_datasets(vocab, pc) == [
        "cancer (Task07_Pancreas; the model's from Task03_Liver)"]


def test_default_run_folder_is_named_after_the_base_run(tmp_path):
    from hermes.training.finetune_commands import _base_name

    (tmp_path / "runs" / "liver").mkdir(parents=True)
    assert _base_name(tmp_path / "runs" / "liver" / "model.hermes") == "liver"
    assert _base_name(tmp_path / "runs" / "liver") == "liver"
    assert _base_name(tmp_path / "hermes_r.pth") == "hermes_r"
