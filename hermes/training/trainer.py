"""The universal training loop: partial labels, AMP, EMA, atomic resumable checkpoints, DDP.

``train(TrainConfig(...))`` or ``hermes train collection.yaml``. Under ``torchrun`` the run is
data-parallel (NCCL on GPUs, gloo on CPUs); rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import hermes.models as hm
from hermes.data.cache import PreprocessedCollection, split_cases
from hermes.files import atomic_write_bytes, folder_lock, remove_stale_temporaries
from hermes.models.checkpoint import RUN_MODEL_FILE, read_training_state, write_training_state
from hermes.models.hermes_resunet import check_spatial_size
from hermes.training.ema import EMA
from hermes.training.losses import modality_loss, partial_label_loss
from hermes.training.optim import make_optimizer, warmup_cosine
from hermes.training.sampling import PatchDataset, StepSampler, collate_partial

STATE_FILE = "last.ckpt"
#: The exported (EMA) model of a run, in its folder.
MODEL_FILE = RUN_MODEL_FILE
#: TrainConfig fields a resumed run may change (where and how it runs, not what it computes)
RESUME_MAY_CHANGE = frozenset(
    {"cache_dir", "out_dir", "workers", "checkpoint_every", "device", "progress", "tensorboard"}
)
#: ``(trainer, batch, out, x) -> (loss, logs)``: an extra loss term (see :class:`Trainer`).
ExtraLoss = Callable[["Trainer", dict, Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
#: Steps between checkpoints unless the configuration (or a resumed run) says otherwise.
CHECKPOINT_EVERY = 100
#: log.csv's columns: ``step`` (1-based), the step's losses (``loss`` = ``bce`` + ``dice`` +
#: the weighted ``modality`` loss; means over the processes), ``lr`` (the base learning rate as
#: the schedule sets it for that step: the rate of the network's weights, whatever the
#: fine-tuning mode; the prior tables of ``finetune --prior-lr-scale`` train at that multiple
#: of it), ``seconds`` (the step) and ``data_seconds`` (waiting for its batch); fine-tuning with
#: an extra loss adds ``extra``.
LOG_FIELDS = ["step", "loss", "bce", "dice", "modality", "lr", "seconds", "data_seconds"]


class RankZeroFailed(RuntimeError):
    """Another process (rank 0) failed and printed why: the command exits without repeating
    it (``reported_elsewhere``)."""

    reported_elsewhere = True


def _warn_oversized_crop(crop: Sequence[int], collection: Any) -> None:
    """Warn when the crop is over twice the largest cached image along an axis: the crops are
    then mostly padding, and their activations may exceed the memory (a killed process says
    nothing)."""
    shapes = [tuple(case.shape) for case in getattr(collection, "cases", [])]
    if not shapes:
        return
    largest = [max(s[a] for s in shapes) for a in range(3)]
    if any(int(c) > 2 * m for c, m in zip(crop, largest, strict=True)):
        warnings.warn(f"crop {tuple(int(c) for c in crop)} is over twice the largest training "
                      f"image ({' x '.join(map(str, largest))} voxels at the cache's spacing): "
                      "the crops are mostly padding and need much memory; a crop about the "
                      "images' size trains the same", stacklevel=3)


def _refuse_source_folder(out: Path, collection: Any) -> None:
    """Refuse a run folder that is, or lies inside, a folder of the collection's source images
    or labels (e.g. a dataset's imagesTr/): the run would write into the user's data."""
    target = out.resolve()
    folders: set[Path] = set()
    for case in getattr(collection, "cases", []):
        for src in (getattr(case, "meta", {}) or {}).get("sources", []):
            if isinstance(src, dict) and src.get("path"):
                folders.add(Path(src["path"]).parent.resolve())
    for folder in sorted(folders):
        if target == folder or folder in target.parents:
            raise ValueError(f"--out {out} is inside {folder}, a folder of the collection's "
                             "source images or labels: choose a folder outside the data")


def _left_by_unfinished_run(out: Path) -> bool:
    """Whether ``out``'s config.json and log.csv are those of a Hermes run that stopped before
    its first checkpoint (a crash or an error in its first steps): a new run may replace them,
    as there is nothing to resume. A user's own files of these names are not."""
    try:
        config = json.loads((out / "config.json").read_text())
        ours = isinstance(config, dict) and {"cache_dir", "out_dir", "steps", "preset"} <= set(
            config)
        if (out / "log.csv").exists():
            with open(out / "log.csv") as f:
                ours = ours and f.readline().strip().startswith(",".join(LOG_FIELDS))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return ours


@dataclass
class TrainConfig:
    """Everything a run depends on (stored in its checkpoints).

    ``steps`` optimiser steps of ``batch_size`` crops per process; ``datasets`` restricts
    sampling to some of the collection's datasets (the vocabulary stays the collection's);
    ``lr`` None picks 3e-4 for AdamW and 2e-3 for LAMB; ``warmup_steps`` None is 5 % of
    ``steps``; ``amp`` "auto" uses bfloat16 autocast on CUDA and float32 on CPU.
    ``modality_shuffle``: the fraction of crops whose modality PRIOR is replaced by a uniformly
    random modality while the modality head is still trained on the true one, so that the head
    reads the image rather than echoing its prior (what ``modality="auto"`` needs); 0 = as the
    paper.
    """

    cache_dir: str
    out_dir: str
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    crop_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    steps: int = 1000
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 1e-5
    warmup_steps: int | None = None
    grad_clip: float = 12.0
    ema_decay: float = 0.99
    amp: str = "auto"
    fg_prob: float = 1 / 3
    augment: bool = True
    datasets: list[str] | None = None
    modality_loss_weight: float = 0.01
    modality_shuffle: float = 0.0
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = CHECKPOINT_EVERY
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.crop_size = tuple(int(c) for c in self.crop_size)  # type: ignore[assignment]
        if len(self.crop_size) != 3:
            raise ValueError(f"crop_size needs three sizes, got {self.crop_size}")
        check_spatial_size(self.crop_size, "crop_size")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps (--steps) and batch_size (--batch-size) must be positive, got "
                             f"{self.steps} and {self.batch_size}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError("amp must be auto, bf16, fp16 or off")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every (--checkpoint-every) must be >= 1 step, got "
                             f"{self.checkpoint_every}")
        if not 0.0 <= self.modality_shuffle <= 1.0:
            raise ValueError(f"modality_shuffle (--modality-shuffle) must lie in [0, 1], got "
                             f"{self.modality_shuffle}")


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


