"""Shared helpers of the segment tests: a world-space phantom and an oracle model.

The phantom is defined in world (RAS mm) coordinates, so the same anatomy can be sampled on any
voxel grid (flipped, permuted, oblique, anisotropic); the ground truth moves with the grid by
construction. The oracle model is a HermesResUNet whose forward returns logits computed
voxel-wise from the intensities it is given (thresholds on raw intensities, normalisation off),
so a correct pipeline reproduces the phantom's structures on the original grid.
"""

from __future__ import annotations

import numpy as np
import torch

import hermes.models as hm
from hermes.models.hermes_resunet import HermesOutput, HermesResUNet

# (centre RAS mm, semi-axes mm, intensity, structure); "body" contains everything else
BODY = ((0.0, 0.0, 0.0), (40.0, 34.0, 30.0), 50.0)
BLOBS = {
    "left_blob": ((16.0, -8.0, 6.0), (9.0, 7.0, 11.0), 150.0),
    "right_blob": ((-14.0, 10.0, -9.0), (8.0, 10.0, 6.0), -100.0),
}
SMALL_BLOB = ((-22.0, -18.0, 14.0), (2.5, 2.5, 2.5), -100.0)  # stray bit of "right_blob"
TASKS = ["left_blob", "right_blob", "liver"]
MODALITIES = ["CT", "T1"]


def _inside(world: np.ndarray, centre, axes) -> np.ndarray:
    d = (world - np.asarray(centre)) / np.asarray(axes)
    return (d ** 2).sum(-1) <= 1.0


def phantom(affine: np.ndarray, shape, small_blob: bool = False):
    """``(image (X, Y, Z) float32, {structure: bool mask})`` sampled on the grid."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    img = np.zeros(tuple(shape), np.float32)
    img[_inside(world, BODY[0], BODY[1])] = BODY[2]
    masks = {}
    for name, (c, a, v) in BLOBS.items():
        m = _inside(world, c, a)
        img[m] = v
        masks[name] = m
    if small_blob:
        m = _inside(world, SMALL_BLOB[0], SMALL_BLOB[1])
        img[m] = SMALL_BLOB[2]
        masks["small"] = m
    return img, masks


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def grid(linear: np.ndarray, shape) -> np.ndarray:
    """Affine with the given 3x3 ``linear`` part whose grid is centred on the world origin."""
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return aff


class OracleNet(HermesResUNet):
    """Voxel-wise oracle: left_blob = intensity > 100, right_blob = intensity < -50,
    liver = never; the modality head always answers ``answer`` with probability ~0.9."""

    answer = "T1"

    def forward(self, x, tasks=None, modality=None, **kwargs):  # type: ignore[override]
        v = x[:, 0]
        rules = {
            "left_blob": lambda v: (v - 100.0) / 10.0,
            "right_blob": lambda v: (-50.0 - v) / 10.0,
            "liver": lambda v: torch.full_like(v, -10.0),
        }
        seg = torch.stack([rules[t](v) for t in tasks], 1)
        n = len(self.vocab.modalities)
        mod = torch.zeros((x.shape[0], n))
        mod[:, self.vocab.modality_index(self.answer)] = float(np.log(9.0 * (n - 1)))  # p = 0.9
        return HermesOutput(seg, mod, None, None)

    def modality_logits(self, x, tasks, modality):  # type: ignore[override]
        return self.forward(x, tasks=tasks, modality=modality).modality_logits


def oracle_model(spacing=(1.5, 1.5, 1.5), answer: str = "T1") -> OracleNet:
    net = hm.build("tiny", tasks=TASKS, modalities=MODALITIES,
                   groups={"blobs": {"tasks": ["left_blob", "right_blob"], "modality": "T1"},
                           "abdomen": {"tasks": ["liver"], "modality": "CT"}})
    net.__class__ = OracleNet
    net.answer = answer
    net.hermes_metadata = {
        "preprocess": {"spacing": list(spacing),
                       "normalization": {m: {"kind": "none"} for m in MODALITIES}},
        "train_config": {"crop_size": [32, 32, 32]},
    }
    return net.eval()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


#: (linear part, model spacing) of original grids whose masks are mapped back: no resampling,
#: flipped and anisotropic, permuted axes, oblique and upsampled
BACK_MAPPING_GRIDS = [
    (np.diag([2.0, 2.0, 2.0]), 2.0),
    (np.diag([-1.5, 2.0, -3.0]), 2.5),
    (np.array([[0, 0, 2.0], [-1.6, 0, 0], [0, 2.4, 0]]), (1.7, 2.9, 2.2)),
    (rotation(1, 18) @ np.diag([1.5, 1.5, -1.5]), 1.1),
]


def back_mapper(linear: np.ndarray, spacing) -> tuple:
    """``(model-grid shape, BackMapper)`` of a 37 x 30 x 23 image on ``grid(linear)`` (a zero
    border, cropped) preprocessed at ``spacing`` mm."""
    from hermes.data.preprocess import PreprocessParams, prepare_arrays
    from hermes.inference.geometry import BackMapper

    rng = np.random.default_rng(0)
    shape = (37, 30, 23)
    img = np.zeros(shape, np.float32)
    img[3:-2, 2:-4, 1:-1] = rng.random((32, 24, 21)) + 1
    params = PreprocessParams(spacing, 1, "float32", 0, True, {"T1": {"kind": "none"}})
    model, _, geom = prepare_arrays(img[None], grid(linear, shape), "T1", params)
    return model.shape[1:], BackMapper(geom)
