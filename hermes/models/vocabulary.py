"""Task and modality vocabularies: the names a model answers to, and their prior-table rows."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hermes._text import first_of

# Spellings users write for the canonical modality names (compared case-insensitively).
MODALITY_ALIASES = {
    "ct": "CT",
    "pet": "PET",
    "t1": "T1", "t1w": "T1", "mr t1": "T1", "mri t1": "T1", "t1 mri": "T1",
    "t2": "T2", "t2w": "T2", "mr t2": "T2", "mri t2": "T2", "t2 mri": "T2",
    "cine": "CINE", "cine mri": "CINE", "cinemri": "CINE", "cine mr": "CINE",
    "mr": "MR", "mri": "MR",
}


class UnknownNameError(KeyError):
    """A task, modality or group name the model's vocabulary does not contain."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@dataclass
class Vocabulary:
    """Ordered task and modality names.

    ``tasks[i]`` owns row ``i`` of every task-prior table (the null token is the extra last row);
    ``modalities[j]`` owns row ``j`` of every modality-prior table. ``groups`` maps a dataset name
    to ``{"tasks": [...], "modality": ...}`` so a whole dataset's tasks can be requested at once.
    ``reserved`` names hold rows that exist in the weights but must not be requested.
    """

    tasks: list[str]
    modalities: list[str]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    reserved: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for kind, names in (("tasks", self.tasks), ("modalities", self.modalities)):
            if isinstance(names, str):
                raise TypeError(f"{kind} must be a list of names, got the str {names!r} (for "
                                f"one name: [{names!r}])")
        self.tasks = [str(t) for t in self.tasks]
        self.modalities = [str(m) for m in self.modalities]
        for kind, names in (("task", self.tasks), ("modality", self.modalities)):
            if not names:
                raise ValueError(f"a model needs at least one {kind} name")
            if any(not n.strip() or n != n.strip() for n in names):
                raise ValueError(f"{kind} names must be non-empty without surrounding "
                                 f"spaces, got {[n for n in names if n != n.strip() or not n]}")
            # modalities are looked up case-insensitively: 'T1' and 't1' would share a row
            keys = [n.casefold() if kind == "modality" else n for n in names]
            dup = sorted({n for n, k in zip(names, keys, strict=True) if keys.count(k) > 1})
            if dup:
                raise ValueError(f"duplicate {kind} names: {dup}")
        self._task_rows = {name: i for i, name in enumerate(self.tasks)}
        self._mod_rows = {name.casefold(): i for i, name in enumerate(self.modalities)}
        for group, spec in self.groups.items():
            tasks = spec.get("tasks") if isinstance(spec, Mapping) else None
            if (not isinstance(tasks, Sequence) or isinstance(tasks, str) or not tasks
                    or not all(isinstance(t, str) for t in tasks)):
                raise ValueError(f"group {group!r} must be a mapping with a non-empty 'tasks' "
                                 f"list of task names, got {spec!r}")
            missing = [t for t in tasks if t not in self._task_rows]
            if missing:
                raise ValueError(f"group {group!r} names unknown tasks {missing}")

    def task_index(self, name: str) -> int:
        """Row of task ``name``; raises :class:`UnknownNameError` naming close matches."""
        row = self._task_rows.get(name)
        if row is None or name in self.reserved:
            usable = [t for t in self.tasks if t not in self.reserved]
            hint = _suggest(name, usable) or f"; known tasks include {first_of(usable, 8)}"
            group = self.group_name(name) if isinstance(name, str) else None
            if group is not None:
                hint = f"; {group!r} is a dataset group: pass model.vocab.group({group!r})"
            elif self.groups:
                hint += f" (dataset groups: {first_of(sorted(self.groups), 8)})"
            raise UnknownNameError(f"unknown task {name!r}{hint}")
        return row

    def group_name(self, name: str) -> str | None:
        """The dataset group ``name`` refers to: itself, or the one group whose name equals it
        ignoring case ('BCV' for 'bcv'); None when there is none."""
        if name in self.groups:
            return name
        folded = [g for g in self.groups if g.casefold() == name.casefold()]
        return folded[0] if len(folded) == 1 else None

    def modality_index(self, name: str) -> int:
        """Row of modality ``name`` (case-insensitive; common aliases like 'T1w' accepted)."""
        key = str(name).strip().casefold()
        row = self._mod_rows.get(key)
        if row is None and key in MODALITY_ALIASES:
            row = self._mod_rows.get(MODALITY_ALIASES[key].casefold())
        if row is None:  # the spellings collection YAMLs accept ('T1ce', 'MPRAGE', 'cine-MRI')
            from hermes.data.modalities import UnknownModalityError, canonical_modality

            try:
                row = self._mod_rows.get(canonical_modality(str(name)).casefold())
            except UnknownModalityError:
                row = None
        if row is None:
            raise UnknownNameError(
                f"unknown modality {name!r}; this model knows {', '.join(self.modalities)}"
            )
        return row

    def canonical_modality(self, name: str) -> str:
        """The vocabulary's own spelling of modality ``name``."""
        return self.modalities[self.modality_index(name)]

    def group(self, name: str) -> list[str]:
        """Task names of dataset group ``name`` (case-insensitive where that is unambiguous)."""
        group = self.group_name(name)
        if group is None:
            raise UnknownNameError(
                f"unknown dataset group {name!r}{_suggest(name, list(self.groups))}"
            )
        return list(self.groups[group]["tasks"])

    def usable_tasks(self) -> list[str]:
        """Task names that may be requested (reserved rows excluded)."""
        return [t for t in self.tasks if t not in self.reserved]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "modalities": list(self.modalities),
            "groups": self.groups,
            "reserved": list(self.reserved),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(
            tasks=list(data["tasks"]),
            modalities=list(data["modalities"]),
            groups=dict(data.get("groups", {})),
            reserved=list(data.get("reserved", data.get("reserved_tasks", []))),
        )


def official_vocabulary() -> Vocabulary:
    """The 71-task (72 rows) / 6-row modality index tables of the official Hermes-R checkpoint."""
    text = resources.files("hermes.models").joinpath("data/official_vocab.json").read_text()
    return Vocabulary.from_dict(json.loads(text))
