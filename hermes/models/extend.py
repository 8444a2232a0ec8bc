"""Model surgery: add task and modality names (new prior rows) to a trained Hermes model.

:func:`extend_vocabulary` returns a new :class:`HermesResUNet` whose vocabulary is the old one
plus the new names, with every weight of the old model copied:

* every fusion layer's ``task_priors`` goes from ``(T + 1) x C`` to ``(T + n + 1) x C``: the ``n``
  new rows are inserted *before* the null row, which stays last; old rows keep their indices;
* every fusion layer's ``modality_priors`` goes from ``M x K x C`` to ``(M + m) x K x C`` (new
  rows appended), and the modality head's output layer ``fc2`` from ``M`` to ``M + m`` outputs.

Requests made by name for old tasks and old modalities therefore give exactly the old model's
segmentation logits (the same numbers, tested bit-for-bit in float64); the old modality logits
agree up to summation order in the wider output layer (~1e-16 relative).
One index-form detail changes: ``modality_idx = -1`` selects the *last* modality row (as in the
official model), which becomes the last new modality.

Initialisation of a new row (``init="similar"``, the default; :func:`similar_task` and
:func:`similar_modality` say which old row is used):

1. tasks: an old task with the same structure name after the dataset prefix
   (``"b/liver"`` copies ``"a/liver"``; ``"liver"`` matches ``"a/liver"`` too; the first in
   vocabulary order wins);
2. else the old task whose structure name is the closest by :mod:`difflib` similarity
   (ratio >= 0.75, e.g. ``"kidneys"`` ~ ``"kidney"``);
3. modalities: an old modality with the same canonical name or alias family (``T1``/``T1w``),
   else the closest name (ratio >= 0.75), else the mean of the old MR-family rows for MR-like
   names (``FLAIR``, ``DWI``, ``MR*``);
4. otherwise random: xavier-uniform over the table's width (as a fresh model), or the
   ``nn.Linear`` default for the modality head row.

``init="random"`` always uses (4). Copied rows are exact copies, so a new task starts as a clone
of its source (it then diverges through training).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hermes.models.checkpoint import unwrap
from hermes.models.hermes_resunet import HermesResUNet
from hermes.models.vocabulary import MODALITY_ALIASES, Vocabulary

__all__ = [
    "ExtensionPlan",
    "add_decoder_branch",
    "extend_vocabulary",
    "plan_extension",
    "similar_modality",
    "similar_task",
    "structure_name",
]

NAME_CUTOFF = 0.75
_MR_LIKE = ("T1", "T2", "CINE", "MR")
_MR_HINTS = ("mr", "flair", "dwi", "adc", "t1", "t2", "pd", "swi", "bold", "dce")


def structure_name(task: str) -> str:
    """The structure part of a task name: ``"bcv/liver"`` -> ``"liver"``."""
    return task.rsplit("/", 1)[-1].strip().casefold()


def _closest(key: str, existing: Sequence[str], name_of: Callable[[str], str]) -> str | None:
    """The first entry of ``existing`` whose ``name_of`` is the most :mod:`difflib`-similar to
    ``key``, if that similarity reaches ``NAME_CUTOFF``; else None."""
    best, best_ratio = None, 0.0
    for e in existing:
        r = difflib.SequenceMatcher(None, key, name_of(e)).ratio()
        if r > best_ratio:
            best, best_ratio = e, r
    return best if best_ratio >= NAME_CUTOFF else None


def similar_task(name: str, existing: Sequence[str]) -> str | None:
    """The old task a new task ``name`` is initialised from (None: random); see module doc."""
    struct = structure_name(name)
    for t in existing:
        if t != name and structure_name(t) == struct:
            return t
    return _closest(struct, existing, structure_name)


def _family(name: str) -> str:
    key = name.strip().casefold()
    return MODALITY_ALIASES.get(key, name.strip()).casefold()


def similar_modality(name: str, existing: Sequence[str]) -> str | list[str] | None:
    """The old modality (or list of MR-family modalities, averaged) a new modality starts from."""
    fam = _family(name)
    for m in existing:
        if _family(m) == fam:
            return m
    best = _closest(fam, existing, _family)
    if best is not None:
        return best
    if any(h in name.casefold() for h in _MR_HINTS):
        mr = [m for m in existing if _family(m).upper() in _MR_LIKE]
        if mr:
            return mr
    return None


class ExtensionPlan(dict):
    """``{"tasks": {new: source or None}, "modalities": {new: source(s) or None}}``."""


def plan_extension(
    vocab: Vocabulary, new_tasks: Sequence[str] = (), new_modalities: Sequence[str] = (),
    init: str = "similar",
) -> ExtensionPlan:
    """Which old row each new name is initialised from (``None`` = random)."""
    if init not in ("similar", "random"):
        raise ValueError(f"init must be 'similar' or 'random', got {init!r}")
    old_tasks = vocab.usable_tasks()
    plan = ExtensionPlan(tasks={}, modalities={})
    for t in new_tasks:
        plan["tasks"][t] = similar_task(t, old_tasks) if init == "similar" else None
    for m in new_modalities:
        plan["modalities"][m] = (
            similar_modality(m, vocab.modalities) if init == "similar" else None
        )
    return plan


def _check_new(vocab: Vocabulary, new_tasks: list[str], new_modalities: list[str]) -> None:
    for kind, new, old in (("task", new_tasks, vocab.tasks),
                           ("modality", new_modalities, vocab.modalities)):
        dup = sorted({n for n in new if new.count(n) > 1})
        if dup:
            raise ValueError(f"new {kind} names given twice: {dup}")
        clash = [n for n in new if n in old]
        if kind == "modality":
            clash += [n for n in new if n not in clash and _family(n) in
                      {_family(o) for o in old}]
        if clash:
            raise ValueError(f"{kind} names already in the model: {clash}")


def _merge_groups(old: Mapping[str, dict], new: Mapping[str, Mapping]) -> dict[str, dict]:
    """The model's dataset groups plus the new ones; a new group named like an old one (the
    same dataset name in the fine-tuning collection) adds its tasks to the old group's, which
    keeps its own first (``hermes.segment`` with no task list segments a modality's groups)."""
    merged = copy.deepcopy(dict(old))
    for g, spec in new.items():
        spec = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()}
        if g not in merged:
            merged[g] = spec
            continue
        before = merged[g]
        m_old, m_new = before.get("modality"), spec.get("modality")
        if m_old and m_new and str(m_old).casefold() != str(m_new).casefold():
            raise ValueError(f"dataset {g!r} of the collection is {m_new}, the model's group "
                             f"{g!r} is {m_old}: rename the dataset")
        tasks = list(before.get("tasks", []))
        before["tasks"] = tasks + [t for t in spec.get("tasks", []) if t not in tasks]
    return merged


