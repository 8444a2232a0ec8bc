"""Import weights saved by the official Hermes implementation (Hermes-R checkpoints).

The official ``state_dict`` layout (``inc``, ``down1..4``, ``prior_init_fuse_2..4``,
``prior_fuse_5..6``, ``up1..4``, ``out``, ``mod_out``) is translated to ours; the architecture
hyper-parameters are inferred from tensor shapes, so any official width/depth loads. The model then
reproduces the official forward pass exactly in the index form
``model(x, task_idx=..., modality_idx=...)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hermes.models.checkpoint import (
    CheckpointError,
    is_hermes_checkpoint,
    load,
    load_state_checked,
    training_state_note,
)
from hermes.models.config import HermesConfig
from hermes.models.hermes_resunet import HermesResUNet
from hermes.models.vocabulary import Vocabulary, official_vocabulary

_FUSION = {"prior_init_fuse_2": 0, "prior_init_fuse_3": 1, "prior_init_fuse_4": 2,
           "prior_fuse_5": 3, "prior_fuse_6": 4}
_BLOCK_PARTS = {
    "prior_aggregate_block.norm1": "prior_attn_norm_q",
    "prior_aggregate_block.norm2": "prior_attn_norm_kv",
    "prior_aggregate_block.fn.to_q": "prior_attn.q",
    "prior_aggregate_block.fn.to_kv": "prior_attn.kv",
    "prior_aggregate_block.fn.to_out": "prior_attn.out",
    "prior_ffn.norm": "prior_mlp_norm",
    "prior_ffn.fn.fc1": "prior_mlp.fc1",
    "prior_ffn.fn.fc2": "prior_mlp.fc2",
    "feat_aggregate_block.norm1": "feat_attn_norm_q",
    "feat_aggregate_block.norm2": "feat_attn_norm_kv",
    "feat_aggregate_block.fn.to_q": "feat_attn.q",
    "feat_aggregate_block.fn.to_kv": "feat_attn.kv",
    "feat_aggregate_block.fn.to_out": "feat_attn.out",
    "feat_ffn.norm": "feat_mlp_norm",
    "feat_ffn.fn.fc1": "feat_mlp.fc1",
    "feat_ffn.fn.fc2": "feat_mlp.fc2",
}
_HEADS = {
    "out.norm": "task_head.norm",
    "out.classifier_pred.0.fc1": "task_head.fc1",
    "out.classifier_pred.0.fc2": "task_head.fc2",
    "out.classifier_pred.1.fc1": "task_head.fc3",
    "out.classifier_pred.1.fc2": "task_head.fc4",
    "mod_out.norm": "modality_head.norm",
    "mod_out.classifier.fc1": "modality_head.fc1",
    "mod_out.classifier.fc2": "modality_head.fc2",
}


def _translate(key: str) -> str | None:
    """Our parameter name for official ``key``, or None when the key is not recognised."""
    if key.startswith("inc.conv1."):
        return "stem.conv." + key[len("inc.conv1."):]
    if key.startswith("inc.conv2."):
        return "stem.block." + key[len("inc.conv2."):]
    m = re.match(r"down([1-4])\.conv\.(\d+)\.(.+)$", key)
    if m:  # index 0 of the official Sequential is the max-pool
        return f"down.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{m[3]}"
    m = re.match(r"up([1-4])\.conv\.(\d+)\.(.+)$", key)
    if m:
        return f"up.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"
    m = re.match(r"(prior_init_fuse_[234]|prior_fuse_[56])\.(.+)$", key)
    if m:
        level, rest = _FUSION[m[1]], m[2]
        if rest == "task_prior":
            return f"fusion.{level}.task_priors"
        if rest == "modality_prior":
            return f"fusion.{level}.modality_priors"
        b = re.match(r"attn_layers\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if b and b[2] in _BLOCK_PARTS:
            return f"fusion.{level}.interaction.blocks.{b[1]}.{_BLOCK_PARTS[b[2]]}.{b[3]}"
        return None
    m = re.match(r"(.+)\.(weight|bias)$", key)
    if m and m[1] in _HEADS:
        return f"{_HEADS[m[1]]}.{m[2]}"
    return None


def _unwrap(obj, use_ema: bool) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        order = ("ema_model_state_dict", "model_state_dict") if use_ema else (
            "model_state_dict", "ema_model_state_dict")
        for key in (*order, "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], use_ema)
        state = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                continue
            stripped = None
            while stripped != k:  # wrapper prefixes in any order (DDP, torch.compile)
                stripped = k
                for prefix in ("module.", "_orig_mod."):
                    k = k.removeprefix(prefix)
            state[k] = v
        if state:
            return state
    raise CheckpointError("no official Hermes state_dict found (expected a dict of tensors)")


def infer_config(state: Mapping[str, torch.Tensor]) -> tuple[HermesConfig, int, int]:
    """Architecture of an official state dict: (config, number of task rows, modalities)."""
    try:
        stem = state["inc.conv1.weight"]
        base, in_ch = int(stem.shape[0]), int(stem.shape[1])
        widths = [base] + [int(state[f"down{i}.conv.1.conv1.conv.weight"].shape[0])
                           for i in range(1, 5)]
        blocks = []
        for i in range(1, 5):
            idx = {int(m[1]) for k in state if (m := re.match(rf"down{i}\.conv\.(\d+)\.", k))}
            if not idx:
                raise KeyError(f"down{i}.conv.*")
            blocks.append(max(idx))
        depths = []
        for name in _FUSION:
            idx = {int(m[1]) for k in state
                   if (m := re.match(rf"{name}\.attn_layers\.(\d+)\.", k))}
            if not idx:
                raise KeyError(f"{name}.attn_layers.*")
            depths.append(max(idx) + 1)
        task_rows = int(state["prior_init_fuse_2.task_prior"].shape[0])
        mod_shape = state["prior_init_fuse_2.modality_prior"].shape
    except KeyError as exc:
        raise CheckpointError(
            f"not an official Hermes-ResUNet state_dict ({exc.args[0]!r} missing)"
        ) from exc
    if any(w % base for w in widths):
        raise CheckpointError(f"stage widths {widths} are not multiples of the stem width {base}")
    config = HermesConfig(
        in_channels=in_ch, base_width=base, width_multipliers=tuple(w // base for w in widths),
        num_blocks=tuple(blocks), fusion_depths=tuple(depths),
        modality_tokens=int(mod_shape[1]), head_dim=32, null_tokens=1, preset=None,
    )
    return config, task_rows - 1, int(mod_shape[0])


def load_model_file(path: str | os.PathLike) -> HermesResUNet:
    """The model in ``path``, a ``.hermes`` checkpoint (or a training run's folder holding one)
    or official Hermes-R ``.pth`` weights (told apart by content; the latter's
    ``hermes_metadata`` is ``{"source": "official"}``)."""
    if is_hermes_checkpoint(path) or Path(path).is_dir():  # a folder: load names what it lacks
        return load(path)  # sets hermes_metadata
    model = from_official(path)
    model.hermes_metadata = {"source": "official"}
    return model


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``path`` cannot be read as official weights, for a user who may have passed a run's
    training state, a failed download or another file."""
    if path.is_dir():
        return f"{path} is a folder, not a checkpoint file"
    note = training_state_note(path)
    if note is not None:
        return note
    with open(path, "rb") as f:
        head = f.read(2)
    if not head.startswith((b"PK", b"\x80")):  # a zip (torch.save) or a legacy pickle
        what = "an empty file" if not head else "no Hermes model (.hermes) and no PyTorch file"
        return f"{path} is {what} (official Hermes weights are a .pth saved by torch.save)"
    if "Weights only load failed" in str(exc):
        return (f"cannot read {path} as official Hermes weights: it holds Python objects besides "
                "tensors, which are not loaded (torch.load weights_only=True)")
    first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"cannot read official checkpoint {path}: {first[0] if first else type(exc).__name__}"


def from_official(
    source: str | os.PathLike | Mapping,
    tasks: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    use_ema: bool = True,
) -> HermesResUNet:
    """Build our model from official Hermes weights.

    Args:
        source: path of an official ``.pth`` (a training checkpoint with
            ``model_state_dict``/``ema_model_state_dict`` or a bare state dict), or the dict itself.
        tasks / modalities: names for the prior rows. Default: the official 71-task / 6-row
            tables when the shapes match them (72 task rows, 6 modalities), else ``task_<i>`` /
            ``modality_<j>``.
        use_ema: prefer the EMA weights (used by the official evaluation) when both are present.
    Returns:
        The model in eval mode, on CPU.
    """
    if isinstance(source, Mapping):
        obj = source
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"official checkpoint {path} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for broken files
            raise CheckpointError(_unreadable(path, exc)) from exc
    state = _unwrap(obj, use_ema)
    config, n_tasks, n_mods = infer_config(state)
    if tasks is None and modalities is None and (n_tasks, n_mods) == (72, 6):
        vocab = official_vocabulary()
    else:
        vocab = Vocabulary(
            tasks if tasks is not None else [f"task_{i}" for i in range(n_tasks)],
            modalities if modalities is not None
            else [f"modality_{j}" for j in range(n_mods)],
        )
    if len(vocab.tasks) != n_tasks or len(vocab.modalities) != n_mods:
        raise CheckpointError(
            f"the weights hold {n_tasks} task rows and {n_mods} modalities, but "
            f"{len(vocab.tasks)} task and {len(vocab.modalities)} modality names were given"
        )
    converted = {}
    unknown = []
    for key, value in state.items():
        new = _translate(key)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise CheckpointError(f"unrecognised official keys: {unknown[:5]}")
    model = HermesResUNet(config, vocab)
    load_state_checked(model, converted, "official state_dict")
    return model.eval()
