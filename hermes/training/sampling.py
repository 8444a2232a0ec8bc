"""Patch sampling for universal training: weighted datasets, random crops with foreground
oversampling and MONAI augmentation.

Every sample is a pure function of ``(seed, sample index)``: the index fixes the dataset, case,
crop and augmentation through its own random generator. So a resumed run (or any number of
DataLoader workers, or DDP ranks) draws exactly the samples an uninterrupted run would, and no
sampler state needs saving beyond the step counter.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hermes.data.cache import CachedCase, PreprocessedCollection, split_cases

MRI_MODALITIES = {"T1", "T2", "CINE", "MR"}


def _from_pad(d: dict) -> dict:
    """The image relative to its padding value (the affine's zero padding then equals it)."""
    return {**d, "image": d["image"] - d["pad"]}


def _to_pad(d: dict) -> dict:
    return {**d, "image": d["image"] + d["pad"]}


def build_augmentation(crop_size: Sequence[int], mri: bool):
    """MONAI augmentation for an ``{"image": (C, *crop), "label": (T, *crop), "pad": (C, 1, 1,
    1)}`` dict (``pad``: each channel's value outside the volume, the case's minimum).

    Affine (scale +-30 %, rotation +-30 deg) with probability 0.5, the parts rotated in from
    outside the crop filled with ``pad`` as crops hanging over the volume's edge are and as
    inference pads (not with 0, mid-grey of a z-scored image), then intensity transforms
    (scale, shift, gamma, Gaussian blur, Gaussian noise), each with probability 0.2 for MRI and
    0.1 for CT/PET, as the official recipe (MRI gets more colour augmentation).
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    p = 0.2 if mri else 0.1
    rot = np.deg2rad(30.0)
    return Compose([
        _from_pad,
        RandAffined(
            keys=["image", "label"], prob=0.5, rotate_range=(rot, rot, rot),
            scale_range=(0.3, 0.3, 0.3), mode=("bilinear", "nearest"),
            padding_mode="zeros", spatial_size=tuple(crop_size), cache_grid=True,
        ),
        _to_pad,
        RandScaleIntensityd(keys="image", factors=0.3, prob=p),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=p),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=p),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                            sigma_z=(0.5, 1.0), prob=p),
        RandGaussianNoised(keys="image", std=0.1, prob=p),
    ])


def random_crop_start(
    case: CachedCase, crop: Sequence[int], rng: np.random.Generator, fg_prob: float
) -> tuple[list[int], bool]:
    """Start voxel of a crop of ``case``: centred on a random foreground voxel of a random
    present task with probability ``fg_prob``, else uniform (crops may hang over the edge of
    volumes smaller than the crop; the outside is padded)."""
    shape = case.shape
    if rng.random() < fg_prob:
        tasks = [i for i in range(len(case.info.tasks)) if len(case.task_foreground(i))]
        if tasks:
            coords = case.task_foreground(tasks[int(rng.integers(len(tasks)))])
            centre = coords[int(rng.integers(len(coords)))]
            start = []
            for a in range(3):
                lo = min(0, shape[a] - crop[a])
                hi = max(0, shape[a] - crop[a])
                start.append(int(np.clip(centre[a] - crop[a] // 2, lo, hi)))
            return start, True
    start = []
    for a in range(3):
        span = shape[a] - crop[a]
        start.append(int(rng.integers(0, span + 1)) if span >= 0 else span // 2)
    return start, False


class PatchDataset(Dataset):
    """Map-style dataset whose item ``i`` is the i-th training sample of the run.

    Item: ``{"image": C x D x H x W float32, "targets": T_d x D x H x W uint8,
    "task_idx": T_d long (collection task indices), "modality_idx": long, "dataset": str}``,
    plus ``"ignore"``: 1 x D x H x W bool (unannotated voxels, the nnU-Net "ignore" label) for
    datasets that have one.
    """

    def __init__(
        self, collection: PreprocessedCollection, crop_size: Sequence[int], seed: int = 0,
        fg_prob: float = 1 / 3, augment: bool = True, split: str = "train",
        datasets: Sequence[str] | None = None,
    ) -> None:
        self.crop = [int(c) for c in crop_size]
        self.seed = int(seed)
        self.fg_prob = float(fg_prob)
        self.augment = augment
        by_dataset: dict[str, list[CachedCase]] = {}
        for case in split_cases(collection, split, datasets):
            by_dataset.setdefault(case.dataset, []).append(case)
        if not by_dataset:
            raise ValueError(f"the {split!r} split of {collection.cache_dir} holds no case")
        if split == "train":
            _warn_unsampled(collection, split, datasets, by_dataset)
        self.datasets = list(by_dataset)
        self.cases = by_dataset
        w = np.array([collection.sampling_weights.get(d, 1.0) for d in self.datasets], float)
        if (w <= 0).all():
            raise ValueError("every dataset has sampling weight 0")
        self.weights = w / w.sum()
        self._aug: dict[bool, object] = {}

    def __len__(self) -> int:  # indices are generated on demand; any non-negative int is valid
        return 2**62

    def _augmentation(self, mri: bool):
        if mri not in self._aug:
            self._aug[mri] = build_augmentation(self.crop, mri)
        return self._aug[mri]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self.weights))]
        cases = self.cases[dataset]
        case = cases[int(rng.integers(len(cases)))]
        start, _ = random_crop_start(case, self.crop, rng, self.fg_prob)
        image, label = case.crop(start, self.crop)
        targets = case.task_targets(label).astype(np.float32)
        t = targets.shape[0]
        if case.info.ignore_values:  # unannotated voxels travel as one more target channel
            targets = np.concatenate([targets, case.ignore_mask(label)[None]]).astype(np.float32)
        if self.augment:
            aug = self._augmentation(case.modality in MRI_MODALITIES)
            aug.set_random_state(seed=int(rng.integers(2**31)))
            pad = torch.tensor(case.meta.get("image_min") or [0.0] * image.shape[0],
                               dtype=torch.float32).view(-1, 1, 1, 1)
            out = aug({"image": torch.from_numpy(image), "label": torch.from_numpy(targets),
                       "pad": pad})
            image = torch.as_tensor(out["image"]).float().contiguous()
            targets = torch.as_tensor(out["label"]).round().to(torch.uint8)
        else:
            image = torch.from_numpy(image)
            targets = torch.from_numpy(targets).to(torch.uint8)
        item = {
            "image": image,
            "targets": targets[:t],
            "task_idx": torch.tensor(case.info.task_indices, dtype=torch.long),
            "modality_idx": torch.tensor(case.info.modality_index, dtype=torch.long),
            "dataset": dataset,
        }
        if targets.shape[0] > t:
            item["ignore"] = targets[t:].bool()
        return item


def _warn_unsampled(collection: PreprocessedCollection, split: str,
                    datasets: Sequence[str] | None, sampled: dict) -> None:
    """Warn about datasets with no case in ``split`` (e.g. every case declared test): they are
    never sampled, and the tasks only they label are not trained."""
    wanted = list(collection.datasets) if datasets is None else list(datasets)
    idle = [d for d in wanted if d not in sampled]
    if not idle:
        return
    covered = {t for d in sampled for t in collection.datasets[d].tasks}
    untrained = sorted({t for d in idle for t in collection.datasets[d].tasks} - covered)
    warnings.warn(
        f"dataset(s) {', '.join(idle)} have no case in the {split!r} split and are not sampled"
        + (f"; tasks no other dataset labels stay untrained: {', '.join(untrained)}"
           if untrained else ""), stacklevel=3)


def collate_partial(samples: list[dict], null_tokens: int = 1) -> dict:
    """Stack samples whose datasets have different task counts.

    Returns ``image`` B x C x ..., ``targets`` B x T x ... (zeros where padded), ``task_idx``
    B x (T + null_tokens) (-1 = null), ``annotated`` B x T bool, ``modality_idx`` B,
    ``datasets`` list, and ``ignore`` B x 1 x ... bool (unannotated voxels) when a sample has
    one.
    """
    width = max(len(s["task_idx"]) for s in samples)
    b = len(samples)
    spatial = samples[0]["targets"].shape[1:]
    targets = torch.zeros((b, width, *spatial), dtype=torch.uint8)
    task_idx = torch.full((b, width + null_tokens), -1, dtype=torch.long)
    annotated = torch.zeros((b, width), dtype=torch.bool)
    for i, s in enumerate(samples):
        t = len(s["task_idx"])
        targets[i, :t] = s["targets"]
        task_idx[i, :t] = s["task_idx"]
        annotated[i, :t] = True
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "targets": targets,
        "task_idx": task_idx,
        "annotated": annotated,
        "modality_idx": torch.stack([s["modality_idx"] for s in samples]),
        "datasets": [s["dataset"] for s in samples],
    }
    if any("ignore" in s for s in samples):
        ignore = torch.zeros((b, 1, *spatial), dtype=torch.bool)
        for i, s in enumerate(samples):
            if "ignore" in s:
                ignore[i] = s["ignore"]
        batch["ignore"] = ignore
    return batch


class StepSampler(Sampler[int]):
    """Sample indices of one rank from ``start_step`` to ``steps``:
    ``step * batch * world + rank * batch + i``."""

    def __init__(self, start_step: int, steps: int, batch: int, world: int = 1, rank: int = 0):
        self.start, self.steps, self.batch, self.world, self.rank = (
            start_step, steps, batch, world, rank)

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.steps):
            base = step * self.batch * self.world + self.rank * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.batch
