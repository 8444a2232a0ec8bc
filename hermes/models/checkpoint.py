"""Self-describing Hermes checkpoints, written atomically and verified on load.

File layout (all integers little-endian):

    b"HERMES-CKPT\\n"                 magic, 12 bytes
    u64 header length, then a UTF-8 JSON header:
        format_version, hermes_version, config, vocab, metadata,
        payload_bytes, payload_sha256
    payload: a ``torch.save`` of the state dict (tensors only)

The header can be read without loading any weight (``read_header``), truncation is detected
from ``payload_bytes`` and corruption from ``payload_sha256``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from hermes._text import first_of
from hermes._version import __version__
from hermes.files import atomic_write_bytes
from hermes.models.config import HermesConfig
from hermes.models.hermes_resunet import HermesResUNet
from hermes.models.vocabulary import Vocabulary

MAGIC = b"HERMES-CKPT\n"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with the reason."""


#: First bytes of a training run's state (``last.ckpt``); the sha256 digest (32 bytes) of the
#: rest, a ``torch.save`` of the state, follows.
STATE_MAGIC = b"HERMES-STATE\n"


def write_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training run's state (any ``torch.save``-able dict) with its checksum,
    atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    atomic_write_bytes(path, [STATE_MAGIC, hashlib.sha256(payload).digest(), payload])


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`write_training_state` wrote, checked against its digest (a state of
    an older Hermes, a plain ``torch.save`` without one, is read unchecked).

    Raises:
        CheckpointError: the file is damaged (checksum mismatch) or unreadable.
    """
    with open(path, "rb") as f:
        start = 0
        if f.read(len(STATE_MAGIC)) == STATE_MAGIC:
            digest = f.read(32)
            start = f.tell()
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            if h.digest() != digest:
                raise CheckpointError(
                    f"training state {path} is damaged (checksum mismatch: a failing disk or an "
                    "incomplete copy); resume from an intact copy or start a new run")
        f.seek(start)
        try:
            # weights_only=False: the state holds the RNG states (numpy arrays, tuples); it is
            # our own file, checked above
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"cannot read training state {path}: {exc}") from exc


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or infinite values."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def save(model: HermesResUNet, path: str | os.PathLike, metadata: dict[str, Any] | None = None):
    """Write ``model`` (weights, config, vocabularies, package version) to ``path`` atomically.

    Raises:
        ValueError: the model has NaN or infinite weights (nothing is written).
        IsADirectoryError: ``path`` is a folder.
    """
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the file to write (e.g. "
                                f"{Path(path) / RUN_MODEL_FILE})")
    model = unwrap(model)
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    broken = non_finite_tensors(state)
    if broken:
        raise ValueError(f"the model has NaN or infinite weights in {first_of(broken, 3)}: "
                         f"{path} not written")
    torch.save(state, buf)
    payload = buf.getvalue()
    header = {
        "format_version": FORMAT_VERSION,
        "hermes_version": __version__,
        **model.describe(),
        "metadata": metadata or {},
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header).encode()
    atomic_write_bytes(path, [MAGIC, struct.pack("<Q", len(head)), head, payload])


def unwrap(model: Any) -> Any:
    """The model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


#: Header fields every checkpoint has; read_header checks them as load does.
_REQUIRED = ("config", "vocab", "payload_bytes", "payload_sha256")


#: The model file of a training run folder (``hermes train`` / ``hermes finetune`` ``--out``).
RUN_MODEL_FILE = "model.hermes"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path``, or the model file of the training run folder ``path``."""
    path = Path(path)
    if path.is_dir() and (path / RUN_MODEL_FILE).is_file():
        return path / RUN_MODEL_FILE
    return path


def training_state_note(path: Path) -> str | None:
    """Why ``path``, given as a model, is a training run's state instead (its first bytes, or
    a ``.ckpt`` beside a run's model file); None when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(STATE_MAGIC))
    except OSError:
        return None
    model = path.parent / RUN_MODEL_FILE
    if head == STATE_MAGIC or (path.suffix == ".ckpt" and model.is_file()):
        if model.is_file():
            return f"{path} is a Hermes training state (for --resume), not a model: use {model}"
        return (f"{path} is a Hermes training state (for --resume), not a model, and its run "
                f"has not written {model} yet: finish the run (hermes train/finetune ... --out "
                f"{path.parent} --resume)")
    return None


