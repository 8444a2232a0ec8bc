"""Fine-tuning a trained Hermes model on new datasets: transfer and incremental learning.

``finetune(model, cache, out_dir, mode=...)`` (``hermes finetune MODEL collection.yaml``):

1. the collection's task names (and used modalities) the model does not know are added with
   :func:`hermes.models.extend.extend_vocabulary` (new prior rows at every fusion level,
   initialised from the most similar old prior or at random), with the collection's datasets as
   vocabulary groups;
2. the model is trained by the ordinary :class:`~hermes.training.trainer.Trainer` on the
   collection's training split, in one of three modes:

   * ``full``: every parameter trains (transfer by initialisation);
   * ``priors``: backbone and fusion blocks frozen; only the NEW prior rows (task and modality)
     and the two heads train;
   * ``incremental``: everything trains except the OLD prior rows (and the null row), and old
     tasks are protected by distillation from the old model (default weight 1) and/or rehearsal
     on the old collection's cached cases (``rehearsal=`` its cache, ``rehearsal_fraction`` of
     the samples); with ``freeze_shared`` only the new prior rows train (backbone, fusion
     blocks and heads frozen too), so that old tasks requested without new ones give exactly
     the old outputs; with ``new_decoder`` the same holds, but the new tasks are segmented by
     a new decoder branch (:func:`~hermes.models.extend.add_decoder_branch`: a trainable copy
     of the decoder, its fusion layers and task head, on the frozen encoder) that trains with
     the new rows of the encoder's prior tables;
   * ``modality``: only the modality head trains, on crops given random modality priors
     (``modality_shuffle`` 1, modality loss weight 1), so that ``modality="auto"`` detects the
     modality from the image; segmentation is left bit-identical. The collection must not
     bring new names.

   Frozen prior rows are rows of one ``Parameter``: a gradient hook zeroes their gradient, the
   prior tables get no weight decay (and ``prior_lr_scale`` times the learning rate: prior rows
   are small vectors that move little at a backbone's rate), and after training the exported
   (EMA) model gets the frozen values copied back exactly, so they are bit-identical to the old
   model's;
3. the EMA model is written to ``out_dir/model.hermes``: a normal self-describing checkpoint
   (vocabulary with old and new tasks and groups) whose metadata records the fine-tuning.

Distillation (learning without forgetting): for each sample of a batch an old dataset group is
chosen (one whose modality is the sample's, else any old group; rotating with the step), and
the old model and the model being trained are both run on the batch with those old tasks and the
group's modality; the loss is the mean over voxels and (sample, task) pairs of
``KL(Bernoulli(sigmoid(old)) || Bernoulli(sigmoid(new)))`` (BCE against the old probabilities,
minus the old entropy, so it is 0 when the outputs agree). It costs one more forward/backward.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hermes.models as hm
from hermes._text import first_of
from hermes.data.cache import CachedCase, PreprocessedCollection
from hermes.files import atomic_write_json
from hermes.models.checkpoint import unwrap
from hermes.models.extend import (
    ExtensionPlan,
    add_decoder_branch,
    extend_vocabulary,
    plan_extension,
)
from hermes.models.vocabulary import UnknownNameError, Vocabulary
from hermes.training.trainer import (
    MODEL_FILE,
    STATE_FILE,
    TrainConfig,
    Trainer,
    changed_settings,
    leave_distributed,
)

__all__ = [
    "MODES",
    "AlignedCollection",
    "FinetuneResult",
    "distillation_loss",
    "finetune",
    "new_names",
]

MODES = ("full", "priors", "incremental", "modality")


class AlignedCollection:
    """Cases of one or more preprocessed caches, indexed by a model's vocabulary.

    Every case's :class:`~hermes.data.cache.DatasetInfo` is rewritten so ``task_indices`` and
    ``modality_index`` are rows of ``vocab`` (so batches index the model directly). Duck-types
    :class:`PreprocessedCollection` for :class:`Trainer`/``PatchDataset``.

    Args:
        sources: ``(collection, share)``: a dataset of a collection is sampled with probability
            ``share x`` its own sampling weight; a dataset name already taken by an earlier
            source is skipped.
        vocab: the model's vocabulary (must contain every task and modality used).
    """

    def __init__(self, sources: Sequence[tuple[PreprocessedCollection, float]],
                 vocab: Vocabulary) -> None:
        if not sources:
            raise ValueError("no collection given")
        self.sources = [pc for pc, _ in sources]
        self.name = "+".join(pc.name for pc in self.sources)
        self.cache_dir = self.sources[0].cache_dir
        self.tasks = list(vocab.tasks)
        self.modalities = list(vocab.modalities)
        self.params = self.sources[0].params
        self.datasets: dict[str, Any] = {}
        self.cases: list[CachedCase] = []
        self.splits: dict[str, dict[str, list[str]]] = {}
        self.sampling_weights: dict[str, float] = {}
        self._by_key: dict[str, CachedCase] = {}
        for pc, share in sources:
            for ds, info in pc.datasets.items():
                if ds in self.datasets:
                    warnings.warn(f"dataset {ds!r} of {pc.cache_dir} is not sampled: an earlier "
                                  "collection has a dataset of that name", stacklevel=2)
                    continue
                self.datasets[ds] = dataclasses.replace(
                    info, task_indices=tuple(vocab.task_index(t) for t in info.tasks),
                    modality_index=vocab.modality_index(info.modality),
                    weight=info.weight * share)
                self.sampling_weights[ds] = pc.sampling_weights[ds] * share
                self.splits[ds] = pc.splits.get(ds, {})
                for case in pc.cases:
                    if case.dataset == ds:
                        c = CachedCase(case.cache_dir, case.meta, self.datasets[ds])
                        self.cases.append(c)
                        self._by_key[c.key] = c
        total = sum(self.sampling_weights.values())
        self.sampling_weights = {k: v / total for k, v in self.sampling_weights.items()}

    @property
    def groups(self) -> dict[str, dict]:
        return {d.name: {"tasks": list(d.tasks), "modality": d.modality}
                for d in self.datasets.values()}

    def split(self, name: str, dataset: str | None = None) -> list[CachedCase]:
        """Cases of split ``name``, optionally of one dataset."""
        return [self._by_key[f"{ds}/{cid}"] for ds, s in self.splits.items()
                if dataset in (None, ds) for cid in s.get(name, [])
                if f"{ds}/{cid}" in self._by_key]

    def __len__(self) -> int:
        return len(self.cases)


def _open(collection: str | os.PathLike | PreprocessedCollection, base_preprocess: dict,
          base_name: str) -> PreprocessedCollection:
    """The collection preprocessed as the base model's training data (a YAML without a cache
    yet is preprocessed with the base model's settings); a cache on another grid is refused."""
    from hermes.training.commands import check_same_grid, open_cache

    pc = collection if isinstance(collection, PreprocessedCollection) else open_cache(
        str(collection), None, None, False, defaults=base_preprocess)
    check_same_grid(base_preprocess, pc.params, base_name, pc.cache_dir)
    return pc


