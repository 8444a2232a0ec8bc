"""Universal training: losses, optimiser, schedule, EMA, sampling, resume after a kill, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import hermes.data as hd
import hermes.models as hm
from hermes.data.synthetic import generate_collection
from hermes.training import Lamb, TrainConfig, partial_label_loss, train, warmup_cosine
from hermes.training.ema import EMA
from hermes.training.losses import modality_loss
from hermes.training.sampling import PatchDataset, StepSampler, collate_partial


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    yaml_path = generate_collection(root / "src", seed=3, cases_per_dataset=3,
                                    datasets=("synth_ct", "synth_t1", "synth_pet"), size=(36, 44))
    hd.preprocess(hd.load_collection(yaml_path), root / "cache", workers=1, progress=False,
                  image_order=1)
    return root / "cache"


def _small_cfg(cache, out, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), out_dir=str(out), crop_size=(32, 32, 32), batch_size=2,
                steps=6, workers=0, checkpoint_every=2, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------- losses
def test_partial_label_loss_hand_computed():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]]).view(1, 2, 2, 1, 1)
    targets = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]).view(1, 2, 2, 1, 1)
    annotated = torch.tensor([[True, False]])  # the second task is not annotated: ignored
    bce, dice = partial_label_loss(logits, targets, annotated, smooth=0.0)
    p = 1 / (1 + math.exp(-2.0))
    exp_bce = (math.log(2) + -math.log(p)) / 2
    exp_dice = 1 - 2 * p / (0.5 + p + 1)
    assert bce.item() == pytest.approx(exp_bce, rel=1e-6)
    assert dice.item() == pytest.approx(exp_dice, rel=1e-6)
    # nothing annotated -> zero loss that still back-propagates
    logits.requires_grad_(True)
    bce, dice = partial_label_loss(logits, targets, torch.zeros(1, 2, dtype=torch.bool))
    (bce + dice).backward()
    assert bce.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_partial_label_loss_skips_unannotated_voxels():
    # three voxels, the middle one unannotated (nnU-Net "ignore"): hand-computed on the others
    logits = torch.tensor([0.0, 3.0, 2.0]).view(1, 1, 3, 1, 1).requires_grad_(True)
    targets = torch.tensor([0.0, 0.0, 1.0]).view(1, 1, 3, 1, 1)
    ignore = torch.tensor([False, True, False]).view(1, 1, 3, 1, 1)
    bce, dice = partial_label_loss(logits, targets, torch.ones(1, 1, dtype=torch.bool),
                                   smooth=0.0, ignore=ignore)
    p = 1 / (1 + math.exp(-2.0))
    assert bce.item() == pytest.approx((math.log(2) - math.log(p)) / 2, rel=1e-6)
    assert dice.item() == pytest.approx(1 - 2 * p / (0.5 + p + 1), rel=1e-6)
    (bce + dice).backward()
    assert logits.grad[0, 0, 1].item() == 0 and logits.grad[0, 0, 2].item() != 0
    with pytest.raises(ValueError, match="ignore must be"):
        partial_label_loss(logits, targets, torch.ones(1, 1, dtype=torch.bool),
                           ignore=ignore[:, :, :2])


def test_modality_loss_ignores_unknown():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    ref = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))
    assert modality_loss(logits, torch.tensor([0, -1])).item() == pytest.approx(ref.item())
    assert modality_loss(logits, torch.tensor([-1, -1])).item() == 0.0


# ----------------------------------------------------------------------- optimiser and schedule
def test_lamb_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    w.grad = torch.tensor([0.5, 0.25])
    opt = Lamb([w], lr=0.1, weight_decay=0.01, eps=1e-6)
    opt.step()
    g = torch.tensor([0.5, 0.25])
    update = g / (g.abs() + 1e-6) + 0.01 * torch.tensor([3.0, -4.0])  # m_hat=g, v_hat=g^2
    trust = 5.0 / update.norm()
    expected = torch.tensor([3.0, -4.0]) - 0.1 * trust * update
    torch.testing.assert_close(w.detach(), expected)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, final_fraction=0.0)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_ema_update():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)


# ------------------------------------------------------------------------------------- sampling
def test_samples_are_deterministic_and_partial(cache):
    pc = hd.PreprocessedCollection(cache)
    ds = PatchDataset(pc, (32, 32, 32), seed=5, fg_prob=1.0)
    a, b = ds[17], ds[17]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["targets"], b["targets"])
    info = pc.datasets[a["dataset"]]
    assert a["task_idx"].tolist() == list(info.task_indices)
    assert a["targets"].shape == (len(info.task_indices), 32, 32, 32)
    batch = collate_partial([ds[i] for i in range(6)], null_tokens=1)
    widths = [len(pc.datasets[d].task_indices) for d in batch["datasets"]]
    assert batch["task_idx"].shape == (6, max(widths) + 1)
    assert batch["annotated"].sum(1).tolist() == widths
    assert (batch["task_idx"][:, -1] == -1).all()
    # foreground oversampling: with fg_prob=1 every crop holds some foreground
    assert all(ds[i]["targets"].any() for i in range(8))


def test_rotations_fill_with_the_volume_padding_not_zero():
    """What a rotation brings into the crop from outside is the channel's padding value (the
    case's minimum, as crops over the edge and inference pad), not 0 (mid-grey)."""
    from hermes.training.sampling import build_augmentation

    aug = build_augmentation((16, 16, 16), mri=False)
    affine = aug.transforms[1]
    affine.prob = 1.0  # always rotate/scale
    affine.rand_affine.rand_affine_grid.rotate_range = ([0.5, 0.5],) * 3
    shift_affine = [aug.transforms[0], affine, aug.transforms[2]]
    image = torch.full((2, 16, 16, 16), 3.0)
    pad = torch.tensor([-2.0, -1.5]).view(2, 1, 1, 1)
    image[:, 4:12, 4:12, 4:12] = 7.0
    image[0, :2], image[1, :2] = -2.0, -1.5  # the volume's minimum, inside the crop too
    d = {"image": image, "label": torch.zeros(1, 16, 16, 16), "pad": pad}
    affine.set_random_state(seed=3)
    for t in shift_affine:
        d = t(d)
    out = torch.as_tensor(d["image"])
    assert not (out == 0).any()  # no zero padding
    for c, v in enumerate((-2.0, -1.5)):  # the corners rotated in hold the pad value
        assert (out[c] == v).sum() > (image[c] == v).sum() * 0.5
        assert out[c].min() >= v - 1e-5

