"""Aggregation kernels (hermes.ops.aggregate): native CPU/CUDA against the PyTorch reference,
MONAI's importance map and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from hermes.ops import aggregate as agg
from hermes.ops._extension import extension

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _native_has(device: str) -> bool:
    return hasattr(extension(), f"aggregate_add_{device}")


def test_extension_exports_cpu_kernels():
    assert _native_has("cpu")
    assert hasattr(extension(), "aggregate_finalize_cpu")


@pytest.mark.parametrize(
    "roi,sigma",
    [
        ((16, 16, 16), 0.125), ((7, 12, 5), 0.125), ((9, 10, 11), (0.3, 0.1, 0.5)),
        ((1, 8, 9), 0.2),
        ((3, 3, 3), 0.02), ((40, 12, 12), 0.02),  # products underflowing to 0: clamp at 1e-3
    ],
)  # fmt: skip
def test_gaussian_tables_equal_monai_importance_map(roi, sigma):
    tables = agg.window_tables(roi, "gaussian", sigma)
    ours = agg.weight_map(tables)
    ref = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma, device="cpu")
    assert torch.equal(ours, ref.float())


def test_constant_tables_are_ones():
    tables = agg.window_tables((3, 4, 5), "constant")
    assert torch.equal(agg.weight_map(tables), torch.ones(3, 4, 5))
    ref = compute_importance_map((3, 4, 5), mode="constant", device="cpu")
    assert torch.equal(agg.weight_map(tables), ref.float())


def _random_case(C=3, R=10, H=13, W=11, roi=(5, 6, 4), B=6, seed=0, mode="gaussian"):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(C, R, H, W, generator=g)
    wsum = torch.rand(R, H, W, generator=g) + 0.5
    patches = torch.randn(B, C, *roi, generator=g)
    starts = torch.stack(
        [
            torch.randint(0, 3 * R, (B,), generator=g),  # global z: exercises the ring
            torch.randint(0, H - roi[1] + 1, (B,), generator=g),
            torch.randint(0, W - roi[2] + 1, (B,), generator=g),
        ],
        dim=1,
    )
    tables = agg.window_tables(roi, mode, 0.2)
    return acc, wsum, patches, starts, tables


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_add_native_matches_reference(mode):
    acc, wsum, patches, starts, tables = _random_case(mode=mode)
    acc2, wsum2 = acc.clone(), wsum.clone()
    agg.add_patches(acc, wsum, patches, starts, tables)
    agg.add_patches(acc2, wsum2, patches, starts, tables, use_native=False)
    torch.testing.assert_close(acc, acc2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wsum, wsum2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R", [18, 9])
def test_add_batch_equals_patches_one_by_one(R):
    # A batch of overlapping windows is added plane by plane for several windows at once; every
    # voxel must still sum its contributions in batch order, bit for bit. 11 windows (more than
    # one group); with R = 9 the ring is shallower than a group's planes and groups split.
    g = torch.Generator().manual_seed(3)
    roi = (5, 6, 4)
    starts = torch.stack(
        [
            torch.randint(0, 14, (11,), generator=g).sort().values,
            torch.randint(0, 13 - roi[1] + 1, (11,), generator=g),
            torch.randint(0, 11 - roi[2] + 1, (11,), generator=g),
        ],
        dim=1,
    )
    patches = torch.randn(11, 3, *roi, generator=g)
    tables = agg.window_tables(roi, "gaussian", 0.2)
    acc, wsum = torch.zeros(3, R, 13, 11), torch.zeros(R, 13, 11)
    acc1, wsum1 = acc.clone(), wsum.clone()
    agg.add_patches(acc, wsum, patches, starts, tables)
    for b in range(11):
        agg.add_patches(acc1, wsum1, patches[b : b + 1], starts[b : b + 1], tables)
    assert torch.equal(acc, acc1) and torch.equal(wsum, wsum1)
    acc2, wsum2 = torch.zeros_like(acc), torch.zeros_like(wsum)
    agg.add_patches(acc2, wsum2, patches, starts, tables, use_native=False)
    torch.testing.assert_close(acc, acc2, rtol=1e-6, atol=1e-6)


def test_add_reads_strided_patches_in_place():
    acc, wsum, patches, starts, tables = _random_case(roi=(5, 5, 4))
    acc2, wsum2 = acc.clone(), wsum.clone()
    # a transposed view (y and z swapped), as streaming along the second axis produces, and a
    # view with a non-unit x stride
    view = patches.transpose(2, 3)
    assert not view.is_contiguous()
    agg.add_patches(acc, wsum, view, starts, tables)
    agg.add_patches(acc2, wsum2, view.contiguous(), starts, tables, use_native=False)
    torch.testing.assert_close(acc, acc2, rtol=1e-6, atol=1e-6)
    wide = torch.randn(6, 3, 5, 5, 8)[..., ::2]
    agg.add_patches(acc, wsum, wide, starts, tables)
    agg.add_patches(acc2, wsum2, wide.contiguous(), starts, tables, use_native=False)
    torch.testing.assert_close(acc, acc2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wsum, wsum2, rtol=1e-6, atol=1e-6)


def test_add_hand_computed_constant():
    # Two 1 x 1 x 3 windows overlapping on one column: sums and weights by hand.
    acc = torch.zeros(2, 1, 1, 5)
    wsum = torch.zeros(1, 1, 5)
    patches = torch.tensor([[[1.0, 2.0, 3.0]], [[10.0, 20.0, 30.0]]]).view(1, 2, 1, 1, 3)
    patches = torch.cat([patches, patches * -1])
    tables = agg.window_tables((1, 1, 3), "constant")
    agg.add_patches(acc, wsum, patches, [[0, 0, 0], [0, 0, 2]], tables)
    assert wsum.flatten().tolist() == [1, 1, 2, 1, 1]
    assert acc[0].flatten().tolist() == [1, 2, 3 - 1, -2, -3]
    assert acc[1].flatten().tolist() == [10, 20, 30 - 10, -20, -30]


def test_add_hand_computed_gaussian_weight():
    roi = (3, 3, 3)
    tables = agg.window_tables(roi, "gaussian", 0.5)
    acc = torch.zeros(1, 3, 3, 3)
    wsum = torch.zeros(3, 3, 3)
    agg.add_patches(acc, wsum, torch.full((1, 1, 3, 3, 3), 2.0), [[0, 0, 0]], tables)
    g = [math.exp(-(x**2) / (2 * 1.5**2)) for x in (-1, 0, 1)]
    expected = torch.tensor(
        [[[g[a] * g[b] * g[c] for c in range(3)] for b in range(3)] for a in range(3)]
    )
    torch.testing.assert_close(wsum, expected.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc[0], 2 * expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("axis,n", [(1, 6), (1, 8), (1, 19), (2, 4), (2, 7), (2, 19)])
def test_add_ring_of_rows_or_columns_matches_reference_and_one_by_one(axis, n):
    # Rows (columns) are a ring of n: global coordinates up to 3 n wrap around (n = the window's
    # own size: every window wraps unless it starts at a multiple of n). A batch whose rows
    # (columns) would alias in the ring is split; sums stay in batch order, bit for bit.
    g = torch.Generator().manual_seed(5)
    roi, B = (5, 6, 4), 9
    dims = [7, 13, 11]
    dims[axis] = n
    starts = torch.stack(
        [
            torch.randint(0, 12, (B,), generator=g),
            torch.randint(0, 3 * n if axis == 1 else 13 - roi[1] + 1, (B,), generator=g),
            torch.randint(0, 3 * n if axis == 2 else 11 - roi[2] + 1, (B,), generator=g),
        ],
        dim=1,
    )
    patches = torch.randn(B, 3, *roi, generator=g)
    tables = agg.window_tables(roi, "gaussian", 0.2)
    acc, wsum = torch.randn(3, *dims, generator=g), torch.rand(*dims, generator=g)
    acc1, wsum1, acc2, wsum2 = acc.clone(), wsum.clone(), acc.clone(), wsum.clone()
    kw = dict(ring_axis=axis)
    agg.add_patches(acc, wsum, patches, starts, tables, **kw)
    for b in range(B):
        agg.add_patches(acc1, wsum1, patches[b : b + 1], starts[b : b + 1], tables, **kw)
    assert torch.equal(acc, acc1) and torch.equal(wsum, wsum1)
    agg.add_patches(acc2, wsum2, patches, starts, tables, use_native=False, **kw)
    torch.testing.assert_close(acc, acc2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wsum, wsum2, rtol=1e-6, atol=1e-6)
    # by hand: a window at global 2 n + 1 lands on stored indices 1 .. roi (mod n)
    acc3, wsum3 = torch.zeros(3, *dims), torch.zeros(*dims)
    corner = [0, 0, 0]
    corner[axis] = 2 * n + 1
    agg.add_patches(acc3, wsum3, patches[:1], [corner], tables, **kw)
    idx = [torch.arange(r) for r in roi]
    idx[axis] = (idx[axis] + 1) % n
    expected = patches[0] * agg.weight_map(tables)
    region = acc3[:, idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
    torch.testing.assert_close(region, expected, rtol=1e-6, atol=0)
    assert float(acc3.abs().sum()) == pytest.approx(float(expected.abs().sum()), rel=1e-5)


KINDS = [
    (agg.OUTPUT_FLOAT32, False),
    (agg.OUTPUT_FLOAT32, True),
    (agg.OUTPUT_FLOAT16, False),
    (agg.OUTPUT_FLOAT16, True),
    (agg.OUTPUT_MASK, False),
    (agg.OUTPUT_LABEL_U8, False),
    (agg.OUTPUT_LABEL_U16, False),
]


def _out_for(kind, C, shape):
    channels = 1 if kind in (agg.OUTPUT_LABEL_U8, agg.OUTPUT_LABEL_U16) else C
    return torch.zeros((channels, *shape), dtype=agg._OUTPUT_DTYPES[kind])


@pytest.mark.parametrize("H,rows", [(9, (1, 8)), (37, (3, 35))])  # 37: blocks of 16 rows
@pytest.mark.parametrize("kind,sigmoid", KINDS)
def test_finalize_native_matches_reference(kind, sigmoid, H, rows):
    acc, wsum, _, _, _ = _random_case(C=4, R=6, H=H, W=10)
    acc[1, :, 2, 3] = acc[2, :, 2, 3]  # ties: lowest channel wins
    z0, z1, crop = 7, 11, (rows, (2, 9))  # global planes 7..10 live in ring planes 1..4
    shape = (5, rows[1] - rows[0], 7)
    out_native, out_ref = _out_for(kind, 4, shape), _out_for(kind, 4, shape)
    thr = agg.logit_threshold(0.6)
    acc2, wsum2 = acc.clone(), wsum.clone()
    kw = dict(kind=kind, crop=crop, out_z0=6, sigmoid=sigmoid, threshold=thr, zero_after=True)
    agg.finalize(acc, wsum, (z0, z1), out_native, **kw)
    agg.finalize(acc2, wsum2, (z0, z1), out_ref, use_native=False, **kw)
    if kind == agg.OUTPUT_FLOAT16 and sigmoid:  # sigmoid implementations may differ by an ulp
        torch.testing.assert_close(out_native.float(), out_ref.float(), rtol=0, atol=1e-3)
    elif kind == agg.OUTPUT_FLOAT32 and sigmoid:
        torch.testing.assert_close(out_native, out_ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out_native, out_ref)
    # planes outside [z0, z1) of the ring untouched, planes inside reset (whole planes)
    assert torch.equal(acc, acc2) and torch.equal(wsum, wsum2)
    assert bool((acc[:, 1:5] == 0).all()) and bool((wsum[1:5] == 0).all())
    assert bool((acc[:, 0] != 0).any())


# Rings of rows (axis 1) and columns (axis 2) for finalize: sizes of the accumulator, the global
# span finalised, the crop, the output shape, the stored indices the span's crop part reads and
# those it resets, and stored indices it must leave alone.
#  rows: a ring of 20; global rows 33..51 live at stored 13..19, 0..11 (they wrap); the crop
#    starts at global row 30 and ends inside the span (rows 33..44 written).
#  columns: a ring of 12; global columns 17..26 live at stored 5..11, 0..2; the crop (15, 26)
#    writes columns 17..25, the crop rows (1, 8) of 9.
RING_SPANS = {
    1: dict(size=(20, 10), span=(33, 52), crop=((30, 45), (2, 9)), out=(5, 15, 7),
            read=[*range(13, 20), *range(0, 5)], other=slice(2, 9), at=(3, 15),
            reset=[*range(13, 20), *range(0, 12)], kept=[12]),
    2: dict(size=(9, 12), span=(17, 27), crop=((1, 8), (15, 26)), out=(5, 7, 11),
            read=[*range(5, 12), 0, 1], other=slice(1, 8), at=(2, 11),
            reset=[*range(5, 12), 0, 1, 2], kept=[3, 4]),
}  # fmt: skip


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("kind,sigmoid", KINDS[::2])
def test_finalize_a_ring_of_rows_or_columns_matches_reference(axis, kind, sigmoid):
    case = RING_SPANS[axis]
    acc, wsum, _, _, _ = _random_case(C=4, R=6, H=case["size"][0], W=case["size"][1])
    out_native, out_ref = _out_for(kind, 4, case["out"]), _out_for(kind, 4, case["out"])
    acc2, wsum2, before = acc.clone(), wsum.clone(), acc / wsum
    span = {"rows" if axis == 1 else "cols": case["span"]}
    kw = dict(kind=kind, crop=case["crop"], out_z0=6, sigmoid=sigmoid,
              threshold=agg.logit_threshold(0.6), zero_after=True, **span)  # fmt: skip
    agg.finalize(acc, wsum, (7, 11), out_native, **kw)
    agg.finalize(acc2, wsum2, (7, 11), out_ref, use_native=False, **kw)
    if sigmoid:
        torch.testing.assert_close(out_native.float(), out_ref.float(), rtol=1e-6, atol=1e-3)
    else:
        assert torch.equal(out_native, out_ref)
    a, b = case["at"]
    if kind == agg.OUTPUT_FLOAT32 and not sigmoid:  # by hand: planes 7..10 at stored 1..4
        index = [slice(None), slice(1, 5), case["other"], case["other"]]
        index[1 + axis] = case["read"]
        got = out_native[:, 1:5].narrow(1 + axis, a, b - a)
        assert torch.equal(got, before[tuple(index)])
    assert bool((out_native.narrow(1 + axis, 0, a) == 0).all())
    assert bool((out_native[:, 0] == 0).all())  # plane 6: not finalised
    # the span of planes 7..10 reset (all of the other axis), everything else untouched
    assert torch.equal(acc, acc2) and torch.equal(wsum, wsum2)
    part = acc[:, 1:5]
    assert bool((part.index_select(1 + axis, torch.tensor(case["reset"])) == 0).all())
    assert bool((part.index_select(1 + axis, torch.tensor(case["kept"])) != 0).all())
    assert bool((acc[:, 0] != 0).all()) and bool((wsum[5] != 0).all())


def test_finalize_float16_rounding_matches_torch():
    values = torch.tensor(
        [0.0, -0.0, 1e-8, 3e-8, 6e-8, 1e-5, -6.1e-5, 0.1, 1 / 3, 1.00048828125, 1.0009765625 * 1.5,
         65504.0, 65519.99, 65520.0, 1e6, -1e6, float("inf"), float("-inf"), 2.9802322e-08,
         5.9604645e-08 * 1.5, 5.9604645e-08 * 2.5]
    )  # fmt: skip
    n = values.numel()
    acc = values.view(1, 1, 1, n).clone()
    wsum = torch.ones(1, 1, n)
    out = torch.zeros(1, 1, 1, n, dtype=torch.float16)
    agg.finalize(acc, wsum, (0, 1), out, kind=agg.OUTPUT_FLOAT16)
    assert torch.equal(out.flatten().view(torch.int16), values.half().view(torch.int16))


def test_labels_uint16_for_many_tasks():
    C = 300
    acc = torch.randn(C, 2, 3, 4)
    wsum = torch.ones(2, 3, 4)
    acc[299, 0, 0, 0] = 50.0
    out = torch.zeros(1, 2, 3, 4, dtype=torch.uint16)
    agg.finalize(acc, wsum, (0, 2), out, kind=agg.OUTPUT_LABEL_U16, threshold=0.0)
    ref = torch.where(acc.max(0).values >= 0, acc.argmax(0) + 1, 0)
    assert out.to(torch.int32)[0, 0, 0, 0].item() == 300
    assert torch.equal(out.to(torch.int32)[0], ref.to(torch.int32))
    with pytest.raises(ValueError, match="uint8"):
        agg.finalize(acc, wsum, (0, 2), torch.zeros(1, 2, 3, 4, dtype=torch.uint8),
                     kind=agg.OUTPUT_LABEL_U8)  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
@pytest.mark.parametrize("kind", [agg.OUTPUT_LABEL_U8, agg.OUTPUT_LABEL_U16])
def test_labels_of_nan_logits_are_background_in_any_channel(device, kind):
    """A NaN logit makes its voxel 0 whichever channel it is in (torch.max semantics, as the
    reference), while the other voxels keep their label."""
    C, n = 3, 40
    acc = torch.randn(C, 1, 1, n, generator=torch.Generator().manual_seed(0)) + 2.0
    for x in range(0, n, 4):
        acc[(x // 4) % C, 0, 0, x] = float("nan")
    wsum = torch.ones(1, 1, n)
    ref = torch.zeros(1, 1, 1, n, dtype=agg._OUTPUT_DTYPES[kind])
    agg.finalize(acc, wsum, (0, 1), ref, kind=kind, use_native=False)
    out = torch.zeros_like(ref, device=device)
    agg.finalize(acc.to(device), wsum.to(device), (0, 1), out, kind=kind)
    labels = out.cpu().to(torch.int32).flatten()
    assert torch.equal(labels, ref.to(torch.int32).flatten())
    assert (labels[0::4] == 0).all() and (labels[1::4] > 0).all()


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9, 0.999, 1e-6])
def test_logit_threshold_is_exact(p):
    t = agg.logit_threshold(p)
    exact = math.log(p) - math.log1p(-p)
    below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
    assert t >= exact > below  # smallest float32 at or above the exact logit
    assert 1 / (1 + math.exp(-t)) >= p - 1e-15


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2.0])
def test_logit_threshold_rejects_non_probabilities(bad):
    with pytest.raises(ValueError, match="threshold"):
        agg.logit_threshold(bad)


def test_add_validation_errors():
    acc, wsum, patches, starts, tables = _random_case()
    with pytest.raises(ValueError, match="patches must have shape"):
        agg.add_patches(acc, wsum, patches[:, :2], starts, tables)
    with pytest.raises(ValueError, match="starts must have shape"):
        agg.add_patches(acc, wsum, patches, starts[:, :2], tables)
    with pytest.raises(ValueError, match="extends past"):
        agg.add_patches(acc, wsum, patches[:1], [[0, 12, 0]], tables)
    with pytest.raises(ValueError, match="non-negative"):
        agg.add_patches(acc, wsum, patches[:1], [[-1, 0, 0]], tables)
    with pytest.raises(ValueError, match="contiguous float32"):
        agg.add_patches(acc.double(), wsum, patches, starts, tables)
    with pytest.raises(ValueError, match="wsum"):
        agg.add_patches(acc, wsum[:2], patches, starts, tables)
    small = agg.window_tables((11, 6, 4), "constant")
    with pytest.raises(ValueError, match="spans 11 planes"):
        agg.add_patches(acc, wsum, torch.zeros(1, 3, 11, 6, 4), [[0, 0, 0]], small)
    tall = agg.window_tables((5, 14, 4), "constant")
    with pytest.raises(ValueError, match="spans 14 rows"):
        agg.add_patches(acc, wsum, torch.zeros(1, 3, 5, 14, 4), [[0, 0, 0]], tall, ring_axis=1)
    wide = agg.window_tables((5, 6, 12), "constant")
    with pytest.raises(ValueError, match="spans 12 columns"):
        agg.add_patches(acc, wsum, torch.zeros(1, 3, 5, 6, 12), [[0, 0, 0]], wide, ring_axis=2)
    with pytest.raises(ValueError, match="ring_axis"):
        agg.add_patches(acc, wsum, patches, starts, tables, ring_axis=3)


def test_finalize_validation_errors():
    acc, wsum, *_ = _random_case()
    out = torch.zeros(3, 10, 13, 11)
    with pytest.raises(ValueError, match="z_range"):
        agg.finalize(acc, wsum, (0, 11), out, kind=agg.OUTPUT_FLOAT32)
    with pytest.raises(ValueError, match="out must be"):
        agg.finalize(acc, wsum, (0, 10), out.half(), kind=agg.OUTPUT_FLOAT32)
    with pytest.raises(ValueError, match="crop"):
        agg.finalize(acc, wsum, (0, 10), out, kind=agg.OUTPUT_FLOAT32, crop=((0, 14), (0, 11)))
    with pytest.raises(ValueError, match="do not fit out"):
        agg.finalize(acc, wsum, (0, 10), out, kind=agg.OUTPUT_FLOAT32, out_z0=1)
    with pytest.raises(ValueError, match="unknown output kind"):
        agg.finalize(acc, wsum, (0, 10), out, kind=9)
    with pytest.raises(ValueError, match="rows"):
        agg.finalize(acc, wsum, (0, 10), out, kind=agg.OUTPUT_FLOAT32, rows=(2, 16))


def test_window_tables_validation():
    with pytest.raises(ValueError, match="mode"):
        agg.window_tables((4, 4, 4), "triangle")
    with pytest.raises(ValueError, match="sigma_scale"):
        agg.window_tables((4, 4, 4), "gaussian", 0.0)
    with pytest.raises(ValueError, match="roi_size"):
        agg.window_tables((4, 4), "gaussian")


# CUDA finalize spans per ring axis: planes only (0), a ring of rows (1) or of columns (2)
CUDA_SPANS = {
    0: dict(crop=((1, 12), (2, 11))),
    1: dict(rows=(18, 31), crop=((20, 29), (2, 11))),
    2: dict(cols=(18, 29), crop=((2, 11), (20, 29))),
}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode,axis", [("gaussian", 0), ("constant", 0), ("gaussian", 1),
                                       ("gaussian", 2)])  # fmt: skip
def test_cuda_add_and_finalize_match_reference(mode, axis):
    assert _native_has("cuda"), "extension built without CUDA kernels"
    acc, wsum, patches, starts, tables = _random_case(mode=mode)
    if axis:
        starts[:, axis] += torch.arange(len(starts)) * 5  # past H = 13 (W = 11): they wrap
    acc_c, wsum_c = acc.cuda(), wsum.cuda()
    agg.add_patches(acc_c, wsum_c, patches.cuda(), starts, tables.to("cuda"), ring_axis=axis)
    agg.add_patches(acc, wsum, patches, starts, tables, ring_axis=axis, use_native=False)
    torch.testing.assert_close(acc_c.cpu(), acc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wsum_c.cpu(), wsum, rtol=1e-6, atol=1e-6)
    (y0, y1), (x0, x1) = CUDA_SPANS[axis]["crop"]
    shape = (4, y1 - y0, x1 - x0)
    for kind, sigmoid in KINDS:
        a1, w1, a2, w2 = acc_c.clone(), wsum_c.clone(), acc_c.cpu(), wsum_c.cpu()
        o1, o2 = _out_for(kind, 3, shape).cuda(), _out_for(kind, 3, shape)
        kw = dict(kind=kind, out_z0=12, sigmoid=sigmoid, threshold=agg.logit_threshold(0.5),
                  zero_after=True, **CUDA_SPANS[axis])  # fmt: skip
        agg.finalize(a1, w1, (12, 16), o1, **kw)
        agg.finalize(a2, w2, (12, 16), o2, use_native=False, **kw)
        torch.cuda.synchronize()
        if sigmoid:
            torch.testing.assert_close(o1.cpu().float(), o2.float(), rtol=0, atol=1e-3)
        else:
            assert torch.equal(o1.cpu(), o2)
        assert torch.equal(a1.cpu(), a2) and torch.equal(w1.cpu(), w2)


@pytest.mark.cuda
@cuda
def test_cuda_add_is_deterministic():
    assert _native_has("cuda"), "extension built without CUDA kernels"
    acc, wsum, patches, starts, tables = _random_case(B=12)
    results = []
    for _ in range(2):
        a, w = acc.cuda(), wsum.cuda()
        agg.add_patches(a, w, patches.cuda(), starts, tables.to("cuda"))
        results.append(a.cpu())
    assert torch.equal(results[0], results[1])