def _read(path: Path, with_payload: bool) -> tuple[dict[str, Any], bytes | None]:
    path = checkpoint_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder without {RUN_MODEL_FILE} (a "
                              "finished training run's folder holds one)" if path.is_dir() else
                              f"checkpoint {path} is not a file")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            hint = ""
            note = training_state_note(path)
            if note is not None:
                raise CheckpointError(note)
            if magic[:2] == b"PK" or magic[:1] == b"\x80":
                hint = " (it looks like a plain torch.save file: for official Hermes weights "
                hint += "use hermes.models.from_official)"
            raise CheckpointError(f"{path} is not a Hermes checkpoint{hint}")
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"checkpoint {path} is truncated (header length missing)")
        (head_len,) = struct.unpack("<Q", raw_len)
        if head_len > path.stat().st_size:  # a corrupted length: do not try to allocate it
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated: header length "
                                  f"{head_len} exceeds the file size")
        head = f.read(head_len)
        if len(head) != head_len:
            raise CheckpointError(f"checkpoint {path} is truncated inside its header")
        try:
            header = json.loads(head)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path} has a corrupted header: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"checkpoint {path} has a corrupted header (not an object)")
        version = header.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {version}, this "
                f"hermes ({__version__}) reads up to {FORMAT_VERSION}: upgrade hermes"
            )
        kinds = {"format_version": int, "payload_bytes": int, "payload_sha256": str,
                 "config": dict, "vocab": dict, "metadata": (dict, type(None))}
        wrong = [k for k, kind in kinds.items() if k in header and (
            not isinstance(header[k], kind) or isinstance(header[k], bool))]
        if wrong:
            raise CheckpointError(f"checkpoint {path} has a corrupted header (wrong type of "
                                  f"{', '.join(wrong)})")
        missing = [k for k in _REQUIRED if k not in header]
        if missing:
            raise CheckpointError(f"checkpoint {path} has a corrupted header (no "
                                  f"{', '.join(missing)})")
        payload = None
        if with_payload:
            payload = f.read()
            expected = header["payload_bytes"]
            if len(payload) < expected:
                raise CheckpointError(
                    f"checkpoint {path} is truncated: {len(payload)} of {expected} weight bytes"
                )
            if len(payload) > expected:
                raise CheckpointError(f"checkpoint {path} is corrupted: {len(payload) - expected} "
                                      "unexpected bytes after the weights")
            if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupted: weight checksum mismatch")
    return header, payload


def is_hermes_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a Hermes checkpoint (else, e.g., official ``.pth`` weights);
    False for files that cannot be opened."""
    try:
        with open(checkpoint_path(path), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Config, vocabulary, version and metadata of a checkpoint, without loading weights."""
    return _read(Path(path), with_payload=False)[0]


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> HermesResUNet:
    """Rebuild the model stored at ``path``; its header metadata is ``model.hermes_metadata``.

    Raises:
        CheckpointError: saying what is wrong with the file.
    """
    path = checkpoint_path(path)
    header, payload = _read(path, with_payload=True)
    try:
        config = HermesConfig.from_dict(header["config"])
        vocab = Vocabulary.from_dict(header["vocab"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid architecture: {exc}") from exc
    state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    model = HermesResUNet(config, vocab)
    dtypes = {v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()}
    if len(dtypes) == 1:  # a float64 or half model comes back as saved, not cast to float32
        model = model.to(dtypes.pop())
    load_state_checked(model, state, f"checkpoint {path}")
    model.hermes_metadata = dict(header.get("metadata") or {})
    return model.to(map_location).eval()


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped tensor, and
    refuses non-finite (NaN/inf) weights."""
    broken = non_finite_tensors(state)
    if broken:
        raise CheckpointError(f"{what} has NaN or infinite weights in {first_of(broken, 3)}: "
                              "a diverged training run? It would segment nothing")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{what} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
