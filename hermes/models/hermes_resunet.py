"""Hermes-ResUNet: a residual U-Net whose features exchange information with context priors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hermes.models.config import HermesConfig
from hermes.models.heads import HierarchicalPriorClassifier, ModalityClassifier
from hermes.models.prior_fusion import PriorFusionLayer
from hermes.models.resunet import DownStage, Stem, UpStage
from hermes.models.vocabulary import Vocabulary

MIN_SIZE = 16  # four 2x poolings must leave at least one voxel


def check_spatial_size(size: tuple[int, ...], what: str = "spatial size") -> None:
    """Refuse a D x H x W input (or crop/window) size the network cannot take: four 2x poolings
    must leave at least one voxel per side and two in all (instance norm at the bottleneck)."""
    bottleneck = [s // MIN_SIZE for s in size]
    if min(bottleneck) < 1 or bottleneck[0] * bottleneck[1] * bottleneck[2] < 2:
        raise ValueError(
            f"{what} {tuple(size)} too small: each side needs >= {MIN_SIZE} and one side >= "
            f"{2 * MIN_SIZE} (instance norm needs 2+ voxels at the bottleneck)")


@dataclass(eq=False, repr=False, slots=True)
class HermesOutput:
    """Result of a forward pass; unpacks as ``seg_logits, modality_logits``.

    A dataclass so that ``DistributedDataParallel`` finds its tensors (with
    ``find_unused_parameters``, as for models with decoder branches, it walks the output's
    tensors, lists, dicts and dataclasses; a plain object would hide them and every parameter
    would be marked ready twice).

    Attributes:
        seg_logits: B x T x D x H x W, one logit per requested task (sigmoid for probability).
        modality_logits: B x M, logits over the model's modalities.
        tasks: per sample, the task names of ``seg_logits``' channels (name form only).
        task_mask: B x T bool, False where a sample asked for fewer tasks than the batch's
            widest request (those channels hold the null token's output and mean nothing).
    """

    seg_logits: Tensor
    modality_logits: Tensor
    tasks: list[list[str]] | None = None
    task_mask: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.seg_logits, self.modality_logits))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Tensor:
        return (self.seg_logits, self.modality_logits)[i]

    def __repr__(self) -> str:
        return (
            f"HermesOutput(seg_logits={tuple(self.seg_logits.shape)}, "
            f"modality_logits={tuple(self.modality_logits.shape)})"
        )


def _decoder_stages(config: HermesConfig) -> nn.ModuleList:
    """The four decoder stages: (in, skip) widths and block counts as in the official model."""
    w, nb = config.widths, config.num_blocks
    return nn.ModuleList([
        UpStage(w[4], w[3], nb[2]),
        UpStage(w[3], w[2], nb[1]),
        UpStage(w[2], w[1], nb[0]),
        UpStage(w[1], w[0], 2),
    ])


class DecoderBranch(nn.Module):
    """An extra decoder for tasks added incrementally: decoder stages (``up``), the two decoder
    fusion layers (``fusion``) and a task head, fed by the shared encoder."""

    def __init__(self, config: HermesConfig, fusion) -> None:
        super().__init__()
        self.up = _decoder_stages(config)
        self.fusion = nn.ModuleList(
            fusion(dim, depth) for dim, depth in
            zip(config.fusion_widths[3:], config.fusion_depths[3:], strict=True))
        self.task_head = HierarchicalPriorClassifier(sum(config.fusion_widths),
                                                     config.widths[0])


class HermesResUNet(nn.Module):
    """Universal segmentation model addressed by task and modality names.

    ``model(x, tasks=[["bcv/liver", "bcv/spleen"], ["brain/gm"]], modality=["CT", "T1"])`` or the
    index form ``model(x, task_idx=LongTensor[B, T] (-1 = null), modality_idx=LongTensor[B])``.
    Input ``x`` is B x in_channels x D x H x W (float, each size >= 16 and one >= 32; sizes need
    not be multiples of 16: the decoder resamples to each skip's size as the official model does).
    """

    def __init__(self, config: HermesConfig, vocab: Vocabulary) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        w = config.widths
        nb = config.num_blocks
        n_tasks, n_mods = len(vocab.tasks), len(vocab.modalities)

        def fusion(dim: int, depth: int) -> PriorFusionLayer:
            return PriorFusionLayer(
                dim, n_tasks, n_mods, config.modality_tokens, depth, config.head_dim
            )

        self.stem = Stem(config.in_channels, w[0])
        self.down = nn.ModuleList(DownStage(w[i], w[i + 1], nb[i]) for i in range(4))
        self.up = _decoder_stages(config)
        levels = zip(config.fusion_widths, config.fusion_depths, strict=True)
        self.fusion = nn.ModuleList(fusion(dim, depth) for dim, depth in levels)
        token_dim = sum(config.fusion_widths)
        self.task_head = HierarchicalPriorClassifier(token_dim, w[0])
        self.modality_head = ModalityClassifier(token_dim, n_mods)
        self.branches = nn.ModuleList(
            DecoderBranch(config, fusion) for _ in config.decoder_branches)

    # ------------------------------------------------------------------ name handling
    def encode_tasks(self, tasks: Sequence[str] | Sequence[Sequence[str]], batch: int):
        """Names -> (task_idx B x (T + null_tokens), task_mask B x T, names per sample)."""
        if isinstance(tasks, str):
            raise TypeError("tasks must be a list of names (or one list per sample), not a str")
        per_sample: list[list[str]]
        if len(tasks) == 0:
            raise ValueError("no task requested: give at least one task name per sample")
        if all(isinstance(t, str) for t in tasks):
            per_sample = [list(tasks)] * batch  # type: ignore[arg-type]
        elif all(not isinstance(t, str) and isinstance(t, Sequence)
                 and all(isinstance(n, str) for n in t) for t in tasks):
            per_sample = [list(t) for t in tasks]  # type: ignore[union-attr]
        else:
            raise TypeError("tasks must be a list of task names (all samples) or one list of "
                            f"names per sample, got {tasks!r}")
        if len(per_sample) != batch:
            raise ValueError(f"got task lists for {len(per_sample)} samples, batch has {batch}")
        width = max((len(t) for t in per_sample), default=0)
        if width == 0:
            raise ValueError("no task requested: give at least one task name per sample")
        idx = torch.full((batch, width + self.config.null_tokens), -1, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.bool)
        for i, names in enumerate(per_sample):
            if not names:
                raise ValueError(f"sample {i} requests no task")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"sample {i} requests tasks more than once: {dup}")
            for j, name in enumerate(names):
                idx[i, j] = self.vocab.task_index(name)
            mask[i, : len(names)] = True
        return idx, mask, per_sample

    def encode_modality(self, modality: str | Sequence[str], batch: int) -> Tensor:
        """Modality name(s) -> B long."""
        names = [modality] * batch if isinstance(modality, str) else modality
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise TypeError("modality must be a name or one name per sample (for indices use "
                            f"modality_idx=), got {modality!r}")
        names = list(names)
        if len(names) != batch:
            raise ValueError(f"got {len(names)} modality names for a batch of {batch}")
        return torch.tensor([self.vocab.modality_index(n) for n in names], dtype=torch.long)

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(
                f"input must be 5-D (B x C x D x H x W), got {x.dim()}-D shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels, the model expects {self.config.in_channels}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        check_spatial_size(tuple(x.shape[2:]))
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")

    def _check_indices(self, task_idx: Tensor, modality_idx: Tensor, batch: int):
        task_idx = torch.as_tensor(task_idx, dtype=torch.long)
        modality_idx = torch.as_tensor(modality_idx, dtype=torch.long).reshape(-1)
        if task_idx.dim() != 2 or task_idx.shape[0] != batch:
            raise ValueError(f"task_idx must be B x T with B={batch}, got {tuple(task_idx.shape)}")
        if modality_idx.numel() != batch:
            raise ValueError(f"modality_idx must hold one index per sample ({batch})")
        n_t, n_m = len(self.vocab.tasks), len(self.vocab.modalities)
        if ((task_idx < -1) | (task_idx >= n_t)).any():
            raise ValueError(f"task_idx values must lie in [-1, {n_t - 1}] (-1 = null)")
        if ((modality_idx < -1) | (modality_idx >= n_m)).any():
            raise ValueError(f"modality_idx values must lie in [-1, {n_m - 1}]")
        return task_idx, modality_idx

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        tasks: Sequence[str] | Sequence[Sequence[str]] | None = None,
        modality: str | Sequence[str] | None = None,
        *,
        task_idx: Tensor | None = None,
        modality_idx: Tensor | None = None,
    ) -> HermesOutput:
        self._check_input(x)
        batch = x.shape[0]
        names: list[list[str]] | None = None
        mask: Tensor | None = None
        if tasks is not None or modality is not None:
            if task_idx is not None or modality_idx is not None:
                raise ValueError("give tasks/modality by name or by index, not both")
            if tasks is None or modality is None:
                raise ValueError("the name form needs both tasks= and modality=")
            task_idx, mask, names = self.encode_tasks(tasks, batch)
            modality_idx = self.encode_modality(modality, batch)
            n_out = mask.shape[1]
        else:
            if task_idx is None or modality_idx is None:
                raise ValueError("give tasks= and modality= (names) or task_idx= and modality_idx=")
            task_idx, modality_idx = self._check_indices(task_idx, modality_idx, batch)
            n_out = task_idx.shape[1]
        task_idx = task_idx.to(x.device)
        modality_idx = modality_idx.to(x.device)
        if mask is not None:
            mask = mask.to(x.device)
        if self.branches and self._mixes_decoders(task_idx[:, :n_out]).any():
            seg, mod = self._forward_split(x, task_idx, modality_idx, n_out)
        else:
            seg, mod = self._forward_tokens(x, task_idx, modality_idx, n_out)
        return HermesOutput(seg, mod, names, mask)

    def _mixes_decoders(self, tasks: Tensor) -> Tensor:
        """B bool: the sample's requested tasks (B x T, -1 = null) belong to several decoders."""
        owner = self.decoder_of(tasks)
        real = tasks >= 0
        big = len(self.branches) + 1
        lo = owner.masked_fill(~real, big).amin(dim=1)
        hi = owner.masked_fill(~real, -big).amax(dim=1)
        return real.any(dim=1) & (lo != hi)

    def _forward_split(self, x: Tensor, task_idx: Tensor, modality_idx: Tensor,
                       n_out: int) -> tuple[Tensor, Tensor]:
        """A request mixing decoders: one pass per decoder with only its tasks as tokens
        (compacted per sample, padded with null tokens as a batch is), so every task's output is
        what it would be if requested with its own decoder's tasks alone (old tasks of an
        incrementally extended model: exactly the old model's). Modality logits: the first pass's
        (main decoder first); null channels: 0."""
        head, tail = task_idx[:, :n_out], task_idx[:, n_out:]
        owner = self.decoder_of(head)
        real = head >= 0
        seg: Tensor | None = None
        mod: Tensor | None = None
        for d in sorted(set(owner[real].tolist())):
            keep = (owner == d) & real
            width = int(keep.sum(dim=1).max())
            sub = torch.full((head.shape[0], width), -1, dtype=head.dtype, device=head.device)
            rows = [keep[i].nonzero().flatten() for i in range(head.shape[0])]
            for i, cols in enumerate(rows):
                sub[i, : len(cols)] = head[i, cols]
            seg_d, mod_d = self._forward_tokens(x, torch.cat([sub, tail], dim=1), modality_idx,
                                                width)
            if seg is None:
                seg = seg_d.new_zeros(head.shape[0], n_out, *seg_d.shape[2:])
                mod = mod_d
            for i, cols in enumerate(rows):
                seg[i, cols] = seg_d[i, : len(cols)]
        return seg, mod

    def modality_logits(self, x: Tensor, tasks: Sequence[str], modality: str | Sequence[str]
                        ) -> Tensor:
        """``B x M`` modality logits of ``x`` given the tasks' and modality's priors, as
        :meth:`forward` computes them for tasks of the main decoder, without the
        full-resolution decoding stages (the modality head reads the encoder's and the first
        two decoder stages' tokens): what modality detection needs, in less time."""
        self._check_input(x)
        task_idx, mask, _ = self.encode_tasks(tasks, x.shape[0])
        modality_idx = self.encode_modality(modality, x.shape[0]).to(x.device)
        return self._forward_tokens(x, task_idx.to(x.device), modality_idx, mask.shape[1],
                                    segment=False)[1]

    def _forward_tokens(self, x: Tensor, task_idx: Tensor, modality_idx: Tensor,
                        n_out: int, segment: bool = True) -> tuple[Tensor | None, Tensor]:
        """The network on checked inputs: (seg logits B x n_out x D x H x W, or None without
        ``segment``; modality logits)."""
        n_tok = task_idx.shape[1]
        x1 = self.stem(x)
        x2 = self.down[0](x1)
        x3 = self.down[1](x2)
        x3, p2 = self.fusion[0](x3, task_idx, modality_idx)
        x4 = self.down[2](x3)
        x4, p3 = self.fusion[1](x4, task_idx, modality_idx)
        x5 = self.down[3](x4)
        x5, p4 = self.fusion[2](x5, task_idx, modality_idx)
        skips = (x1, x2, x3, x4, x5)
        # decoders whose tasks are requested (null channels take any computed decoder's output);
        # without branches nothing is inspected (no device synchronisation)
        used: list[bool] = []
        main = True
        if self.branches:
            owner = self.decoder_of(task_idx[:, :n_out])
            real = task_idx[:, :n_out] >= 0
            used = [bool(((owner == k) & real).any()) for k in range(len(self.branches))]
            main = bool(((owner == -1) & real).any()) or not any(used)
        seg, (p5, p6) = self._decode(self.up, self.fusion[3:], self.task_head, skips,
                                     (p2, p3, p4), task_idx, modality_idx, n_out,
                                     segment=main and segment)
        for k, branch in enumerate(self.branches):
            if used[k] and segment:
                seg_k, _ = self._decode(branch.up, branch.fusion, branch.task_head, skips,
                                        (p2, p3, p4), task_idx, modality_idx, n_out)
                seg = seg_k if seg is None else torch.where(
                    (owner == k)[..., None, None, None], seg_k, seg)
        mod = self.modality_head([p[:, n_tok:] for p in (p2, p3, p4, p5, p6)])
        return seg, mod

    def decoder_of(self, task_idx: Tensor) -> Tensor:
        """Which decoder segments each task index: -1 the main one, k branch ``k``."""
        owner = torch.full_like(task_idx, -1)
        for k, first in enumerate(self.config.decoder_branches):
            owner[task_idx >= first] = k
        return owner

    @staticmethod
    def _decode(up, fusion, head, skips, enc_posteriors, task_idx, modality_idx, n_out,
                segment: bool = True) -> tuple[Tensor | None, tuple[Tensor, Tensor]]:
        """One decoder over the encoder's ``skips`` -> (logits B x n_out x D x H x W, or None
        without ``segment``; the two decoder-level posterior tokens)."""
        x1, x2, x3, x4, x5 = skips
        out = up[0](x5, x4)
        out, p5 = fusion[0](out, task_idx, modality_idx)
        out = up[1](out, x3)
        out, p6 = fusion[1](out, task_idx, modality_idx)
        if not segment:  # full-resolution stages skipped: only the tokens are needed
            return None, (p5, p6)
        out = up[2](out, x2)
        out = up[3](out, x1)
        posteriors = (*enc_posteriors, p5, p6)
        return head(out, [p[:, :n_out] for p in posteriors]), (p5, p6)

    # ------------------------------------------------------------------ reporting
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: backbone (convolutions), priors (tables), fusion (attention blocks),
        heads, and total."""

        def count(modules) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        fusion = [*self.fusion, *(f for b in self.branches for f in b.fusion)]
        priors = sum(f.task_priors.numel() + f.modality_priors.numel() for f in fusion)
        counts = {
            "backbone": count([self.stem, self.down, self.up, *(b.up for b in self.branches)]),
            "priors": priors,
            "fusion": count([f.interaction for f in fusion]),
            "heads": count([self.task_head, self.modality_head,
                            *(b.task_head for b in self.branches)]),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def describe(self) -> dict[str, Any]:
        """Architecture config and vocabulary, as stored in checkpoints."""
        return {"config": self.config.to_dict(), "vocab": self.vocab.to_dict()}