def test_dataset_without_training_cases_is_named(cache):
    """A dataset whose cases are all held out (e.g. all declared test) is never sampled: a
    warning names it and the tasks that then stay untrained."""
    pc = hd.PreprocessedCollection(cache)

    class AllPetHeldOut:
        datasets, sampling_weights, cache_dir = pc.datasets, pc.sampling_weights, pc.cache_dir

        @staticmethod
        def split(name):
            return [c for c in pc.split(name) if c.dataset != "synth_pet"]

    only_pet = sorted(set(pc.datasets["synth_pet"].tasks)
                      - {t for d in ("synth_ct", "synth_t1") for t in pc.datasets[d].tasks})
    assert only_pet  # the synthetic PET dataset labels a task of its own
    with pytest.warns(UserWarning, match="synth_pet have no case in the 'train' split.*"
                      + ".*".join(only_pet)):
        ds = PatchDataset(AllPetHeldOut(), (32, 32, 32))
    assert ds.datasets == ["synth_ct", "synth_t1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchDataset(pc, (32, 32, 32))


def test_step_sampler_partitions_ranks():
    r0 = list(StepSampler(1, 3, batch=2, world=2, rank=0))
    r1 = list(StepSampler(1, 3, batch=2, world=2, rank=1))
    assert r0 == [4, 5, 8, 9] and r1 == [6, 7, 10, 11]


# ------------------------------------------------------------------------------------- training
def _log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_runs_and_exports_model(cache, tmp_path, monkeypatch):
    from hermes.training.trainer import Trainer

    used = []  # the learning rate each step's optimiser update applies
    original = Trainer.train_step

    def recording(self, batch):
        used.append(self.optimizer.param_groups[0]["lr"])
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", recording)
    path = train(_small_cfg(cache, tmp_path / "run", steps=3, warmup_steps=2))
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert [float(r["lr"]) for r in rows] == pytest.approx(used, rel=1e-5)
    assert used[0] < used[1]  # the first warm-up step is logged as used
    model = hm.load(path)
    pc = hd.PreprocessedCollection(cache)
    assert model.vocab.tasks == pc.tasks and model.vocab.modalities == pc.modalities
    assert set(model.vocab.groups) == set(pc.datasets)


_RUNNER = textwrap.dedent("""
    import sys
    from hermes.training import TrainConfig, train
    cache, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    train(TrainConfig(cache_dir=cache, out_dir=out, crop_size=(32, 32, 32), batch_size=2,
                      steps=6, workers=0, checkpoint_every=2, progress=True,
                      tensorboard=False), resume=resume)
""")


def test_resume_after_kill_continues_the_same_run(cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(cache), str(ref), "0"], env=env, check=True,
                   cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), str(cache), str(killed), "0"], env=env,
                            cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once step 3 is logged
        if (killed / "log.csv").exists() and len(_log(killed)) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.hermes").exists()
    subprocess.run([sys.executable, str(script), str(cache), str(killed), "1"], env=env,
                   check=True, cwd=tmp_path)
    a, b = _log(ref), _log(killed)
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"], f"step {ra['step']}: {ra['loss']} != {rb['loss']}"
    wa = hm.load(ref / "model.hermes").state_dict()
    wb = hm.load(killed / "model.hermes").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_reads_the_checkpoint_on_the_cpu(cache, tmp_path, monkeypatch):
    """The checkpoint is read onto the CPU whatever the training device: torch.set_rng_state
    takes CPU tensors only (read onto a GPU, a CUDA resume failed there); the model, optimizer
    and EMA copy their states onto their device. A trainer whose device is 'meta' stands in
    for a GPU, as no GPU runs these tests."""
    import hermes.training.trainer as tr

    cfg = _small_cfg(cache, tmp_path / "run", steps=2)
    tr.Trainer(cfg)._save_state()
    seen = []
    monkeypatch.setattr(tr, "_set_rng_state", lambda state: seen.append(state["torch"].device))
    trainer = tr.Trainer(cfg, resume=True)
    trainer.device = torch.device("meta")
    trainer._load_state()
    assert seen and set(seen) == {torch.device("cpu")} and trainer.step == 0