def _weights_digest(model: nn.Module) -> str:
    """Short SHA-256 of a model's weights: which base model a fine-tuning run started from."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def new_names(vocab: Vocabulary, pc: PreprocessedCollection) -> tuple[list[str], list[str]]:
    """(task names, modality names) of ``pc``'s datasets that ``vocab`` does not know.

    Only modalities some dataset uses count (caches list all canonical modalities)."""
    tasks: list[str] = []
    for info in pc.datasets.values():
        tasks += [t for t in info.tasks if t not in vocab.tasks and t not in tasks]
    mods: list[str] = []
    for info in pc.datasets.values():
        try:
            vocab.modality_index(info.modality)
        except UnknownNameError:
            if info.modality not in mods:
                mods.append(info.modality)
    return tasks, mods


def names_from_other_datasets(vocab: Vocabulary, pc: PreprocessedCollection) -> list[str]:
    """``"task (dataset; the model's from A, B)"`` for each task of ``pc`` the model knows (so
    it trains the model's prior for it) but only from other datasets than the one naming it in
    ``pc`` (by the model's dataset groups): a shared bare name such as ``cancer`` may be another
    structure."""
    owners: dict[str, set[str]] = {}
    for group, spec in vocab.groups.items():
        for t in spec.get("tasks", []):
            owners.setdefault(t, set()).add(group)
    found: list[str] = []
    for name, info in pc.datasets.items():
        for t in info.tasks:
            theirs = owners.get(t)
            if t in vocab.tasks and theirs and name not in theirs:
                entry = f"{t} ({name}; the model's from {', '.join(sorted(theirs))})"
                if entry not in found:
                    found.append(entry)
    return found


def _row_mask(n_rows: int, frozen: Sequence[int], like: Tensor) -> Tensor:
    """(n_rows, 1[, 1]) mask: 0 on frozen rows, 1 elsewhere, broadcastable to ``like``."""
    mask = torch.ones(n_rows, *([1] * (like.dim() - 1)), dtype=like.dtype, device=like.device)
    mask[list(frozen)] = 0
    return mask


ENCODER_FUSION = ("fusion.0.", "fusion.1.", "fusion.2.")


def frozen_layout(model: hm.HermesResUNet, old_tasks: int, old_mods: int, mode: str,
                  freeze_shared: bool = False, new_branch: str | None = None,
                  ) -> tuple[dict[str, list[int]], set[str]]:
    """What a mode freezes.

    In ``incremental`` mode, ``freeze_shared`` also freezes every parameter but the prior tables
    (and the new modalities' rows of the modality head's output layer); ``new_branch`` (the
    parameter-name prefix of a new decoder branch) does the same except that the branch trains
    entirely, and the old decoders' fusion tables are frozen whole (new tasks' rows included:
    those decoders do not segment them).

    Returns:
        (rows, params): ``rows[name]`` lists the frozen rows of a table ``name`` (the old task
        rows plus the null row, the old modality rows); ``params`` names whole parameters that do
        not train (a table may be in both: frozen whole, its old rows restored exactly on export).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows: dict[str, list[int]] = {}
    params: set[str] = set()
    if mode == "full":
        return rows, params
    if mode == "modality":
        return rows, {n for n, _ in model.named_parameters() if not n.startswith("modality_head.")}
    shared_frozen = mode == "incremental" and (freeze_shared or new_branch is not None)
    for name, p in model.named_parameters():
        if new_branch is not None and name.startswith(new_branch):
            continue
        if name.endswith(".task_priors"):
            rows[name] = list(range(old_tasks)) + [p.shape[0] - 1]  # old rows, null row
        elif name.endswith(".modality_priors"):
            rows[name] = list(range(old_mods))
        elif shared_frozen and name.startswith("modality_head.fc2."):
            rows[name] = list(range(old_mods))
        elif mode == "priors" and not _is_head(name):
            params.add(name)
        elif shared_frozen:
            params.add(name)
        if (new_branch is not None and name in rows and _is_prior_table(name)
                and not name.startswith(ENCODER_FUSION)):
            params.add(name)
    rows = {k: v for k, v in rows.items() if v}
    return rows, params


def _is_head(name: str) -> bool:
    """A parameter of the task head (the main one or a decoder branch's) or modality head."""
    return re.match(r"(branches\.\d+\.)?task_head\.|modality_head\.", name) is not None


def _is_prior_table(name: str) -> bool:
    return name.endswith((".task_priors", ".modality_priors"))


def make_param_groups(rows: dict[str, list[int]], params: set[str], weight_decay: float,
                      prior_lr_scale: float = 1.0):
    """The ``param_groups`` hook: freezes ``params``, masks the gradient of frozen ``rows``,
    puts the parameters with frozen rows in groups without weight decay (decay would move them)
    and gives the prior tables ``prior_lr_scale`` times the learning rate."""

    def groups(model: nn.Module) -> list[dict]:
        decay, tables_decay, tables_fixed, other_fixed = [], [], [], []
        for name, p in model.named_parameters():
            if name in params:
                p.requires_grad_(False)
                continue
            if name in rows:
                mask = _row_mask(p.shape[0], rows[name], p)
                p.register_hook(lambda g, m=mask: g * m)
                (tables_fixed if _is_prior_table(name) else other_fixed).append(p)
            elif _is_prior_table(name):
                tables_decay.append(p)
            else:
                decay.append(p)
        out = [{"params": decay, "weight_decay": weight_decay},
               {"params": tables_decay, "weight_decay": weight_decay,
                "lr_scale": prior_lr_scale},
               {"params": tables_fixed, "weight_decay": 0.0, "lr_scale": prior_lr_scale},
               {"params": other_fixed, "weight_decay": 0.0}]
        return [g for g in out if g["params"]]

    return groups


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor) -> Tensor:
    """Mean Bernoulli KL(teacher || student) over voxels and valid (sample, task) pairs.

    Args:
        student_logits, teacher_logits: B x T x D x H x W.
        valid: B x T bool.
    """
    s = student_logits.float().flatten(2)
    t = teacher_logits.float().flatten(2)
    p = torch.sigmoid(t)
    kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
          - F.binary_cross_entropy_with_logits(t, p, reduction="none")).mean(dim=2)
    w = valid.to(kl.dtype)
    n = w.sum()
    return (kl * w).sum() / n if n > 0 else s.sum() * 0.0