#: Whether :func:`init_distributed` created the default process group (a caller's own group
#: is left to the caller).
_OWN_GROUP = False


def init_distributed(device: str) -> tuple[int, int]:
    """Join the ``torchrun`` process group (NCCL for CUDA training, gloo otherwise) unless
    joined already or launched as one process; returns (world size, rank)."""
    global _OWN_GROUP
    world, rank, _ = _dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu"
                                else "gloo")
        _OWN_GROUP = True
    return world, rank


def leave_distributed() -> None:
    """Destroy the process group :func:`init_distributed` created, at the end of a run, so that
    the process exits without NCCL's "process group not destroyed" warnings."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return dev


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training run; ``run()`` trains to ``cfg.steps`` (resuming if asked) and returns the
    path of the exported EMA model.

    The run folder is locked (:func:`~hermes.files.folder_lock`, on rank 0) from the trainer's
    creation until the run ends (or :meth:`close`; the end of a ``with`` block when used as a
    context manager): a second run into the same folder is refused with
    :class:`~hermes.files.FolderBusyError` before it touches anything there."""

    def __init__(
        self, cfg: TrainConfig, resume: bool = False, *, model: hm.HermesResUNet | None = None,
        collection: Any = None,
        param_groups: Callable[[torch.nn.Module], list[dict]] | None = None,
        extra_loss: ExtraLoss | None = None,
    ) -> None:
        """Args (all keyword hooks are optional; without them a fresh model is trained on
        ``cfg.cache_dir``):
            model: train this (e.g. pretrained, extended) model instead of building one; its
                vocabulary must index the collection's tasks and modalities as the batches do.
            collection: sample from this object (duck-typed like :class:`PreprocessedCollection`:
                ``split``, ``sampling_weights``, ``cache_dir``, ``cases``, ``name``) instead of
                ``PreprocessedCollection(cfg.cache_dir)``.
            param_groups: ``model -> optimizer parameter groups`` (a group's ``lr_scale``
                multiplies the learning rate; called after the EMA copy is
                made; may freeze parameters or register gradient hooks).
            extra_loss: ``(trainer, batch, out, x) -> (loss, {name: float})`` added to the loss
                of every step (e.g. distillation); its values are logged under ``extra``.
        """
        self.cfg = cfg
        self.extra_loss = extra_loss
        self.world, self.rank = init_distributed(cfg.device)
        local = _dist_info()[2]
        self.device = _device(cfg, local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out_dir)
        self.collection = (collection if collection is not None
                           else PreprocessedCollection(cfg.cache_dir))
        self._data_id: str | None = None  # _data_fingerprint
        torch.manual_seed(cfg.seed)
        if model is None:
            model = hm.build(
                cfg.preset, tasks=self.collection.tasks, modalities=self.collection.modalities,
                in_channels=int(self.collection.cases[0].image.shape[0]),
                groups=self.collection.groups, **cfg.model_overrides,
            )
        self.model = model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        lr = cfg.lr if cfg.lr is not None else (2e-3 if cfg.optimizer == "lamb" else 3e-4)
        params = param_groups(self.model) if param_groups is not None else self.model.parameters()
        self.optimizer = make_optimizer(cfg.optimizer, params, lr, cfg.weight_decay)
        for group in self.optimizer.param_groups:  # a group may scale the base rate
            group["lr"] = lr * group.get("lr_scale", 1.0)
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
        self.scheduler = warmup_cosine(self.optimizer, warm, cfg.steps)
        amp = cfg.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.step = 0
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} is a file: the run needs a folder")
        _refuse_source_folder(self.out, self.collection)
        _warn_oversized_crop(cfg.crop_size, self.collection)
        self._lock = contextlib.ExitStack()  # the run folder's lock (rank 0), see close()
        self._holding = False  # whether this process holds it
        self._made_out = False  # whether this run created the run folder
        self._in_with = False  # used as a context manager: run() keeps the lock
        self._hold_run_folder()
        try:  # everything below reads or writes the run folder: under its lock
            self._check_run_folder(resume)
            self.ddp = (
                torch.nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    # a decoder whose tasks a batch does not request gets no gradient
                    find_unused_parameters=bool(self.model.config.decoder_branches))
                if self.world > 1 else None
            )
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- run folder
    def _hold_run_folder(self) -> None:
        """Create the run folder and take its writer lock (:func:`~hermes.files.folder_lock`)
        on rank 0 (the other ranks write nothing), held until :meth:`close`: a second run into
        the same folder is refused here, before it reads, cleans or writes anything there.
        Every rank learns whether rank 0 got the folder."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._made_out = not self.out.exists()
                self.out.mkdir(parents=True, exist_ok=True)
                self._lock.enter_context(folder_lock(self.out, "run folder"))
                self._holding = True
            except Exception as exc:
                error = exc
        if self.world > 1:
            shared: list[object] = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(shared, src=0)
            if self.rank != 0 and shared[0] is not None:
                raise RankZeroFailed(f"rank 0 could not take the run folder {self.out}: "
                                     f"{shared[0]}")
        if error is not None:
            self.close()
            raise error

    def _check_run_folder(self, resume: bool) -> None:
        """Load the state of the run to resume, or refuse a folder holding another run's (or
        a user's) files (with the folder locked: another run's files may be a live run's)."""
        if resume:
            self._load_state()
        elif self.state_path.exists() and not (self.out / MODEL_FILE).exists():
            raise FileExistsError(
                f"{self.out} already holds an unfinished training run ({STATE_FILE}): continue "
                "it with --resume (resume=True in Python) or choose another --out directory"
            )
        elif (self.out / MODEL_FILE).exists():
            raise FileExistsError(
                f"{self.out} already holds a trained model ({MODEL_FILE}); choose another --out "
                "directory"
            )
        elif (taken := [n for n in ("config.json", "log.csv") if (self.out / n).exists()]) \
                and not _left_by_unfinished_run(self.out):
            raise FileExistsError(  # a user's own files of these common names
                f"{self.out} holds {' and '.join(taken)}, which a run writes; choose another "
                "--out directory"
            )

    def close(self) -> None:
        """Release the run folder's lock (removing the folder if this run created it and
        left it empty). :meth:`run` calls it at its end, unless the trainer is used as a
        context manager (``with Trainer(...) as t:``), which holds the folder until the
        block ends (to write more into it after the run, as fine-tuning's export does)."""
        self._lock.close()
        self._holding = False
        if self._made_out:
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                self.out.rmdir()
            self._made_out = False

    def __enter__(self) -> Trainer:
        self._in_with = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._in_with = False
        self.close()

    # ---------------------------------------------------------------- state
    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def _save_state(self) -> None:
        if self.rank != 0:
            return
        state = {
            "config": asdict(self.cfg),
            "model_describe": self.model.describe(),
            "step": self.step,
            "world_size": self.world,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "data": self._data_fingerprint(),
        }
        write_training_state(self.state_path, state)

    def _data_fingerprint(self) -> str:
        """sha256 over the training cases' names and cached arrays' checksums: the data the
        run trains on (unchanged when the cache moves, changed with any case)."""
        if self._data_id is None:
            h = hashlib.sha256()
            cases = split_cases(self.collection, "train", self.cfg.datasets)
            for case in sorted(cases, key=lambda c: c.key):
                files = getattr(case, "meta", {}).get("files", {})
                sums = [files.get(k, {}).get("sha256", "") for k in ("image", "label")]
                h.update(f"{case.key}:{sums[0]}:{sums[1]}\n".encode())
            self._data_id = h.hexdigest()
        return self._data_id

    def _load_state(self) -> None:
        if not self.state_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.state_path}")
        # on the CPU: torch.set_rng_state takes CPU tensors only (the optimizer, EMA and model
        # copy their states onto the training device themselves)
        state = read_training_state(self.state_path)
        changed = changed_settings(state.get("config", {}), asdict(self.cfg), RESUME_MAY_CHANGE)
        if changed:
            raise ValueError(
                f"--resume: the run in {self.out} was started with {', '.join(changed)}; "
                "resume it with its own settings, or choose another --out directory"
            )
        saved_world = int(state.get("world_size", self.world))  # older checkpoints: not saved
        if saved_world != self.world:
            raise ValueError(
                f"--resume: the run in {self.out} was trained with {saved_world} process(es), "
                f"this launch has {self.world}: the batch per step and the order of the samples "
                f"would change; resume it with {saved_world} (torchrun --nproc_per_node "
                f"{saved_world}), or choose another --out directory")
        saved_data = state.get("data")  # older states: not recorded
        if saved_data is not None and saved_data != self._data_fingerprint():
            raise ValueError(
                f"--resume: the run in {self.out} was trained on other data (the training "
                f"cases of {self.collection.cache_dir}, or their contents, differ from the "
                "run's): resume it with its own collection, or choose another --out directory")
        if state["model_describe"] != self.model.describe():
            raise RuntimeError(
                f"{self.state_path} was written for another model or collection (vocabulary or "
                "architecture differ): use a new --out directory"
            )
        self.model.load_state_dict(state["model"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])

    def _load_optimizer_state(self, saved: dict) -> None:
        """Load the checkpoint's optimizer state, refusing one whose parameter groups are not
        this run's (a run of another kind: a training run resumed as a fine-tuning run, or
        another fine-tuning mode) with a message saying so, not torch's."""
        groups = [len(g["params"]) for g in saved.get("param_groups", [])]
        ours = [len(g["params"]) for g in self.optimizer.param_groups]
        if groups != ours:
            raise ValueError(
                f"--resume: {self.state_path} was written by another kind of run (its "
                f"optimizer has parameter groups of {groups} tensors, this run's {ours}: a "
                "training run, or a fine-tuning run of another mode); resume it as it was "
                "started, or choose another --out directory")
        self.optimizer.load_state_dict(saved)

    # ---------------------------------------------------------------- logging
    def _open_log(self):
        path = self.out / "log.csv"
        rows = []
        if self.step > 0 and path.exists():  # drop rows a killed run logged after its checkpoint
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        fields = LOG_FIELDS + (["extra"] if self.extra_loss is not None else [])
        kept = io.StringIO()  # the rows kept, replaced at once: a kill here loses none
        writer = csv.DictWriter(kept, fieldnames=fields, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, [kept.getvalue().encode()])
        f = open(path, "a", newline="")
        return f, csv.DictWriter(f, fieldnames=fields, extrasaction="ignore",
                                   lineterminator="\n")

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ---------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        ds = PatchDataset(self.collection, self.cfg.crop_size, seed=self.cfg.seed,
                          fg_prob=self.cfg.fg_prob, augment=self.cfg.augment,
                          datasets=self.cfg.datasets)
        sampler = StepSampler(self.step, self.cfg.steps, self.cfg.batch_size, self.world,
                              self.rank)
        null = self.model.config.null_tokens
        return DataLoader(
            ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
            collate_fn=lambda s: collate_partial(s, null), pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None,
        )

    def _shuffled_modalities(self, mod_idx: torch.Tensor) -> torch.Tensor:
        """The modality prior fed to the model: ``mod_idx`` with a ``modality_shuffle`` fraction
        of known entries replaced by random modalities (a function of seed, step and rank)."""
        frac = self.cfg.modality_shuffle
        if frac <= 0:
            return mod_idx
        g = torch.Generator().manual_seed(
            (self.cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank)
        b = mod_idx.shape[0]
        swap = (torch.rand(b, generator=g) < frac).to(mod_idx.device) & (mod_idx >= 0)
        rand = torch.randint(0, len(self.model.vocab.modalities), (b,), generator=g)
        return torch.where(swap, rand.to(mod_idx.device), mod_idx)

    def scheduled_lr(self) -> float:
        """The base learning rate the schedule sets for the next step (log.csv's ``lr``): the
        rate of groups without an ``lr_scale``, the same in every fine-tuning mode (the
        optimizer's first group may be a scaled one, or absent when its parameters are
        frozen)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimiser step on ``batch`` (from :func:`collate_partial`); returns the losses."""
        dev = self.device
        x = batch["image"].to(dev, non_blocking=True)
        targets = batch["targets"].to(dev, non_blocking=True)
        annotated = batch["annotated"].to(dev)
        mod_idx = batch["modality_idx"].to(dev)
        prior_idx = self._shuffled_modalities(mod_idx)
        net = self.ddp if self.ddp is not None else self.model
        self.model.train()
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = net(x, task_idx=batch["task_idx"].to(dev), modality_idx=prior_idx)
        t = targets.shape[1]
        ignore = batch.get("ignore")
        bce, dice = partial_label_loss(out.seg_logits[:, :t], targets, annotated,
                                       ignore=None if ignore is None else ignore.to(dev))
        mod = modality_loss(out.modality_logits, mod_idx)
        loss = bce + dice + self.cfg.modality_loss_weight * mod
        extra_logs: dict[str, float] = {}
        if self.extra_loss is not None:
            extra, extra_logs = self.extra_loss(self, batch, out, x)
            loss = loss + extra
            extra_logs = {"extra": float(extra.detach()), **extra_logs}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model)
        logs = {"loss": loss.detach(), "bce": bce.detach(), "dice": dice.detach(),
                "modality": mod.detach(), **extra_logs}
        parts = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                             for v in logs.values()])
        if self.world > 1:  # logged as the mean over the processes, not rank 0's share
            dist.all_reduce(parts)
            parts /= self.world
        return dict(zip(logs, parts.tolist(), strict=True))

    def run(self) -> Path:
        """Train to ``cfg.steps`` (from the resumed step), writing the log, checkpoints and
        finally the EMA model (rank 0); returns the model's path."""
        main = self.rank == 0
        if main and not self._holding:
            raise RuntimeError(f"Trainer.run: the run folder {self.out} was released "
                               "(close() was called); make a new Trainer to train again")
        try:
            return self._run()
        finally:
            if not self._in_with:
                self.close()

    def _run(self) -> Path:
        """:meth:`run`'s loop, with the run folder locked."""
        cfg = self.cfg
        main = self.rank == 0
        loader = self._loader()  # checks the dataset names before the run folder is written
        if main:
            remove_stale_temporaries(self.out)  # of a run killed while writing a checkpoint
            atomic_write_bytes(self.out / "config.json",
                               [json.dumps(asdict(cfg), indent=1).encode()])
            log_file, log = self._open_log()
            tb = self._tensorboard()
        bar = None
        if main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        try:
            t_data = time.perf_counter()
            for batch in loader:
                data_s = time.perf_counter() - t_data
                t0 = time.perf_counter()
                lr = self.scheduled_lr()  # the base rate this step uses
                losses = self.train_step(batch)
                self.step += 1
                row = {"step": self.step, **{k: f"{v:.6g}" for k, v in losses.items()},
                       "lr": f"{lr:.6g}",
                       "seconds": f"{time.perf_counter() - t0:.4f}",
                       "data_seconds": f"{data_s:.4f}"}
                if main:
                    log.writerow(row)
                    log_file.flush()
                    if tb is not None:
                        for k, v in losses.items():
                            tb.add_scalar(f"train/{k}", v, self.step)
                    if bar is not None:  # one redraw per step, with this step's loss
                        bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
                        bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self._save_state()
                t_data = time.perf_counter()
            self._check_sync()
            model_path = self.out / MODEL_FILE
            if main:
                hm.save(self.ema.model, model_path, metadata=self.export_metadata())
            return model_path
        finally:
            if bar is not None:
                bar.close()
            if main:
                log_file.close()
                if tb is not None:
                    tb.close()

    def export_metadata(self) -> dict[str, Any]:
        """What an exported model records about its training: steps, config, collection, and
        the preprocessing (spacing, orientation, normalisation) inference must repeat."""
        return {
            "trained_steps": self.step,
            "train_config": asdict(self.cfg),
            "collection": self.collection.name,
            "preprocess": self.collection.params,
            "datasets": {name: {"modality": d.modality, "tasks": list(d.tasks)}
                         for name, d in self.collection.datasets.items()},
            "weights": "ema",
        }

    def _check_sync(self) -> None:
        """Under DDP, verify every rank ends with the same weights."""
        if self.world == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum()
        gathered = [torch.zeros_like(total) for _ in range(self.world)]
        dist.all_gather(gathered, total)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"DDP ranks diverged: parameter sums {gathered}")
        if self.rank == 0 and self.cfg.progress:
            print(f"ddp: parameters in sync across {self.world} ranks")


def changed_settings(saved: dict, now: dict, may_change: frozenset = frozenset()) -> list[str]:
    """``"name=saved (now value)"`` for every setting both dicts hold (compared as JSON, so
    tuples equal lists) that differs, except ``may_change``."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    return [f"{k}={saved[k]!r} (now {now[k]!r})" for k in sorted(saved)
            if k in now and k not in may_change and saved[k] != now[k]]


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train (or resume) a universal model; returns the exported EMA model path. The run
    folder is locked for the run: a second run into it is refused
    (:class:`~hermes.files.FolderBusyError`)."""
    try:
        with Trainer(cfg, resume=resume) as trainer:
            return trainer.run()
    finally:
        leave_distributed()
