"""SparseProbabilities: per-task probabilities kept near their hits; the masks mapped back from
them equal those of the whole probability volumes, to the voxel."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from hermes.inference.geometry import THRESHOLD_MARGIN
from hermes.inference.masks import TaskMasks
from hermes.inference.sparse_probs import SparseProbabilities

sys.path.insert(0, str(Path(__file__).parent))
from segment_helpers import BACK_MAPPING_GRIDS, back_mapper  # noqa: E402


def _probabilities(shape, seed: int) -> np.ndarray:
    """``T x shape`` float32: smooth blobs of several sizes, values one float32 step around
    0.5, a task with no hit, a task above the threshold everywhere, hits on the faces (and
    NaN voxels)."""
    g = np.random.default_rng(seed)
    tasks = []
    for offset in (-5.0, -3.0, -1.0):  # small to large structures
        field = ndimage.gaussian_filter(g.standard_normal(shape), 2.0)
        tasks.append(1 / (1 + np.exp(-(field / field.std() * 3 + offset))))
    near = np.full(shape, 0.2)
    spots = g.random(shape) < 0.01
    near[spots] = np.float32(0.5) + g.choice([-1, 0, 1], spots.sum()) * np.float32(6e-8)
    faces = np.zeros(shape)
    faces[0, :2, -1] = faces[-1, -1, 0] = 0.9
    faces[1, 1, -1] = faces[5, 5, 5] = np.nan  # a NaN beside a hit and one alone: no hits
    tasks += [near, faces, np.zeros(shape), np.full(shape, 0.7)]
    return np.stack(tasks).astype(np.float32)


def _stream(probs: np.ndarray, axis: int, threshold: float) -> SparseProbabilities:
    """Feeds ``probs`` plane by plane along ``axis`` as a streamed sliding window does: each
    plane in a buffer that the call after next overwrites."""
    store = SparseProbabilities(probs.shape[0], probs.shape[1:], threshold)
    t = torch.from_numpy(probs)
    buffers = [torch.empty_like(t.narrow(1 + axis, 0, 1)) for _ in range(2)]
    for i in range(probs.shape[1 + axis]):
        buf = buffers[i % 2]
        buf.copy_(t.narrow(1 + axis, i, 1))
        store.add(axis, i, buf)
    store.finish()
    return store


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 1e-7])
def test_values_are_exact_within_one_voxel_of_every_hit(axis, threshold):
    probs = _probabilities((23, 19, 17), seed=axis)
    store = _stream(probs, axis, threshold)
    cube = np.ones((3, 3, 3), bool)
    stored = 0
    for t, p in enumerate(probs):
        hits = p >= threshold - THRESHOLD_MARGIN
        need = ndimage.binary_dilation(hits, cube)
        got = store.task(t)
        np.testing.assert_array_equal(got[need], p[need], err_msg=f"task {t}")
        # elsewhere: 0, or the exact value where a box holds it; never a hit
        other = ~need
        assert np.all((got[other] == 0) | (got[other] == p[other]) | np.isnan(p[other]))
        assert not np.any(got[other] >= threshold - THRESHOLD_MARGIN)
        stored += sum(piece.size for *_, piece in store._pieces[t])
    assert store.nbytes == 4 * stored
    if threshold == 0.5:  # the small structures and the empty task keep little
        assert store.nbytes < 0.75 * probs.nbytes
    assert store.task(5).max() == 0  # no hit: nothing stored


@pytest.mark.parametrize("linear, spacing", BACK_MAPPING_GRIDS)
def test_masks_from_sparse_probabilities_equal_the_whole_mapping(linear, spacing):
    model_shape, back = back_mapper(linear, spacing)
    probs = _probabilities(model_shape, seed=3)
    for axis, threshold in ((0, 0.5), (1, 0.3), (2, 0.5)):
        store = _stream(probs, axis, threshold)
        for t, p in enumerate(probs):
            want = back(p, order=1) >= threshold
            box, crop = back.threshold_box(store.task(t), threshold)
            masks = TaskMasks(back.orig_shape)
            masks.append(None if crop is None else crop.copy(), box)
            np.testing.assert_array_equal(masks[0], want, err_msg=f"{axis} {t}")


def test_planes_out_of_order_or_of_another_shape_are_refused():
    store = SparseProbabilities(2, (4, 5, 6), 0.5)
    with pytest.raises(ValueError, match="in order"):
        store.add(0, 1, torch.zeros(2, 1, 5, 6))
    with pytest.raises(ValueError, match=r"float32 \(2, 1, 5, 6\)"):
        store.add(0, 0, torch.zeros(2, 1, 5, 7))
    store.add(1, 0, torch.zeros(2, 4, 1, 6))
    with pytest.raises(ValueError, match="in order"):
        store.add(0, 1, torch.zeros(2, 1, 5, 6))  # another axis
    with pytest.raises(RuntimeError, match="finish"):
        store.task(0)
    with pytest.raises(ValueError, match="1 planes were added, the volume has 5"):
        store.finish()


def test_threshold_and_task_index_are_checked():
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold must be a probability in"):
            SparseProbabilities(2, (4, 5, 6), bad)
    store = _stream(np.zeros((2, 4, 5, 6), np.float32), 0, 0.5)
    for bad in (-1, 2):
        with pytest.raises(IndexError, match=f"task {bad} of 2"):
            store.task(bad)