class Distiller:
    """The ``extra_loss`` hook: distillation from ``teacher`` on its old dataset groups."""

    def __init__(self, teacher: hm.HermesResUNet, weight: float, null_tokens: int) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = float(weight)
        self.null = null_tokens
        vocab = teacher.vocab
        groups = [(g, [vocab.task_index(t) for t in spec["tasks"] if t not in vocab.reserved],
                   spec.get("modality")) for g, spec in vocab.groups.items()]
        groups = [g for g in groups if g[1]]
        if not groups:  # no dataset groups: all tasks at once, the sample's modality
            groups = [("all", [vocab.task_index(t) for t in vocab.usable_tasks()], None)]
        self.groups = groups
        self.n_old_mods = len(vocab.modalities)

    def choose(self, modality_idx: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample an old group -> (task_idx B x (T+null), valid B x T, modality_idx B)."""
        vocab = self.teacher.vocab
        picks = []
        for i, m in enumerate(modality_idx.tolist()):
            mod_name = vocab.modalities[m] if 0 <= m < self.n_old_mods else None
            same = [g for g in self.groups if g[2] is not None and mod_name is not None
                    and vocab.modality_index(g[2]) == m]
            cands = same or self.groups
            g = cands[(step + i) % len(cands)]
            if g[2] is not None:
                gm = vocab.modality_index(g[2])
            else:
                gm = m if mod_name is not None else 0
            picks.append((g[1], gm))
        width = max(len(p[0]) for p in picks)
        b = len(picks)
        task_idx = torch.full((b, width + self.null), -1, dtype=torch.long)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for i, (rows, _) in enumerate(picks):
            task_idx[i, : len(rows)] = torch.tensor(rows)
            valid[i, : len(rows)] = True
        return task_idx, valid, torch.tensor([p[1] for p in picks], dtype=torch.long)

    def __call__(self, trainer: Trainer, batch: dict, out: Any, x: Tensor):
        dev = x.device
        task_idx, valid, mod_idx = self.choose(batch["modality_idx"], trainer.step)
        task_idx, valid, mod_idx = task_idx.to(dev), valid.to(dev), mod_idx.to(dev)
        self.teacher.to(dev)
        with torch.no_grad():
            t_logits = self.teacher(x, task_idx=task_idx, modality_idx=mod_idx).seg_logits
        s_logits = trainer.model(x, task_idx=task_idx, modality_idx=mod_idx).seg_logits
        n = valid.shape[1]
        kl = distillation_loss(s_logits[:, :n], t_logits[:, :n], valid)
        return self.weight * kl, {"distill": float(kl.detach())}


@dataclass
class FinetuneResult:
    """``path``: the exported model; ``model``: it, loaded; ``new_tasks``/``new_modalities``;
    ``plan``: the initialisation source of every new row (None = random); ``trainable``: how
    many of the model's ``parameters`` the mode trained."""

    path: Path
    model: hm.HermesResUNet
    new_tasks: list[str]
    new_modalities: list[str]
    plan: ExtensionPlan
    mode: str
    trainable: int = 0
    parameters: int = 0


def count_trainable(model: nn.Module, rows: dict[str, list[int]], params: set[str]) -> int:
    """Parameters of ``model`` that train under a :func:`frozen_layout` (frozen rows excluded)."""
    total = 0
    for name, p in model.named_parameters():
        if name in params:
            continue
        frozen_rows = len(rows.get(name, ()))
        total += p.numel() - frozen_rows * (p[0].numel() if p.dim() else 1)
    return total


#: fine-tuning settings outside :class:`TrainConfig` (which the trainer checks itself), recorded
#: in the run folder so that a resume with other ones is refused
SETTINGS_FILE = "finetune.json"


def _refuse_a_training_run(out_dir: Path) -> None:
    """Refuse a run folder of ``hermes train`` (a checkpoint without :data:`SETTINGS_FILE`)
    as a fine-tuning run's, resumed or not: its checkpoint is of another kind of run (its
    optimizer state does not fit), and its model would be replaced."""
    if (out_dir / STATE_FILE).exists() and not (out_dir / SETTINGS_FILE).exists():
        raise ValueError(
            f"{out_dir} holds a training run (`hermes train`: {STATE_FILE} and no "
            f"{SETTINGS_FILE}), not a fine-tuning run: fine-tune into another --out folder "
            f"(the run's {MODEL_FILE} can be the base model)")


def _check_resumed_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume the fine-tuning run in ``out_dir`` with other settings than it was
    started with."""
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        return
    changed = changed_settings(json.loads(path.read_text()), settings)
    if changed:
        raise ValueError(f"--resume: the fine-tuning run in {out_dir} was started with "
                         f"{', '.join(changed)}; resume it with its own settings")


def finetune(
    model: hm.HermesResUNet | str | os.PathLike,
    collection: str | os.PathLike | PreprocessedCollection,
    out_dir: str | os.PathLike,
    mode: str = "full",
    *,
    init: str = "similar",
    rehearsal: str | os.PathLike | PreprocessedCollection | None = None,
    rehearsal_fraction: float = 0.5,
    distill: float | None = None,
    freeze_shared: bool = False,
    new_decoder: bool = False,
    prior_lr_scale: float = 1.0,
    resume: bool = False,
    **train_options: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``collection`` (see the module docstring).

    Args:
        model: a model or checkpoint path (not modified).
        collection: the new data: a preprocessed cache folder, collection YAML or
            :class:`PreprocessedCollection`, resampled as the old model's training data (a
            YAML without a cache is preprocessed so; a cache on another grid is refused).
        out_dir: run folder (``model.hermes``, ``log.csv``, ``last.ckpt``).
        mode: ``full``, ``priors``, ``incremental`` or ``modality``.
        init: new rows from the most ``"similar"`` old prior or ``"random"``.
        rehearsal: an old cache whose training cases are mixed in (``rehearsal_fraction`` of the
            samples); any mode.
        distill: distillation weight (default 1.0 in ``incremental`` mode, else 0 = off).
        freeze_shared: ``incremental`` only: train nothing but the new prior rows (exact
            retention of old tasks requested on their own).
        new_decoder: ``incremental`` only: the new tasks get their own decoder branch (a
            trainable copy of the main decoder on the frozen encoder); everything else is frozen
            as with ``freeze_shared`` (old tasks requested on their own stay exact), but the new
            tasks learn with a decoder's capacity instead of prior rows alone.
        prior_lr_scale: learning-rate multiplier of the prior tables.
        resume: continue an interrupted run in ``out_dir``.
        train_options: :class:`TrainConfig` fields (``steps``, ``crop_size``, ``batch_size``,
            ``lr``, ``seed``, ``workers``, ...); ``crop_size`` defaults to the old model's
            training crop (``hermes.segment``'s default window).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for flag, on in (("freeze_shared", freeze_shared), ("new_decoder", new_decoder)):
        if on and mode != "incremental":
            raise ValueError(f"{flag} (--{flag.replace('_', '-')}) applies to mode "
                             "'incremental' (--mode incremental)")
    if freeze_shared and new_decoder:
        raise ValueError("give freeze_shared or new_decoder, not both")
    if not prior_lr_scale > 0:
        raise ValueError(f"prior_lr_scale (--prior-lr-scale) must be positive, got "
                         f"{prior_lr_scale}")
    if not 0.0 <= rehearsal_fraction < 1.0:
        raise ValueError(f"rehearsal_fraction (--rehearsal-fraction) must lie in [0, 1), got "
                         f"{rehearsal_fraction}")
    if distill is not None and not 0.0 <= float(distill) < float("inf"):
        raise ValueError(f"distill (the distillation loss weight) must be >= 0, got {distill}")
    base = hm.load(model) if isinstance(model, (str, os.PathLike)) else model
    base = unwrap(base)
    base_src = str(model) if isinstance(model, (str, os.PathLike)) else None
    base_meta = dict(getattr(base, "hermes_metadata", None) or {})  # set by hm.load
    base_pre = dict(base_meta.get("preprocess") or {})
    pc = _open(collection, base_pre, base_src or "the base model")
    new_tasks, new_mods = new_names(base.vocab, pc)
    reused = names_from_other_datasets(base.vocab, pc)
    if reused:
        warnings.warn(f"tasks the model learned from other datasets, which this collection's "
                      f"labels train further as the same structures: {first_of(reused, 4)}; "
                      "if one is another structure of the same name (e.g. one dataset's "
                      "'cancer' and another's), name it apart in a collection YAML", stacklevel=2)
    if freeze_shared and not (new_tasks or new_mods):
        raise ValueError("freeze_shared trains only the rows of new tasks and modalities: the "
                         "collection brings none")
    if mode == "priors" and not (new_tasks or new_mods):
        warnings.warn("mode 'priors' with a collection that brings no new task or modality "
                      "trains only the two heads", stacklevel=2)
    options = dict(train_options)
    if mode == "modality":
        if new_tasks or new_mods:
            raise ValueError(
                f"mode 'modality' trains only the modality head; the collection brings new "
                f"names {new_tasks + new_mods} (add them with another mode first)")
        options.setdefault("modality_shuffle", 1.0)
        options.setdefault("modality_loss_weight", 1.0)
    seed = int(train_options.get("seed", 0))
    gen = torch.Generator().manual_seed(seed)
    plan = plan_extension(base.vocab, new_tasks, new_mods, init)
    extended = extend_vocabulary(base, new_tasks, new_mods, init=init, groups=pc.groups,
                                 generator=gen)
    t_old, m_old = len(base.vocab.tasks), len(base.vocab.modalities)
    branch = None
    if new_decoder:
        if not new_tasks:
            raise ValueError("new_decoder needs new tasks: the collection brings none")
        branch = f"branches.{len(base.config.decoder_branches)}."
        extended = add_decoder_branch(extended, t_old)
    sources: list[tuple[PreprocessedCollection, float]] = [(pc, 1.0 - (
        rehearsal_fraction if rehearsal is not None else 0.0))]
    if rehearsal is not None:
        sources.append((_open(rehearsal, base_pre, base_src or "the base model"),
                        rehearsal_fraction))
    for (source, _), role in zip(sources, ("the new collection", "the rehearsal collection"),
                                 strict=False):
        channels = int(source.cases[0].image.shape[0]) if source.cases else base.config.in_channels
        if channels != base.config.in_channels:
            raise ValueError(f"{role} ({source.cache_dir}) has {channels}-channel images, the "
                             f"base model takes {base.config.in_channels}")
    aligned = AlignedCollection(sources, extended.vocab)

    options.setdefault("preset", base.config.preset or "custom")
    base_crop = (base_meta.get("train_config") or {}).get("crop_size")
    if base_crop:  # hermes.segment's default window is the training crop: keep the base's
        options.setdefault("crop_size", tuple(base_crop))
    cfg = TrainConfig(cache_dir=str(pc.cache_dir), out_dir=str(out_dir), **options)
    rows, frozen = frozen_layout(extended, t_old, m_old, mode, freeze_shared, branch)
    counts = (count_trainable(extended, rows, frozen),
              sum(p.numel() for p in extended.parameters()))
    exact = freeze_shared or new_decoder  # old tasks on their own are exact: nothing to distil
    weight = (1.0 if mode == "incremental" and not exact else 0.0) \
        if distill is None else float(distill)
    extra = None
    if weight > 0:
        teacher = copy.deepcopy(base).float()
        extra = Distiller(teacher, weight, base.config.null_tokens)
    settings = {
        "mode": mode, "init": init, "distill_weight": weight, "freeze_shared": freeze_shared,
        "new_decoder": new_decoder, "prior_lr_scale": prior_lr_scale,
        "rehearsal_fraction": rehearsal_fraction if rehearsal is not None else 0.0,
        "base_weights": _weights_digest(base)}
    _refuse_a_training_run(Path(out_dir))
    if resume:
        _check_resumed_settings(Path(out_dir), settings)
    trainer = Trainer(cfg, resume=resume, model=extended, collection=aligned,
                      param_groups=make_param_groups(rows, frozen, cfg.weight_decay,
                                                     prior_lr_scale),
                      extra_loss=extra)
    with trainer:  # the run folder stays locked until the export is written
        if trainer.rank == 0:
            atomic_write_json(trainer.out / SETTINGS_FILE, settings)
        try:
            path = trainer.run()
        finally:
            leave_distributed()
        if trainer.rank != 0:
            return FinetuneResult(path, trainer.ema.model, new_tasks, new_mods, plan, mode,
                                  *counts)
        exported = _restore_frozen(trainer.ema.model.cpu(), base, rows, frozen, t_old)
        header_meta = hm.read_header(path)["metadata"]
        pre = dict(getattr(pc, "params", {}) or {})  # how hermes.segment() must preprocess
        header_meta.setdefault("preprocess", {k: pre[k] for k in (
            "spacing", "image_order", "crop_nonzero", "normalization") if k in pre})
        header_meta["finetune"] = {
            "mode": mode, "base_model": base_src, "new_tasks": new_tasks,
            "new_modalities": new_mods, "init": init,
            "init_sources": {"tasks": plan["tasks"], "modalities": plan["modalities"]},
            "rehearsal": (str(getattr(rehearsal, "cache_dir", rehearsal))
                          if rehearsal is not None else None),
            "rehearsal_fraction": rehearsal_fraction if rehearsal is not None else 0.0,
            "distill_weight": weight, "old_tasks": t_old, "old_modalities": m_old,
            "freeze_shared": freeze_shared, "new_decoder": new_decoder,
            "trainable_parameters": counts[0],
            "prior_lr_scale": prior_lr_scale,
        }
        hm.save(exported, path, metadata=header_meta)
    return FinetuneResult(path, exported.eval(), new_tasks, new_mods, plan, mode, *counts)


def _restore_frozen(exported: hm.HermesResUNet, base: hm.HermesResUNet,
                    rows: dict[str, list[int]], frozen: set[str],
                    t_old: int) -> hm.HermesResUNet:
    """``exported`` (the EMA model, on the CPU) with the frozen parameters and rows set back
    to ``base``'s values exactly (EMA arithmetic rounds them); the task tables' null row moved
    to the end, so their old rows map to ``base``'s first ``t_old`` rows and its null row."""
    old_state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
    with torch.no_grad():
        params = dict(exported.named_parameters())
        for name in frozen - rows.keys():
            params[name].copy_(old_state[name])
        for name, r in rows.items():
            idx = torch.tensor(r)
            if name.endswith(".task_priors"):  # the null row moved to the end: map old rows
                src_idx = torch.tensor([i if i < t_old else t_old for i in r])
            else:
                src_idx = idx
            params[name][idx] = old_state[name][src_idx].to(params[name].dtype)
    return exported