@torch.no_grad()
def extend_vocabulary(
    model: HermesResUNet,
    new_tasks: Sequence[str] = (),
    new_modalities: Sequence[str] = (),
    init: str = "similar",
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    generator: torch.Generator | None = None,
) -> HermesResUNet:
    """A copy of ``model`` that also knows ``new_tasks`` and ``new_modalities``.

    Args:
        model: a trained model (left untouched).
        new_tasks: task names to add (must not exist yet); rows go before the null row.
        new_modalities: modality names to add (an alias of an existing one is refused).
        init: ``"similar"`` (copy the most similar old row, see module doc) or ``"random"``.
        groups: dataset groups to add, ``{name: {"tasks": [...], "modality": m}}``; one named
            like an existing group adds its tasks to it (same modality, else ValueError)
            (may name old and new tasks).
        generator: random generator for randomly initialised rows (default: torch's global).
    Returns:
        The extended model, in the old model's dtype/device and training mode.
    """
    model = unwrap(model)
    new_tasks, new_modalities = list(new_tasks), list(new_modalities)
    old_vocab = model.vocab
    _check_new(old_vocab, new_tasks, new_modalities)
    plan = plan_extension(old_vocab, new_tasks, new_modalities, init)
    merged_groups = _merge_groups(old_vocab.groups, groups or {})
    vocab = Vocabulary(
        tasks=old_vocab.tasks + new_tasks,
        modalities=old_vocab.modalities + new_modalities,
        groups=merged_groups,
        reserved=list(old_vocab.reserved),
    )
    param = next(model.parameters())
    new_model = HermesResUNet(copy.deepcopy(model.config), vocab).to(param.device, param.dtype)
    t_old, m_old = len(old_vocab.tasks), len(old_vocab.modalities)
    state = model.state_dict()
    target = new_model.state_dict()

    def uniform(shape: tuple[int, ...], bound: float, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return ((u * 2 - 1) * bound).to(like)

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tgt = target[key]
        if key.endswith("task_priors"):
            c = value.shape[1]
            rows = [value[:t_old]]
            for t in new_tasks:
                src = plan["tasks"][t]
                if src is None:
                    # the xavier bound of a fresh (T_new + 1) x C table
                    rows.append(uniform((1, c), (6.0 / (tgt.shape[0] + c)) ** 0.5, value))
                else:
                    rows.append(value[old_vocab.task_index(src)][None])
            rows.append(value[t_old:])  # the null row (stays last)
            out[key] = torch.cat(rows)
        elif key.endswith("modality_priors"):
            k, c = value.shape[1:]
            rows = [value]
            bound = (6.0 / (k * c + (m_old + len(new_modalities)) * c)) ** 0.5  # xavier fans
            for m in new_modalities:
                src = plan["modalities"][m]
                if src is None:
                    rows.append(uniform((1, k, c), bound, value))
                else:
                    idx = [old_vocab.modality_index(s) for s in
                           (src if isinstance(src, list) else [src])]
                    rows.append(value[idx].mean(dim=0, keepdim=True))
            out[key] = torch.cat(rows)
        elif key in ("modality_head.fc2.weight", "modality_head.fc2.bias"):
            rows = [value]
            fan_in = state["modality_head.fc2.weight"].shape[1]
            for m in new_modalities:
                src = plan["modalities"][m]
                if src is None:
                    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    rows.append(uniform((1, *value.shape[1:]), fan_in**-0.5, value))
                else:
                    idx = [old_vocab.modality_index(s) for s in
                           (src if isinstance(src, list) else [src])]
                    rows.append(value[idx].mean(dim=0, keepdim=True))
            out[key] = torch.cat(rows)
        else:
            out[key] = value.clone()
        if out[key].shape != tgt.shape:  # pragma: no cover - guards future architecture changes
            raise RuntimeError(f"surgery produced {key} {tuple(out[key].shape)}, "
                               f"expected {tuple(tgt.shape)}")
    new_model.load_state_dict(out, strict=True)
    _carry_impl(model, new_model)
    new_model.train(model.training)
    return new_model


def _carry_impl(model: HermesResUNet, new_model: HermesResUNet,
                renames: Sequence[tuple[str, str]] = ()) -> None:
    """Copy per-block ``impl`` attributes (fused or reference prior attention) to the modules of
    the same name in ``new_model``, and to ``new`` + rest for every ``(old, new)`` prefix pair."""
    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if impl is None:
            continue
        new_model.get_submodule(name).impl = impl
        for old, new in renames:
            if name.startswith(old):
                new_model.get_submodule(new + name[len(old):]).impl = impl


@torch.no_grad()
def add_decoder_branch(model: HermesResUNet, first_task: int) -> HermesResUNet:
    """A copy of ``model`` in which the tasks from index ``first_task`` on are segmented by a new
    decoder branch (:class:`~hermes.models.hermes_resunet.DecoderBranch`), initialised as a copy
    of the main decoder (stages, decoder fusion layers, task head).

    Used by incremental fine-tuning: the old decoders stay frozen while the branch learns the new
    tasks on the shared encoder. ``first_task`` must follow every existing branch's first task and
    name a task of the vocabulary.
    """
    model = unwrap(model)
    branches = model.config.decoder_branches
    n_tasks = len(model.vocab.tasks)
    if not (branches[-1] if branches else 0) < first_task < n_tasks:
        raise ValueError(f"a new decoder branch must start at a task index after "
                         f"{branches[-1] if branches else 0} and below {n_tasks}, "
                         f"got {first_task}")
    config = copy.deepcopy(model.config)
    config.decoder_branches = (*branches, int(first_task))
    param = next(model.parameters())
    new_model = HermesResUNet(config, model.vocab).to(param.device, param.dtype)
    prefix = f"branches.{len(branches)}."
    renames = [(main, prefix + sub) for main, sub in (
        ("up.", "up."), ("fusion.3.", "fusion.0."), ("fusion.4.", "fusion.1."),
        ("task_head.", "task_head."))]
    state = dict(model.state_dict())
    for key, value in model.state_dict().items():
        for main, branch in renames:
            if key.startswith(main):
                state[branch + key[len(main):]] = value.clone()
    new_model.load_state_dict(state, strict=True)
    _carry_impl(model, new_model, renames)
    new_model.train(model.training)
    return new_model