def test_resume_with_another_number_of_processes_is_refused(cache, tmp_path):
    """The batch per step and the sample order depend on the number of processes: a run is
    resumed with its own."""
    import hermes.training.trainer as tr

    cfg = _small_cfg(cache, tmp_path / "run", steps=2)
    tr.Trainer(cfg)._save_state()
    trainer = tr.Trainer(cfg, resume=True)
    trainer.world = 2  # as a torchrun launch of two processes would be
    with pytest.raises(ValueError, match="trained with 1 process.*--nproc_per_node 1"):
        trainer._load_state()


def test_resume_on_other_data_is_refused(cache, tmp_path):
    """A run resumes on its own training data: a moved cache is fine, a collection with the
    same tasks but other images is refused."""
    import shutil

    import hermes.training.trainer as tr

    cfg = _small_cfg(cache, tmp_path / "run", steps=2)
    tr.Trainer(cfg)._save_state()
    moved = shutil.copytree(cache, tmp_path / "moved_cache")
    tr.Trainer(_small_cfg(moved, tmp_path / "run", steps=2), resume=True)  # reads the state
    yaml_path = generate_collection(tmp_path / "other", seed=4, cases_per_dataset=3,
                                    datasets=("synth_ct", "synth_t1", "synth_pet"), size=(36, 44))
    hd.preprocess(hd.load_collection(yaml_path), tmp_path / "other_cache", workers=1,
                  progress=False, image_order=1)
    other = hd.PreprocessedCollection(tmp_path / "other_cache")
    assert other.tasks == hd.PreprocessedCollection(cache).tasks  # same tasks, other images
    with pytest.raises(ValueError, match="was trained on other data"):
        tr.Trainer(_small_cfg(other.cache_dir, tmp_path / "run", steps=2), resume=True)

def test_a_run_folder_inside_the_source_data_is_refused(cache):
    import hermes.training.trainer as tr

    case = hd.PreprocessedCollection(cache).cases[0]
    images = Path(case.meta["sources"][0]["path"]).parent  # e.g. <dataset>/imagesTr
    with pytest.raises(ValueError, match="is inside .*imagesTr, a folder of the collection's "
                                         "source images"):
        tr.Trainer(_small_cfg(cache, images / "run"))
    assert not (images / "run").exists()

