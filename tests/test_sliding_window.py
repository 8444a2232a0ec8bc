"""hermes.inference.sliding_window_inference and PatchAggregator, with MONAI as the oracle."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference as monai_swi

from hermes.inference import PatchAggregator, clear_workspace, sliding_window_inference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ConvPredictor:
    """A fixed random convolution: its output near window borders depends on the window, so
    overlapping windows disagree and the blending is really tested."""

    def __init__(self, c_in: int, c_out: int, ndim: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(c_out, c_in, *([3] * ndim), generator=g) * 0.3
        self.bias = torch.randn(c_out, generator=g)
        self.conv = F.conv3d if ndim == 3 else F.conv2d
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        return self.conv(x, w, b, padding=1)


def _inputs(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


MONAI_CASES = [
    # shape, roi, sw_batch_size, overlap, mode, padding_mode
    ((1, 1, 24, 23, 21), (12, 12, 12), 1, 0.5, "gaussian", "constant"),
    ((1, 2, 24, 23, 21), (12, 10, 8), 3, 0.25, "constant", "constant"),
    ((2, 1, 19, 17, 23), (8, 8, 8), 4, 0.7, "gaussian", "constant"),
    ((1, 1, 17, 15, 13), (9, 9, 9), 2, 0.0, "gaussian", "constant"),
    ((1, 1, 18, 20, 22), (8, 16, 10), 5, (0.5, 0.3, 0.1), "gaussian", "constant"),
    ((1, 1, 7, 20, 9), (12, 12, 12), 2, 0.5, "gaussian", "reflect"),  # smaller than the roi
    ((1, 1, 10, 20, 5), (12, 12, 8), 1, 0.5, "constant", "replicate"),
    ((2, 1, 6, 9, 20), (8, 12, 8), 3, 0.5, "gaussian", "circular"),
    ((1, 1, 20, 20, 20), (20, 20, 20), 1, 0.5, "gaussian", "constant"),  # one window
    ((1, 1, 20, 18, 16), (-1, 10, 0), 2, 0.5, "gaussian", "constant"),  # non-positive roi
]


@pytest.mark.parametrize("shape,roi,bs,overlap,mode,padding", MONAI_CASES)
def test_float_output_equals_monai(shape, roi, bs, overlap, mode, padding):
    x = _inputs(shape)
    predictor = ConvPredictor(shape[1], 3)
    kw = dict(overlap=overlap, mode=mode, padding_mode=padding)
    if padding == "constant":
        kw["cval"] = 0.7
    ref = monai_swi(x, roi, bs, predictor, **kw)
    ours = sliding_window_inference(x, roi, bs, predictor, **kw)
    _close(ours, ref)
    streamed = sliding_window_inference(x, roi, bs, predictor, streaming=True, **kw)
    assert torch.equal(streamed, ours)


@pytest.mark.parametrize("sigma_scale", [0.25, (0.1, 0.2, 0.3)])
def test_sigma_scale_equals_monai(sigma_scale):
    x = _inputs((1, 1, 20, 21, 22))
    predictor = ConvPredictor(1, 2)
    kw = dict(overlap=0.5, mode="gaussian", sigma_scale=sigma_scale)
    ref = monai_swi(x, 12, 2, predictor, **kw)
    _close(sliding_window_inference(x, 12, 2, predictor, **kw), ref)


@pytest.mark.parametrize("streaming", [False, True])
def test_2d_inputs_equal_monai(streaming):
    x = _inputs((2, 2, 37, 29))
    predictor = ConvPredictor(2, 4, ndim=2)
    kw = dict(overlap=0.5, mode="gaussian")
    ref = monai_swi(x, (16, 12), 3, predictor, **kw)
    _close(sliding_window_inference(x, (16, 12), 3, predictor, streaming=streaming, **kw), ref)
    masks = sliding_window_inference(x, (16, 12), 3, predictor, output="masks", **kw)
    assert masks.shape == ref.shape and torch.equal(masks, torch.sigmoid(ref.double()) >= 0.5)


def test_default_arguments_equal_monai():
    x = _inputs((1, 1, 20, 24, 28))
    predictor = ConvPredictor(1, 2)
    _close(sliding_window_inference(x, 10, 1, predictor), monai_swi(x, 10, 1, predictor))


def _reference_outputs(ref: torch.Tensor, threshold: float):
    prob64 = torch.sigmoid(ref.double())
    best, arg = ref.max(dim=1, keepdim=True)
    labels = torch.where(torch.sigmoid(best.double()) >= threshold, arg + 1, 0)
    return prob64, labels


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_reduced_outputs_equal_reference_from_float_result(streaming, threshold):
    x = _inputs((2, 1, 22, 19, 17))
    predictor = ConvPredictor(1, 5)
    kw = dict(overlap=0.5, mode="gaussian", streaming=streaming)
    ref = sliding_window_inference(x, (10, 12, 8), 2, predictor, overlap=0.5, mode="gaussian")
    prob64, labels = _reference_outputs(ref, threshold)

    probs = sliding_window_inference(x, (10, 12, 8), 2, predictor, output="probs", **kw)
    assert probs.dtype == torch.float16 and probs.shape == ref.shape
    torch.testing.assert_close(probs.float(), prob64.float(), rtol=0, atol=1e-3)
    probs32 = sliding_window_inference(
        x, (10, 12, 8), 2, predictor, output="probs", output_dtype=torch.float32, **kw
    )
    torch.testing.assert_close(probs32, torch.sigmoid(ref), rtol=1e-6, atol=1e-7)
    logits16 = sliding_window_inference(
        x, (10, 12, 8), 2, predictor, output_dtype=torch.float16, **kw
    )
    assert torch.equal(logits16, ref.half())

    masks = sliding_window_inference(x, (10, 12, 8), 2, predictor, output="masks",
                                     threshold=threshold, **kw)  # fmt: skip
    assert masks.dtype == torch.bool and torch.equal(masks, prob64 >= threshold)
    lab = sliding_window_inference(x, (10, 12, 8), 2, predictor, output="labels",
                                   threshold=threshold, **kw)  # fmt: skip
    assert lab.dtype == torch.uint8 and lab.shape == (2, 1, 22, 19, 17)
    assert torch.equal(lab.long(), labels)
    assert 0 < int((lab == 0).sum()) < lab.numel()  # the threshold matters in this case


@pytest.mark.parametrize("output", ["logits", "probs", "masks", "labels"])
def test_streaming_equals_non_streaming_exactly(output):
    x = _inputs((1, 1, 41, 13, 15))
    predictor = ConvPredictor(1, 3)
    kw = dict(overlap=0.6, mode="gaussian", output=output, padding_mode="replicate")
    a = sliding_window_inference(x, (9, 16, 15), 4, predictor, **kw)
    b = sliding_window_inference(x, (9, 16, 15), 4, predictor, streaming=True, **kw)
    assert torch.equal(a, b)


def test_labels_uint16_with_many_tasks():
    x = _inputs((1, 1, 6, 7, 8))
    predictor = ConvPredictor(1, 300)
    ref = sliding_window_inference(x, 4, 2, predictor, overlap=0.5)
    lab = sliding_window_inference(x, 4, 2, predictor, overlap=0.5, output="labels")
    assert lab.dtype == torch.uint16
    assert torch.equal(lab.long(), _reference_outputs(ref, 0.5)[1])


def test_predictor_output_structures():
    x = _inputs((2, 1, 16, 16, 16))
    conv = ConvPredictor(1, 2)
    ref = monai_swi(x, 8, 2, conv, overlap=0.5)
    for wrap in (
        lambda t: [t],
        lambda t: SimpleNamespace(seg_logits=t, other=None),  # the Hermes model's output
        lambda t: {"seg_logits": t},
    ):
        ours = sliding_window_inference(x, 8, 2, lambda w, f=wrap: f(conv(w)), overlap=0.5)
        _close(ours, ref)
    # several outputs come back aggregated each, in the predictor's structure, as in MONAI
    for wrap in (lambda t: (t, t[:, :1] * 2), lambda t: {"b": t[:, :1] * 2, "a": t}):
        def predictor(w, f=wrap):
            return f(conv(w))

        ours = sliding_window_inference(x, 8, 2, predictor, overlap=0.5, mode="gaussian")
        ref = monai_swi(x, 8, 2, predictor, overlap=0.5, mode="gaussian")
        assert type(ours) is type(ref)
        for key in (ref.keys() if isinstance(ref, dict) else range(len(ref))):
            _close(ours[key], ref[key])
        masks = sliding_window_inference(x, 8, 2, predictor, overlap=0.5, output="masks",
                                         tta=True)
        assert type(masks) is type(ref) and all(
            masks[key].dtype == torch.bool
            for key in (ref.keys() if isinstance(ref, dict) else range(len(ref))))
    with pytest.raises(TypeError, match="predictor must return"):
        sliding_window_inference(x, 8, 2, lambda w: "nope")
    # a tuple whose other elements are no windows (deep supervision at half resolution, None):
    # its first element, with a warning
    plain = monai_swi(x, 8, 2, conv, overlap=0.5)
    for extra in (lambda t: t[:, :, ::2, ::2, ::2], lambda t: None):
        with pytest.warns(UserWarning, match="only its first element"):
            ours = sliding_window_inference(x, 8, 2, lambda w, f=extra: (conv(w), f(conv(w))),
                                            overlap=0.5)
        _close(ours, plain)


def test_one_batch_of_predictions_alive_at_a_time():
    import gc
    import weakref

    alive, refs = [], []
    conv = ConvPredictor(1, 2)

    def predictor(w):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        out = conv(w)
        refs.append(weakref.ref(out))
        return out

    sliding_window_inference(_inputs((1, 1, 16, 16, 16)), 8, 2, predictor, overlap=0.5)
    assert len(alive) > 2 and max(alive) == 0


def test_metatensor_dtype_device_and_gradients_as_in_monai():
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
    conv = ConvPredictor(1, 2)
    x = MetaTensor(_inputs((1, 1, 12, 14, 16)), affine=affine, meta={"filename_or_obj": "a.nii"})
    ours = sliding_window_inference(x, 8, 2, conv, overlap=0.5, mode="gaussian")
    ref = monai_swi(x, 8, 2, conv, overlap=0.5, mode="gaussian")
    assert isinstance(ours, MetaTensor) and torch.equal(ours.affine, ref.affine)
    assert ours.meta["filename_or_obj"] == "a.nii"
    _close(ours.as_tensor(), ref.as_tensor())
    # float64 in, float64 out (accumulated in float32); "cpu:0" is the CPU
    x64 = _inputs((1, 1, 12, 14, 16)).double()
    ours = sliding_window_inference(x64, 8, 2, lambda w: w * 2, overlap=0.5, device="cpu:0",
                                    sw_device=torch.device("cpu", 0))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, x64 * 2, rtol=1e-6, atol=1e-6)  # float32 sums
    # predictor outputs that require grad: the result does too, with MONAI's gradients
    lin = torch.nn.Conv3d(1, 2, 3, padding=1)
    xg = _inputs((1, 1, 12, 14, 16))
    for output in ("logits", "probs"):
        ours = sliding_window_inference(xg, 8, 2, lin, overlap=0.5, mode="gaussian",
                                        output=output, output_dtype=torch.float32)
        ref = monai_swi(xg, 8, 2, lin, overlap=0.5, mode="gaussian")
        ref = torch.sigmoid(ref) if output == "probs" else ref
        _close(ours.detach(), ref.detach())
        g_ours = torch.autograd.grad(ours.square().sum(), lin.weight)[0]
        g_ref = torch.autograd.grad(ref.square().sum(), lin.weight)[0]
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not sliding_window_inference(xg, 8, 2, lin, overlap=0.5).requires_grad


def test_reduction_arguments_are_checked_before_the_predictor_runs():
    calls = []

    def predictor(w):
        calls.append(1)
        return w

    x = _inputs((1, 1, 12, 12, 12))
    for kwargs in ({"output": "masks", "threshold": 1.5},
                   {"output": "probs", "output_dtype": torch.int8},
                   {"output": "labels", "output_dtype": torch.float16}):
        with pytest.raises(ValueError):
            sliding_window_inference(x, 8, 1, predictor, **kwargs)
    assert not calls
    # sigma_scale is not looked at in constant mode, as in MONAI
    out = sliding_window_inference(x, 8, 1, predictor, sigma_scale=(0.1, 0.2))
    torch.testing.assert_close(out, x)


def test_predictor_args_and_with_coord():
    x = _inputs((1, 1, 12, 12, 12))
    seen = []

    def predictor(w, coords, scale, *, shift):
        seen.append(coords)
        return w * scale + shift

    positional = (0.5, "gaussian", 0.125, "constant", 0.0, None, None, False, None, None, None)
    out = sliding_window_inference(x, 8, 3, predictor, *positional, -1, True, 2.0, shift=1.0)
    _close(out, x * 2 + 1)
    assert len(seen[0]) == 3 and seen[0][0][2] == slice(0, 8)


def test_tta_mirroring_equals_averaged_monai():
    x = _inputs((1, 1, 14, 15, 16))
    conv = ConvPredictor(1, 2)
    ref = 0
    combos = [c for k in range(4) for c in itertools.combinations((2, 3, 4), k)]
    for dims in combos:
        flip = (lambda w, d=dims: torch.flip(conv(torch.flip(w, d)), d)) if dims else conv
        ref = ref + monai_swi(x, 8, 2, flip, overlap=0.5, mode="gaussian")
    ref = ref / len(combos)
    ours = sliding_window_inference(x, 8, 2, conv, overlap=0.5, mode="gaussian", tta=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    plain = sliding_window_inference(x, 8, 2, conv, overlap=0.5, mode="gaussian")
    assert not torch.allclose(ours, plain)
    one_axis = sliding_window_inference(x, 8, 2, conv, overlap=0.5, tta=(1,), streaming=True)
    flip_h = lambda w: torch.flip(conv(torch.flip(w, (3,))), (3,))  # noqa: E731
    ref1 = (monai_swi(x, 8, 2, conv, overlap=0.5) + monai_swi(x, 8, 2, flip_h, overlap=0.5)) / 2
    torch.testing.assert_close(one_axis, ref1, rtol=1e-5, atol=1e-5)


def test_tta_leaves_predictor_outputs_alone():
    """The mirrored average never sums into the predictor's own tensor: a predictor returning
    its input (a view of the caller's image), one reusing a single output buffer, and one
    returning inference tensors all work, and the image is not modified."""
    x = _inputs((1, 1, 12, 10, 9))
    x0 = x.clone()
    conv = ConvPredictor(1, 2)
    ref = sliding_window_inference(x, 8, 1, conv, overlap=0.5, tta=True)
    ident = sliding_window_inference(x, 8, 1, lambda w: w, overlap=0.5, tta=True)
    assert torch.equal(x, x0)
    torch.testing.assert_close(ident, x, rtol=1e-6, atol=1e-6)  # mirrored identity: the image

    buf = {}

    def reusing(w):
        out = buf.setdefault("out", torch.empty(1, 2, 8, 8, 8))
        return out.copy_(conv(w))

    def in_inference_mode(w):
        with torch.inference_mode():
            return conv(w)

    for predictor in (reusing, in_inference_mode):
        torch.testing.assert_close(
            sliding_window_inference(x, 8, 1, predictor, overlap=0.5, tta=True), ref,
            rtol=0, atol=0,
        )  # fmt: skip


def test_buffers_are_reused_and_clean_after_errors():
    x = _inputs((1, 1, 16, 16, 16))
    conv = ConvPredictor(1, 3)
    ref = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels", streaming=True)
    calls = {"n": 0}

    def failing(w):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return conv(w)

    with pytest.raises(RuntimeError, match="boom"):
        sliding_window_inference(x, 8, 2, failing, overlap=0.5, output="labels", streaming=True)
    again = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels", streaming=True)
    assert torch.equal(again, ref)
    clear_workspace()
    fresh = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels", streaming=True)
    assert torch.equal(fresh, ref)


def test_cached_buffers_stay_within_the_byte_budget(monkeypatch):
    from hermes.inference import _workspace

    monkeypatch.setenv("HERMES_WORKSPACE_BYTES", "4e9")
    assert _workspace._byte_budget() == 4_000_000_000
    monkeypatch.setenv("HERMES_WORKSPACE_BYTES", "2G")
    with pytest.warns(UserWarning, match="HERMES_WORKSPACE_BYTES"):
        assert _workspace._byte_budget() == 2 << 30

    x = _inputs((1, 1, 16, 16, 16))
    conv = ConvPredictor(1, 3)
    ref = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels")
    acc_bytes = 4 * 4 * 16**3  # (3 channels + weight sum) x volume, float32
    clear_workspace()
    monkeypatch.setattr(_workspace, "_MAX_BYTES", acc_bytes - 4)
    big = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels")
    assert torch.equal(big, ref) and _workspace.cached_bytes() == 0  # freed, not cached
    small = sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels", streaming=True)
    assert torch.equal(small, ref) and _workspace.cached_bytes() == 4 * 4 * 8 * 16 * 16  # the ring
    monkeypatch.setattr(_workspace, "_MAX_BYTES", acc_bytes)
    sliding_window_inference(x, 8, 2, conv, overlap=0.5, output="labels")
    assert _workspace.cached_bytes() == acc_bytes  # the last one handed back goes first
    clear_workspace()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(overlap=1.0), ValueError, "overlap"),
        (dict(overlap=-0.1), ValueError, "overlap"),
        (dict(overlap=(0.5, 0.5)), ValueError, "overlap"),
        (dict(roi_size=(8, 8)), ValueError, "roi_size"),
        (dict(roi_size=(8.5, 8, 8)), ValueError, "roi_size"),
        (dict(sw_batch_size=0), ValueError, "sw_batch_size"),
        (dict(mode="triangle"), ValueError, "mode"),
        (dict(padding_mode="wrap"), ValueError, "padding_mode"),
        (dict(output="softmax"), ValueError, "output"),
        (dict(output="masks", threshold=1.0), ValueError, "threshold"),
        (dict(output="labels", output_dtype=torch.float16), ValueError, "output_dtype"),
        (dict(tta=(3,)), ValueError, "tta"),
        (dict(tta=1), ValueError, "tta"),
        (dict(tta=(0.5,)), ValueError, "tta"),
        (dict(tta="yes"), ValueError, "tta"),
        (dict(inputs=torch.zeros(0, 1, 10, 10, 10)), ValueError, "empty"),
        (dict(inputs=torch.zeros(1, 1, 10, 0, 10)), ValueError, "empty"),
        (dict(condition=torch.zeros(1, 1, 10, 10, 9)), ValueError, "condition"),
        (dict(sigma_scale=0.0, mode="gaussian"), ValueError, "sigma_scale"),
        (dict(process_fn=lambda *a: a), NotImplementedError, "process_fn"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    x = _inputs((1, 1, 10, 10, 10))
    args = dict(inputs=x, roi_size=(8, 8, 8), sw_batch_size=1, predictor=ConvPredictor(1, 1))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sliding_window_inference(**args)


def test_numpy_and_tensor_arguments_as_in_monai():
    np = pytest.importorskip("numpy")
    x = _inputs((1, 1, 14, 13, 12))
    conv = ConvPredictor(1, 2)
    sigma = np.float32(0.2)
    ref = sliding_window_inference(x, 8, 2, conv, overlap=0.5, mode="gaussian",
                                   sigma_scale=float(sigma))
    kw = dict(overlap=np.float32(0.5), mode="gaussian", sigma_scale=(sigma,) * 3)
    for roi, batch in ((np.int64(8), np.int64(2)), (torch.tensor([8, 8, 8]), torch.tensor(2)),
                       (np.array([8, 8, 8]), 2)):
        torch.testing.assert_close(
            sliding_window_inference(x, roi, batch, conv, **kw), ref, rtol=0, atol=0
        )
    for unused in (0.0, None):  # sigma_scale is unused in constant mode
        constant = sliding_window_inference(x, 10, 2, conv, overlap=0.5, sigma_scale=unused)
        _close(constant, monai_swi(x, 10, 2, conv, overlap=0.5, sigma_scale=unused))
    # window steps in the overlap's own precision: int(10 * (1 - float32(0.3))) is 7, not 6
    for ov in (np.float32(0.3), (np.float32(0.3), 0.3, np.float64(0.3))):
        ours = sliding_window_inference(x, 10, 2, conv, overlap=ov)
        _close(ours, monai_swi(x, 10, 2, conv, overlap=ov))
    streamed = sliding_window_inference(x, 8, 2, conv, streaming=True, stream_axis=np.int64(0),
                                        overlap=0.5, mode="gaussian", sigma_scale=float(sigma))
    assert torch.equal(streamed, ref)


def test_condition_is_windowed_like_the_inputs_as_in_monai():
    x, cond = _inputs((2, 1, 7, 12, 13)), _inputs((2, 2, 7, 12, 13), seed=2)
    conv = ConvPredictor(3, 2)

    def predictor(w, condition):
        return conv(torch.cat([w, condition], 1))

    kw = dict(overlap=0.5, mode="gaussian", padding_mode="replicate")
    ref = monai_swi(x, 8, 3, predictor, condition=cond, **kw)
    _close(sliding_window_inference(x, 8, 3, predictor, condition=cond, **kw), ref)
    # mirroring flips the condition with the windows
    flipped = monai_swi(x.flip(3), 8, 3, predictor, condition=cond.flip(3), **kw).flip(3)
    ours = sliding_window_inference(x, 8, 3, predictor, condition=cond, tta=(1,), **kw)
    _close(ours, (ref + flipped) / 2)


def test_windows_are_copies_when_batches_may_hold_several_as_in_monai():
    """A predictor normalising its windows in place leaves the caller's image alone whenever
    sw_batch_size > 1 (MONAI copies then; with 1 it hands views, as MONAI does)."""
    x = _inputs((1, 1, 8, 8, 8))
    x0 = x.clone()

    def in_place(w):
        return w.mul_(2.0)

    sliding_window_inference(x, 8, 4, in_place)  # one window, sw_batch_size 4
    assert torch.equal(x, x0)


def test_in_place_logits_accumulator_may_be_given_dirty():
    x = _inputs((1, 1, 11, 10, 9))
    conv = ConvPredictor(1, 2)
    ref = sliding_window_inference(x, 6, 2, conv, overlap=0.5)
    from hermes.inference import window_starts

    out = torch.full((2, 11, 10, 9), 7.0)
    aggr = PatchAggregator((11, 10, 9), 2, 6, mode="constant", out=out)
    for z, y, w in window_starts((11, 10, 9), (6, 6, 6), (0.5, 0.5, 0.5)):
        aggr.add_batch(conv(x[:, :, z : z + 6, y : y + 6, w : w + 6]), [[z, y, w]])
    _close(aggr.finalize(), ref[0])


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 10), (1, 1, 1, 10, 10, 10)])
def test_wrong_input_ranks_raise(shape):
    with pytest.raises(ValueError, match="inputs must be"):
        sliding_window_inference(torch.zeros(shape), 4, 1, ConvPredictor(1, 1))


def test_reflect_padding_too_large_is_refused():
    with pytest.raises(ValueError, match="reflect"):
        sliding_window_inference(torch.zeros(1, 1, 3, 10, 10), 8, 1, ConvPredictor(1, 1),
                                 padding_mode="reflect")  # fmt: skip


def test_predictor_with_wrong_output_shape_is_refused():
    x = _inputs((1, 1, 12, 12, 12))
    with pytest.raises(ValueError, match="another resolution"):
        sliding_window_inference(x, 8, 1, lambda w: w[:, :, ::2, ::2, ::2])
    with pytest.raises(ValueError, match="b x C x roi"):
        sliding_window_inference(x, 8, 1, lambda w: w[:, 0])


# ---- PatchAggregator ------------------------------------------------------------------------


def test_aggregator_custom_loop_equals_sliding_window():
    x = _inputs((1, 1, 20, 18, 16))
    conv = ConvPredictor(1, 3)
    # same predictor batches (5 windows) as the custom loop below
    ref = sliding_window_inference(x, (8, 8, 8), 5, conv, overlap=0.5, mode="gaussian")
    from hermes.inference import window_starts

    starts = window_starts((20, 18, 16), (8, 8, 8), (0.5, 0.5, 0.5))
    for streaming in (False, True):
        aggr = PatchAggregator((20, 18, 16), 3, 8, mode="gaussian", streaming=streaming)
        for i in range(0, len(starts), 5):  # TorchIO-style locations: corners then ends
            locs = torch.tensor([[*s, *(v + 8 for v in s)] for s in starts[i : i + 5]])
            windows = torch.cat(
                [x[:, :, z : z + 8, y : y + 8, w : w + 8] for z, y, w in starts[i : i + 5]]
            )
            aggr.add_batch(conv(windows), locs)
        assert torch.equal(aggr.finalize(), ref[0])


def test_aggregator_arbitrary_order_matches_float64_by_hand():
    g = torch.Generator().manual_seed(3)
    shape, roi = (9, 10, 11), (4, 5, 6)
    starts = [(z, y, w) for z in (5, 0, 3) for y in (0, 5, 2) for w in (5, 0)]
    patches = torch.randn(len(starts), 2, *roi, generator=g)
    aggr = PatchAggregator(shape, 2, roi, mode="gaussian", sigma_scale=0.3)
    aggr.add_batch(patches, starts)
    out = aggr.finalize()
    from hermes.ops.aggregate import weight_map, window_tables

    w = weight_map(window_tables(roi, "gaussian", 0.3)).double()
    num = torch.zeros(2, *shape, dtype=torch.float64)
    den = torch.zeros(shape, dtype=torch.float64)
    for (z, y, v), p in zip(starts, patches, strict=True):
        num[:, z : z + 4, y : y + 5, v : v + 6] += p.double() * w
        den[z : z + 4, y : y + 5, v : v + 6] += w
    torch.testing.assert_close(out.double(), num / den, rtol=1e-5, atol=1e-6)
    covered = den > 0
    assert bool(torch.isnan(out[:, ~covered]).all()) and bool(covered.any())


def test_aggregator_errors():
    with pytest.raises(ValueError, match="fit in the volume"):
        PatchAggregator((10, 10, 10), 2, (12, 8, 8))
    with pytest.raises(ValueError, match="spatial_shape"):
        PatchAggregator((10,), 2, 4)
    aggr = PatchAggregator((10, 10, 10), 2, 4, streaming=True)
    with pytest.raises(ValueError, match="patches must have shape"):
        aggr.add_batch(torch.zeros(1, 3, 4, 4, 4), [[0, 0, 0]])
    with pytest.raises(ValueError, match="inside the volume"):
        aggr.add_batch(torch.zeros(1, 2, 4, 4, 4), [[0, 7, 0]])
    with pytest.raises(ValueError, match="ends - starts"):
        aggr.add_batch(torch.zeros(1, 2, 4, 4, 4), [[0, 0, 0, 4, 4, 5]])
    aggr.add_batch(torch.zeros(1, 2, 4, 4, 4), [[4, 0, 0]])
    with pytest.raises(ValueError, match="non-decreasing"):
        aggr.add_batch(torch.zeros(1, 2, 4, 4, 4), [[2, 0, 0]])
    aggr.finalize()
    with pytest.raises(RuntimeError, match="already"):
        aggr.finalize()
    for kw in (dict(output="probs", output_dtype=torch.float32), {}):  # in place and not
        with pytest.raises(ValueError, match=r"shape \(2, 10, 6, 8\)"):
            PatchAggregator((10, 6, 8), 2, 4, out=torch.zeros(2, 8, 6, 10), **kw)
    with pytest.raises(ValueError, match="integer voxel coordinates"):
        PatchAggregator((10, 10, 10), 2, 4).add_batch(torch.zeros(1, 2, 4, 4, 4),
                                                       torch.tensor([[1.9, 0.0, 0.0]]))


def test_aggregator_takes_numpy_sizes_and_reports_its_output_shape():
    import numpy as np

    for shape, roi in (((9, 7), (4, 4)), ((9, 7, 6), (4, 4, 4))):
        aggr = PatchAggregator(shape, np.int64(2), tuple(np.array(roi)),
                               sigma_scale=np.float32(0.2), device="cpu:0")
        for start in itertools.product(*[(0, s - r) for s, r in zip(shape, roi, strict=True)]):
            aggr.add_batch(torch.ones(1, 2, *roi), torch.tensor([start], dtype=torch.float64))
        expected = aggr.output_shape
        out = aggr.finalize()
        assert tuple(out.shape) == expected == (2, *shape)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("streaming", [False, True])
def test_cuda_equals_monai_and_cpu(streaming, monkeypatch):
    # exact float32 convolutions on the GPU (no TF32), so that only the aggregation differs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    x = _inputs((1, 1, 30, 27, 25))
    conv = ConvPredictor(1, 4)
    kw = dict(overlap=0.5, mode="gaussian")
    ref = monai_swi(x, (12, 12, 12), 3, conv, **kw)
    ours = sliding_window_inference(x.cuda(), (12, 12, 12), 3, conv, streaming=streaming, **kw)
    assert ours.is_cuda
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-5, atol=1e-5)
    for output in ("masks", "labels"):
        kw2 = dict(kw, output=output, streaming=streaming)
        gpu = sliding_window_inference(x.cuda(), 12, 3, conv, **kw2)
        cpu = sliding_window_inference(x, 12, 3, conv, **kw2)
        mismatch = (gpu.cpu() != cpu).float().mean().item()
        assert mismatch < 1e-4  # the convolution sums in another order on the GPU
    # predictor on the CPU, aggregation on the GPU ("cuda" without an index): the kernels add
    # and divide in the same order and rounding as the CPU ones, so the results are identical
    split = sliding_window_inference(x, 12, 3, conv, device="cuda", streaming=streaming, **kw)
    assert split.is_cuda
    cpu = sliding_window_inference(x, 12, 3, conv, streaming=streaming, **kw)
    assert torch.equal(split.cpu(), cpu)
    again = sliding_window_inference(x.cuda(), (12, 12, 12), 3, conv, streaming=streaming, **kw)
    assert torch.equal(ours, again)  # deterministic


@pytest.mark.parametrize("axis", [1, 2, "auto"])
@pytest.mark.parametrize("output", ["logits", "labels"])
@pytest.mark.parametrize(
    "shape,roi",
    [
        ((2, 1, 13, 30, 22), (16, 10, 8)),  # depth padded 13 -> 16
        ((1, 1, 20, 9, 7), (8, 12, 10)),  # the streamed axis itself padded (9 -> 12, 7 -> 10)
    ],
)
def test_streaming_along_other_axes(axis, output, shape, roi):
    x = _inputs(shape)
    conv = ConvPredictor(1, 3)
    kw = dict(overlap=0.5, mode="gaussian", padding_mode="replicate")
    ref = sliding_window_inference(x, roi, 3, conv, **kw)
    ours = sliding_window_inference(x, roi, 3, conv, streaming=True, stream_axis=axis,
                                    output=output, **kw)  # fmt: skip
    if output == "logits":
        _close(ours, ref)
    else:
        expected = _reference_outputs(ref, 0.5)[1]
        assert ours.shape == expected.shape
        # another summation order: a voxel within rounding of a tie or the threshold may flip
        assert (ours.long() != expected).float().mean().item() < 1e-3


def test_best_stream_axis():
    from hermes.inference import best_stream_axis

    assert best_stream_axis((96, 512, 512), (96, 96, 96)) == 1
    assert best_stream_axis((300, 200, 200), (96, 96, 96)) == 0
    assert best_stream_axis((100, 100, 400), (96, 96, 96)) == 2
    with pytest.raises(ValueError, match="stream_axis"):
        sliding_window_inference(_inputs((1, 1, 8, 8, 8)), 4, 1, ConvPredictor(1, 1),
                                 streaming=True, stream_axis=3)  # fmt: skip


def test_aggregator_streaming_along_last_axis_2d():
    x = _inputs((1, 2, 21, 34))
    conv = ConvPredictor(2, 3, ndim=2)
    ref = sliding_window_inference(x, (8, 12), 1, conv, overlap=0.5, mode="gaussian")
    from hermes.inference import window_starts

    starts = sorted(window_starts((21, 34), (8, 12), (0.5, 0.5)), key=lambda s: s[1])
    aggr = PatchAggregator((21, 34), 3, (8, 12), streaming=True, stream_axis=1)
    for y, w in starts:
        aggr.add_batch(conv(x[:, :, y : y + 8, w : w + 12]), [[y, w]])
    _close(aggr.finalize(), ref[0])


def test_reused_buffers_work_across_inference_mode():
    x = _inputs((1, 1, 9, 16, 16))  # depth padded to the window: planes outside the crop
    conv = ConvPredictor(1, 2)
    kw = dict(overlap=0.5, output="labels", streaming=True)
    clear_workspace()
    with torch.inference_mode():
        inside = sliding_window_inference(x, 12, 2, conv, **kw)
    outside = sliding_window_inference(x, 12, 2, conv, **kw)
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("shape,roi,axis", [
    ((1, 2, 13, 30, 22), (16, 10, 8), 0),  # depth padded 13 -> 16: planes outside the crop
    ((1, 2, 13, 30, 22), (16, 10, 8), 1),
    ((1, 1, 20, 9, 7), (8, 12, 10), 2),  # the streamed axis itself padded
    ((1, 1, 12, 10, 45), (8, 8, 24), 2),  # chunks of 3 planes along the last axis
    ((1, 2, 21, 34), (8, 12), 1),  # 2-D
])
def test_plane_sink_gets_the_streamed_output_plane_by_plane(shape, roi, axis):
    x = _inputs(shape)
    conv = ConvPredictor(shape[1], 3, ndim=len(shape) - 2)
    kw = dict(overlap=0.5, mode="gaussian", output="probs", output_dtype=torch.float32,
              streaming=True, stream_axis=axis)
    want = sliding_window_inference(x, roi, 2, conv, **kw)[0]
    got, kept = torch.full_like(want, float("nan")), []

    def sink(a, index, plane):
        assert a == axis and index == len(kept)
        assert plane.shape == want.narrow(1 + a, index, 1).shape
        if kept:  # the previous plane is still intact during this call
            assert torch.equal(kept[-1][0], kept[-1][1])
        kept.append((plane, plane.clone()))
        got.narrow(1 + a, index, 1).copy_(plane)

    assert sliding_window_inference(x, roi, 2, conv, plane_sink=sink, **kw) is None
    assert len(kept) == want.shape[1 + axis]
    assert torch.equal(got, want)


def test_plane_sink_needs_one_streamed_image_without_gradients():
    conv, sink = ConvPredictor(1, 2), (lambda *a: None)
    with pytest.raises(ValueError, match="plane_sink needs streaming=True, one image"):
        sliding_window_inference(_inputs((1, 1, 8, 8, 8)), 4, 1, conv, plane_sink=sink)
    with pytest.raises(ValueError, match="one image"):
        sliding_window_inference(_inputs((2, 1, 8, 8, 8)), 4, 1, conv, streaming=True,
                                 plane_sink=sink)
    with pytest.raises(ValueError, match="one predictor output"):
        sliding_window_inference(_inputs((1, 1, 8, 8, 8)), 4, 1, lambda w: (conv(w), conv(w)),
                                 streaming=True, plane_sink=sink)


def test_a_failing_plane_sink_leaves_the_aggregator_refusing_further_use():
    """Its planes' sums are spent when the sink raises: a retried add or finalize would send
    duplicate and NaN planes, so both are refused; the dirty accumulators are not cached."""
    conv = ConvPredictor(1, 2)
    x = _inputs((1, 1, 16, 10, 10))
    calls = []

    def sink(index, plane):
        calls.append(index)
        if len(calls) == 3:
            raise OSError("disk full")

    agg = PatchAggregator((16, 10, 10), 2, (8, 10, 10), streaming=True, plane_sink=sink)
    with pytest.raises(OSError, match="disk full"):
        for z in (0, 4, 8):
            agg.add_batch(conv(x[:, :, z:z + 8]), [[z, 0, 0]])
    for again in (lambda: agg.add_batch(conv(x[:, :, 8:16]), [[8, 0, 0]]), agg.finalize):
        with pytest.raises(RuntimeError, match="the plane sink raised"):
            again()
    assert calls == [0, 1, 2]


def test_tta_keeps_gradients_as_without_it():
    weight = torch.randn(2, 1, 3, 3, 3, requires_grad=True)

    def predictor(w):
        return F.conv3d(w, weight, padding=1)

    x = _inputs((1, 1, 10, 10, 10))
    for tta in (False, True):
        out = sliding_window_inference(x, 8, 1, predictor, overlap=0.5, tta=tta)
        assert out.requires_grad
        (grad,) = torch.autograd.grad(out.sum(), weight)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_stream_axis_takes_numpy_integers_and_refuses_bools():
    import numpy as np

    agg = PatchAggregator((8, 8, 8), 1, 4, streaming=True, stream_axis=np.int64(1))
    assert agg._ring_axis == 1
    with pytest.raises(ValueError, match="stream_axis must be a spatial axis"):
        PatchAggregator((8, 8, 8), 1, 4, streaming=True, stream_axis=True)