def test_a_crop_far_larger_than_the_images_is_warned_about(cache, tmp_path):
    import hermes.training.trainer as tr

    largest = max(max(c.shape) for c in hd.PreprocessedCollection(cache).cases)
    crop = 16 * (2 * largest // 16 + 1)  # over twice the largest image on every axis
    with pytest.warns(UserWarning, match=r"crop .* is over twice the largest training image"):
        tr.Trainer(_small_cfg(cache, tmp_path / "run", crop_size=(crop, crop, crop)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.Trainer(_small_cfg(cache, tmp_path / "run2"))

def test_resume_without_checkpoint_is_a_clear_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_small_cfg(cache, tmp_path / "none"), resume=True)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="afile is a file: the run needs a folder"):
        train(_small_cfg(cache, tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_keeps_the_runs_settings(cache, tmp_path, capsys):
    """``hermes train --resume`` without the run's options takes them from the run; a resume
    with other settings, or a new run over an existing one, is refused by name."""
    from hermes.cli import main

    out = tmp_path / "run"
    base = ["train", str(cache), "--out", str(out), "--workers", "0", "--quiet"]
    assert main([*base, "--crop", "32", "--batch-size", "1", "--steps", "2",
                 "--checkpoint-every", "7"]) == 0
    first = (out / "model.hermes").read_bytes()
    (out / ".last.ckpt.k3j_x9zq.tmp").write_bytes(b"a write killed half-way")
    assert main([*base, "--resume"]) == 0  # finished: nothing left to train, same model
    assert (out / "model.hermes").read_bytes() == first
    assert json.loads((out / "config.json").read_text())["checkpoint_every"] == 7  # the run's
    assert not (out / ".last.ckpt.k3j_x9zq.tmp").exists()  # a killed write's leftover
    config = (out / "config.json").read_text()
    (out / "config.json").write_text("")
    capsys.readouterr()
    assert main([*base, "--resume"]) == 1
    assert f"{out / 'config.json'} is unreadable" in capsys.readouterr().err
    (out / "config.json").write_text(config)
    capsys.readouterr()
    assert main([*base, "--resume", "--batch-size", "2"]) == 1
    assert "batch_size=1 (now 2)" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="already holds a trained model"):  # finished
        train(_small_cfg(cache, out, batch_size=1, steps=2))
    state = (out / "last.ckpt").read_bytes()
    damaged = bytearray(state)
    damaged[len(state) // 2] ^= 0x10  # one bit in a stored tensor: torch.load would not notice
    (out / "last.ckpt").write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main([*base, "--resume"]) == 1
    assert "last.ckpt is damaged (checksum mismatch" in capsys.readouterr().err
    (out / "last.ckpt").write_bytes(state)
    (out / "last.ckpt").unlink()  # a finished run kept only its model: still not overwritten
    with pytest.raises(FileExistsError, match="trained model"):
        train(_small_cfg(cache, out, batch_size=1, steps=2))
    assert (out / "model.hermes").read_bytes() == first
    mine = tmp_path / "mine"  # a user's folder with files of the names a run writes
    mine.mkdir()
    (mine / "config.json").write_text('{"experiment": "my notes"}')
    with pytest.raises(FileExistsError, match="holds config.json, which a run writes"):
        train(_small_cfg(cache, mine, batch_size=1, steps=2))
    assert (mine / "config.json").read_text() == '{"experiment": "my notes"}'
    (mine / "log.csv").write_text("step,loss\n1,0.5\n")  # a user's log beside a run's config
    (mine / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(FileExistsError, match="holds config.json and log.csv"):
        train(_small_cfg(cache, mine, batch_size=1, steps=2))
    # what a run that stopped before its first checkpoint leaves (its config and log, nothing
    # to resume) does not lock the folder: a new run replaces it
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("config.json", "log.csv"):
        (stopped / name).write_text((out / name).read_text())
    train(_small_cfg(cache, stopped, batch_size=1, steps=2))
    assert (stopped / "model.hermes").is_file()
    api = tmp_path / "api"  # settings no option sets come from the run too
    train(_small_cfg(cache, api, steps=2, warmup_steps=1, fg_prob=0.5, model_overrides={}))
    assert main(["train", str(cache), "--out", str(api), "--workers", "0", "--quiet",
                 "--resume"]) == 0


_CLI_RUNNER = textwrap.dedent("""
    import importlib, os, sys
    from hermes.cli import main
    pre = importlib.import_module("hermes.data.preprocess")  # the module, not the function
    original = pre.preprocess_case

    def logged(case, *args, **kwargs):  # which rank preprocessed which case
        with open(sys.argv[2], "a") as f:
            f.write(f"{os.environ['RANK']} {case.key}\\n")
        return original(case, *args, **kwargs)

    pre.preprocess_case = logged
    whole = pre.preprocess

    def run_logged(*args, **kwargs):  # which rank ran preprocess() on the YAML at all
        with open(sys.argv[2], "a") as f:
            f.write(f"{os.environ['RANK']} preprocess\\n")
        return whole(*args, **kwargs)

    pre.preprocess = run_logged
    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[3], "--steps", "1", "--crop", "32",
                   "--batch-size", "1", "--workers", "0", "--device", "cpu"]))
""")


def test_ddp_cli_preprocesses_a_new_cache_on_rank_zero_only(tmp_path):
    yaml_path = generate_collection(tmp_path / "src", seed=5, cases_per_dataset=2,
                                    datasets=("synth_ct",), size=(24, 28))
    script = tmp_path / "cli_ddp.py"
    script.write_text(_CLI_RUNNER)
    log = tmp_path / "preprocessed.txt"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(yaml_path), str(log), str(tmp_path / "run")],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = log.read_text().splitlines()
    # rank 0 alone, both cases; rank 1 opens the finished cache as it is (re-running
    # preprocess() on the YAML rewrote collection.json while rank 0 read it)
    assert lines[0] == "0 preprocess" and sorted(lines[1:]) == [
        "0 synth_ct/synth_ct_000", "0 synth_ct/synth_ct_001"], lines
    assert out.stdout.count("model written to") == 1
    assert (tmp_path / "run" / "model.hermes").exists()


def test_ddp_gloo_two_processes(cache, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(cache), str(tmp_path / "ddp"), "0"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ddp: parameters in sync across 2 ranks" in out.stdout
    rows = _log(tmp_path / "ddp")
    assert len(rows) == 6 and (tmp_path / "ddp" / "model.hermes").exists()


def test_a_callers_own_process_group_is_left_alone(tmp_path, monkeypatch):
    """train()/finetune() destroy only the process group they created; one the caller set up
    before (Python API inside their own distributed program) stays theirs."""
    import torch.distributed as dist

    from hermes.training.trainer import init_distributed, leave_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
        assert init_distributed("cpu") == (2, 0)
        leave_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_train_config_refuses_crops_the_network_cannot_take():
    # 16^3 pools to one voxel, where instance norm has nothing to normalise over: refused when
    # the run is configured, not at its first step
    for crop in ((16, 16, 16), (8, 64, 64), (32, 32)):
        with pytest.raises(ValueError, match="crop_size"):
            TrainConfig(cache_dir="c", out_dir="o", crop_size=crop)
    assert TrainConfig(cache_dir="c", out_dir="o", crop_size=(16, 16, 32)).crop_size == (16, 16, 32)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(cache_dir="c", out_dir="o", checkpoint_every=0)


def test_size_options_take_one_or_three_values():
    from hermes.training.commands import triple

    assert triple([32]) == (32, 32, 32) and triple([16, 32, 48]) == (16, 32, 48)
    for values in ([32, 64], [1, 2, 3, 4]):
        with pytest.raises(ValueError, match="1 or 3 values"):
            triple(values)


def test_unknown_dataset_is_refused_before_the_run_folder_is_written(cache, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        train(_small_cfg(cache, tmp_path / "run", datasets=["nope"]))
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_size_options_are_checked_before_preprocessing(tmp_path, monkeypatch, capsys):
    import hermes.training.commands as commands
    from hermes.cli import main

    monkeypatch.setattr(commands, "open_cache_once", lambda *a, **k: pytest.fail("preprocessed"))
    assert main(["train", str(tmp_path / "c.yaml"), "--crop", "16"]) == 1
    assert "--crop (16, 16, 16) too small" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "--crop", "32", "64"]) == 1
    assert "1 or 3 values" in capsys.readouterr().err


def test_other_ranks_do_not_repeat_what_rank_zero_reported(monkeypatch, capsys):
    """Under torchrun every process runs the command: rank 0 prints why it failed, the others
    exit 1 without repeating it; an interrupt is announced once."""
    import argparse

    from hermes.cli import _run
    from hermes.training.commands import RankZeroFailed

    def fails(exc):
        def handler(args):
            raise exc
        return argparse.Namespace(handler=handler, command="train")

    parser = argparse.ArgumentParser()
    assert _run(parser, fails(RankZeroFailed("rank 0 could not prepare x"))) == 1
    assert capsys.readouterr().err == ""
    assert _run(parser, fails(RuntimeError("disk full"))) == 1
    assert "error: disk full" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert _run(parser, fails(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert _run(parser, fails(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "hermes: interrupted\n"


def _unfinished_run(cache, out: Path) -> TrainConfig:
    """``out`` as a live run holds it before its first checkpoint: its config.json, log.csv
    and an in-flight checkpoint's temporary (what a second run once took as a dead run's)."""
    from dataclasses import asdict

    from hermes.training.trainer import LOG_FIELDS

    cfg = _small_cfg(cache, out, steps=1)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(asdict(cfg)))
    (out / "log.csv").write_text(",".join(LOG_FIELDS) + "\n")
    (out / ".last.ckpt.ab12cd34.tmp").write_bytes(b"a checkpoint being written")
    return cfg


def test_a_second_run_into_a_run_folder_is_refused_before_it_touches_it(cache, tmp_path, capsys):
    """Two runs into one --out mixed their files (config and log of one, model of the other)
    and the second removed the first's checkpoint temporaries: while a run holds the folder's
    lock, another is refused at once (API and CLI) and the folder is left as it was."""
    from hermes.cli import main
    from hermes.files import LOCK_NAME, FolderBusyError, folder_lock

    out = tmp_path / "run"
    cfg = _unfinished_run(cache, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with folder_lock(out, "run folder"):
        with pytest.raises(FolderBusyError, match=rf"run folder {out} is being written by "
                                                  rf"another Hermes process \(pid {os.getpid()}\)"):
            train(cfg)
        with pytest.raises(FolderBusyError):
            train(cfg, resume=True)
        assert main(["train", str(cache), "--out", str(out), "--steps", "1", "--crop", "32",
                     "--workers", "0", "--device", "cpu", "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"hermes train: error: run folder {out} is being written by "
                              "another Hermes process") and err.count("\n") == 1, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME} == before
    train(cfg)  # released: the folder of a run that died before its first checkpoint is taken
    assert (out / "model.hermes").exists() and not (out / LOCK_NAME).exists()
    assert not (out / ".last.ckpt.ab12cd34.tmp").exists()


def test_a_trainer_holds_its_run_folder_until_its_run_ends(cache, tmp_path):
    """From its creation (the checks of the folder) to the end of run(); a refused trainer
    leaves no folder or lock behind."""
    import hermes.training.trainer as tr
    from hermes.files import LOCK_NAME, FolderBusyError

    cfg = _small_cfg(cache, tmp_path / "run", steps=1)
    trainer = tr.Trainer(cfg)
    with pytest.raises(FolderBusyError, match="run folder"):
        tr.Trainer(cfg)
    trainer.run()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # not busy: a finished run, which --resume would not train further (it was suggested)
    with pytest.raises(FileExistsError, match=r"already holds a trained model \(model.hermes\); "
                                              "choose another --out"):
        tr.Trainer(cfg)
    with pytest.raises(ValueError, match="unknown dataset"):
        tr.Trainer(_small_cfg(cache, tmp_path / "new", datasets=["nope"])).run()
    assert not (tmp_path / "new").exists()


def test_ddp_run_into_a_busy_folder_is_refused_by_every_rank(cache, tmp_path):
    """Under torchrun rank 0 takes the lock; every rank stops (none waits for it in a
    collective), and the reason is printed once."""
    from hermes.files import folder_lock

    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom hermes.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    with folder_lock(out, "run folder"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(script), "train", str(cache), "--out", str(out), "--steps", "1", "--crop", "32",
             "--workers", "0", "--device", "cpu", "-q"],
            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
            cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("is being written by another Hermes process") == 1, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []


def test_resume_without_out_finds_the_run_the_options_left_out_named(tmp_path, monkeypatch):
    """``--resume`` takes the left-out options from the run, so its folder is found among
    ``runs/`` (a run of preset base resumed without --preset looked in runs/<c>-tiny)."""
    from hermes.training.commands import default_run_folder

    monkeypatch.chdir(tmp_path)
    default = Path("runs") / "col-tiny"
    assert default_run_folder(default, "col-*", resume=False) == default
    assert default_run_folder(default, "col-*", resume=True) == default  # nothing to find
    (tmp_path / "runs" / "col-base").mkdir(parents=True)
    (tmp_path / "runs" / "col-base" / "last.ckpt").write_bytes(b"state")
    (tmp_path / "runs" / "other-base").mkdir()
    (tmp_path / "runs" / "other-base" / "last.ckpt").write_bytes(b"state")
    assert default_run_folder(default, "col-*", resume=True) == Path("runs") / "col-base"
    (tmp_path / "runs" / "col-small").mkdir()
    (tmp_path / "runs" / "col-small" / "last.ckpt").write_bytes(b"state")
    with pytest.raises(ValueError, match=r"2 runs could be meant \(runs/col-base, "
                                         r"runs/col-small\); name one with --out"):
        default_run_folder(default, "col-*", resume=True)
