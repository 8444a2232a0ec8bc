"""Fused prior-feature interaction against the reference: values, gradients, odd shapes, ops."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import hermes.ops.prior_attention_fused as paf
from hermes.models.prior_fusion import PriorAttentionBlock, PriorFeatureInteraction
from hermes.ops._prior_kernels import NativeKernels, TorchKernels, native_available
from hermes.ops.prior_attention import (
    cross_attention_sublayer,
    mlp_sublayer,
    prior_attention_block_reference,
)

HAS_NATIVE = native_available(torch.device("cpu"), torch.float32)
BACKENDS = [pytest.param(True, id="native"), pytest.param(False, id="torch")]


@contextlib.contextmanager
def backend(native: bool):
    if native and not HAS_NATIVE:
        pytest.skip("hermes._C without prior-attention kernels")
    old = paf._USE_NATIVE
    paf.set_native_kernels(native)
    try:
        yield
    finally:
        paf.set_native_kernels(old)


@pytest.fixture
def one_thread():
    """gradcheck runs thousands of tiny ops: one thread avoids fork/join costs (busy CI hosts)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fold_small_volumes(monkeypatch):
    """The tests' volumes are tiny: let ``auto`` fold them (production folds from
    ``FOLD_MIN_VOXELS``; ``test_fold_needs_enough_voxels`` checks that threshold)."""
    monkeypatch.setattr(paf, "FOLD_MIN_VOXELS", 1)


def make_block(c: int, dtype=torch.float64, head_dim: int = 32, seed: int = 0):
    """A block with non-trivial LayerNorm affines and biases (init would leave them 1 / 0)."""
    torch.manual_seed(seed)
    blk = PriorAttentionBlock(c, head_dim=head_dim).to(dtype)
    with torch.no_grad():
        for name, prm in blk.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0, 0.2)
            elif "norm" in name:
                prm.normal_(1, 0.2)
    return blk


def _leaves(blk):
    return [p for _, p in blk.named_parameters()]


def _grads(fn, feats, priors, blk, gf, gp):
    out_f, out_p = fn(feats, priors, blk.params())
    params = _leaves(blk)
    grads = torch.autograd.grad([out_f, out_p], [feats, priors, *params], [gf, gp])
    return out_f, out_p, grads


# ------------------------------------------------------------------------------------------------
# element-wise kernels: native against the PyTorch versions
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_NATIVE, reason="hermes._C without prior-attention kernels")
@pytest.mark.parametrize(
    "dev, dtype",
    [
        ("cpu", torch.float32),
        ("cpu", torch.float64),
        pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
        pytest.param("cuda", torch.float64, marks=pytest.mark.cuda),
    ],
)
def test_native_kernels_match_torch(dev, dtype):
    assert native_available(torch.device(dev), dtype), f"built without {dev} kernels"
    with torch.device(dev):
        _native_kernels_match_torch(torch.device(dev), dtype)


def _native_kernels_match_torch(dev: torch.device, dtype: torch.dtype) -> None:
    nk, tk = NativeKernels(dev), TorchKernels
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:  # the GPU reduces in another order and its expf is within 2 ulp
        tol = dict(rtol=1e-5, atol=1e-6) if dev.type == "cpu" else dict(rtol=1e-4, atol=1e-5)
    rows, c = 333, 77
    x = torch.randn(rows, c, dtype=dtype) * 3 + 1
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    y1, m1, r1 = nk.ln_fwd(x, w, b, 1e-5)
    y2, m2, r2 = tk.ln_fwd(x, w, b, 1e-5)
    for a_, b_ in ((y1, y2), (m1, m2), (r1, r2)):
        torch.testing.assert_close(a_, b_, **tol)
    dy = torch.randn_like(x)
    for acc in (False, True):
        outs = []
        for k in (nk, tk):
            dx = torch.ones_like(x)
            dw, db = torch.full((c,), 0.5, dtype=m1.dtype), torch.zeros(c, dtype=m1.dtype)
            k.ln_bwd(dy, x, m1, r1, w, dx, dw, db, acc)
            outs.append((dx, dw, db))
        for a_, b_ in zip(*outs, strict=True):
            torch.testing.assert_close(a_, b_, **tol)
    heads, n = 3, 7  # scores (heads * n) x voxels, 333 voxels: 64-column blocks and a remainder
    s = torch.randn(heads * n, rows, dtype=dtype) * 4
    s1, s2 = s.clone(), s.clone()
    nk.head_softmax(s1, heads)
    tk.head_softmax(s2, heads)
    torch.testing.assert_close(s1, s2, **tol)
    g = torch.randn_like(s)
    s1, s2, g1, g2 = s.clone(), s.clone(), g.clone(), g.clone()
    nk.head_softmax_bwd(s1, g1, heads)
    tk.head_softmax_bwd(s2, g2, heads)
    torch.testing.assert_close(s1, s2, **tol)
    torch.testing.assert_close(g1, g2, **tol)
    # online softmax over three uneven chunks: running max/sum and rescaled accumulator
    m_rows, length = 9, 301
    sc = torch.randn(m_rows, length, dtype=dtype) * 5
    for k in (nk, tk):
        mx = torch.full((m_rows,), -float("inf"), dtype=m1.dtype)
        sm = torch.zeros(m_rows, dtype=m1.dtype)
        acc = torch.zeros(m_rows, dtype=dtype)
        for c0, c1 in ((0, 100), (100, 101), (101, length)):
            part = sc[:, c0:c1].clone()
            alpha = k.online_update(part, mx, sm)
            acc = acc * alpha + part.sum(-1)
        torch.testing.assert_close(mx, sc.amax(-1).to(mx.dtype), **tol)
        torch.testing.assert_close(sm, torch.exp(sc - sc.amax(-1, keepdim=True)).sum(-1)
                                   .to(sm.dtype), **tol)
        torch.testing.assert_close(acc, sm.to(dtype), **tol)
    lse = torch.logsumexp(sc, -1).to(m1.dtype)
    dsum = torch.randn(m_rows, dtype=m1.dtype)
    gd = torch.randn_like(sc)
    outs = []
    for k in (nk, tk):
        s_, g_ = sc.clone(), gd.clone()
        k.gather_bwd(s_, g_, lse, dsum)
        outs.append((s_, g_))
    for a_, b_ in zip(*outs, strict=True):
        torch.testing.assert_close(a_, b_, **tol)
    # bias + GELU, forward and backward, over the whole range incl. large |z|
    u = torch.randn(rows, 40, dtype=dtype) * 4
    u[0, :4] = torch.tensor([-30.0, -9.0, 9.0, 30.0], dtype=dtype)
    bias = torch.randn(40, dtype=dtype)
    gd = torch.randn_like(u)
    outs = []
    for k in (nk, tk):
        u1, g1, u2 = u.clone(), gd.clone(), u.clone()
        k.bias_gelu_fwd_bwd(u1, bias, g1)
        k.bias_gelu(u2, bias)
        outs.append((u1, g1, u2))
    for a_, b_ in zip(*outs, strict=True):
        torch.testing.assert_close(a_, b_, **tol)


@pytest.mark.skipif(not HAS_NATIVE, reason="hermes._C without prior-attention kernels")
def test_native_exp_accuracy_and_extremes():
    """The polynomial float exp: ~1e-7 relative on [-87, 0], exp(-huge) clamps to ~exp(-87)."""
    nk = NativeKernels(torch.device("cpu"))
    v = torch.linspace(-87, 0, 4001)
    s = torch.stack([torch.zeros_like(v), v])  # columns of (0, v): the max is 0
    nk.head_softmax(s, 1)
    expect = torch.softmax(torch.stack([torch.zeros_like(v), v]).double(), 0)
    torch.testing.assert_close(s.double(), expect, rtol=1e-6, atol=1e-30)
    big = torch.tensor([[0.0], [-1e30], [3.0]])
    nk.head_softmax(big, 1)
    assert torch.isfinite(big).all() and 0 <= big[1, 0] < 1e-37


def test_cuda_layernorm_backward_follows_deterministic_mode():
    """Under torch.use_deterministic_algorithms the CUDA LayerNorm backward (float atomics for
    dw/db) is replaced by the PyTorch path; otherwise the native kernel runs."""

    class Recorder:
        calls = 0

        def pa_ln_bwd(self, *args):
            Recorder.calls += 1

    nk = NativeKernels(torch.device("cpu"))
    nk._c, nk._cuda = Recorder(), True  # as on a GPU, without launching anything
    nk._stream = lambda: 0
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    w = torch.randn(12, generator=g)
    _, mean, rstd = TorchKernels.ln_fwd(x, w, torch.zeros(12), 1e-5)
    expect = [torch.zeros(7, 12), torch.zeros(12), torch.zeros(12)]
    TorchKernels.ln_bwd(dy, x, mean, rstd, w, *expect, False)
    got = [torch.zeros(7, 12), torch.zeros(12), torch.zeros(12)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        nk.ln_bwd(dy, x, mean, rstd, w, *got, False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert Recorder.calls == 0
    for a_, b_ in zip(got, expect, strict=True):
        assert torch.equal(a_, b_)
    if not previous:
        nk.ln_bwd(dy, x, mean, rstd, w, *got, False)
        assert Recorder.calls == 1


# ------------------------------------------------------------------------------------------------
# float64 gradcheck of the three streaming ops (several chunks: online softmax across chunks)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", BACKENDS)
def test_gradcheck_prior_gather(native, one_thread):
    with backend(native):
        b, length, m, c = 2, 11, 5, 6
        f = torch.randn(b, length, c, dtype=torch.float64, requires_grad=True)
        a = torch.randn(b, m, c, dtype=torch.float64, requires_grad=True)
        w = (1 + 0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_()
        bb = (0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda *t: paf.prior_gather(*t, eps=1e-5, chunk=4), (f, a, w, bb),
            fast_mode=not native)


@pytest.mark.parametrize("native", BACKENDS)
def test_gradcheck_feature_scatter(native, one_thread):
    with backend(native):
        b, length, heads, n, c = 2, 9, 2, 3, 6
        f = torch.randn(b, length, c, dtype=torch.float64, requires_grad=True)
        a = torch.randn(b, heads * n, c, dtype=torch.float64, requires_grad=True)
        v = torch.randn(b, heads * n, c, dtype=torch.float64, requires_grad=True)
        w = (1 + 0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_()
        bb = (0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_()
        ob = torch.randn(c, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda *t: paf.feature_scatter(*t, heads=heads, eps=1e-5, chunk=4),
            (f, a, v, w, bb, ob), fast_mode=not native)


@pytest.mark.parametrize("native", BACKENDS)
def test_gradcheck_feature_mlp(native, one_thread):
    with backend(native):
        b, length, c, hidden = 2, 7, 5, 9
        f = torch.randn(b, length, c, dtype=torch.float64, requires_grad=True)
        weights = [1 + 0.3 * torch.randn(c), 0.3 * torch.randn(c), torch.randn(hidden, c),
                   torch.randn(hidden), torch.randn(c, hidden), torch.randn(c)]
        weights = [t.double().requires_grad_() for t in weights]

        def fn(feats, *ws):
            return paf.feature_mlp(feats, paf.MLPParams(*ws, eps=1e-4), chunk=3)

        assert torch.autograd.gradcheck(fn, (f, *weights), fast_mode=not native)


def test_gradcheck_whole_block_small(one_thread):
    blk = make_block(32, head_dim=16)  # 2 heads
    f = torch.randn(1, 6, 32, dtype=torch.float64, requires_grad=True)
    p = torch.randn(1, 3, 32, dtype=torch.float64, requires_grad=True)
    params = _leaves(blk)

    def fn(feats, priors, *_):
        return paf.prior_attention_block_fused(feats, priors, blk.params(), chunk=4)

    assert torch.autograd.gradcheck(fn, (f, p, *params[4:6]), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# whole block against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize(
    "b,length,n,c,head_dim,chunk",
    [
        (2, 37, 5, 64, 32, 10),  # L not a multiple of the chunk
        (1, 23, 1, 64, 32, 8),  # a single prior
        (2, 19, 4, 48, 32, 7),  # C not a multiple of the head width: inner 32 < C = 48
        (1, 1, 3, 32, 32, None),  # a single voxel
        (3, 50, 6, 40, 8, 16),  # 5 heads of width 8
    ],
)
def test_block_matches_reference_float64(native, b, length, n, c, head_dim, chunk, one_thread):
    with backend(native):
        blk = make_block(c, head_dim=head_dim)
        f = torch.randn(b, length, c, dtype=torch.float64, requires_grad=True)
        p = torch.randn(b, n, c, dtype=torch.float64, requires_grad=True)
        gf, gp = torch.randn_like(f), torch.randn_like(p)
        ref = _grads(prior_attention_block_reference, f, p, blk, gf, gp)
        out = _grads(lambda *a: paf.prior_attention_block_fused(*a, chunk=chunk), f, p, blk, gf,
                     gp)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-10)
        names = ["features", "priors"] + [nm for nm, _ in blk.named_parameters()]
        for name, g_out, g_ref in zip(names, out[2], ref[2], strict=True):
            torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("native", BACKENDS)
def test_sublayers_match_reference(native, one_thread):
    with backend(native):
        blk = make_block(64)
        prm = blk.params()
        f = torch.randn(2, 29, 64, dtype=torch.float64)
        p = torch.randn(2, 4, 64, dtype=torch.float64)
        torch.testing.assert_close(paf.prior_cross_attention_fused(f, p, prm.prior_attn, 8),
                                   cross_attention_sublayer(p, f, prm.prior_attn))
        torch.testing.assert_close(paf.feature_cross_attention_fused(f, p, prm.feat_attn, 8),
                                   cross_attention_sublayer(f, p, prm.feat_attn))
        torch.testing.assert_close(paf.feature_mlp_fused(f, prm.feat_mlp, 8, streamed=True),
                                   mlp_sublayer(f, prm.feat_mlp))


@pytest.mark.parametrize("fold", ["always", "never", "auto"])
def test_fold_choice_matches_reference(fold, one_thread):
    """Both formulations of the cross-attention sublayers (and the auto choice) are exact."""
    blk = make_block(64, head_dim=16)  # 4 heads: auto folds for N = 3, not for N = 60
    for n in (3, 60):
        f = torch.randn(2, 21, 64, dtype=torch.float64, requires_grad=True)
        p = torch.randn(2, n, 64, dtype=torch.float64, requires_grad=True)
        gf, gp = torch.randn_like(f), torch.randn_like(p)
        ref = _grads(prior_attention_block_reference, f, p, blk, gf, gp)
        out = _grads(lambda *a: paf.prior_attention_block_fused(*a, chunk=8, fold=fold), f, p,
                     blk, gf, gp)
        for g_out, g_ref in zip([out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]],
                                strict=True):
            torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-9)
    assert paf.use_fold(4, 3, 64) and not paf.use_fold(4, 60, 64)
    assert paf.use_fold(4, 26, 128) and not paf.use_fold(4, 82, 128)  # level 2, N 26 / 82
    with pytest.raises(ValueError, match="fold must be"):
        paf.use_fold(4, 3, 64, "sometimes")


def _form(side, length, n=26, c=128, dev="cpu", dtype=torch.float32, grad=False, fold="auto"):
    return paf.choose_formulation(side, length, n, c, c // 32, device_type=dev, dtype=dtype,
                                  needs_grad=grad, fold=fold)


def test_choose_formulation_per_device():
    """GPUs (auto): SDPA, or explicit attention in float32/64, with gradients from
    ``GPU_MATH_MIN_VOXELS``, without from ``GPU_MATH_MIN_VOXELS_FORWARD`` for priors <- features;
    ``always``/``never`` as on the CPU. CPU: folded where :func:`use_fold` says so, else
    streamed from ``STREAM_MIN_VOXELS`` voxels, else SDPA."""
    big, small = paf.GPU_MATH_MIN_VOXELS, paf.GPU_MATH_MIN_VOXELS - 1
    fwd = paf.GPU_MATH_MIN_VOXELS_FORWARD
    for dtype in (torch.float32, torch.float64):
        for side in ("prior", "feature"):
            assert _form(side, big, dev="cuda", dtype=dtype, grad=True) == "math"
            assert _form(side, small, dev="cuda", dtype=dtype, grad=True) == "sdpa"
        assert _form("prior", fwd, dev="cuda", dtype=dtype) == "math"
        assert _form("prior", fwd - 1, dev="cuda", dtype=dtype) == "sdpa"
        assert _form("feature", 10 * big, dev="cuda", dtype=dtype) == "sdpa"
    for dtype in (torch.float16, torch.bfloat16):
        for side in ("prior", "feature"):
            assert _form(side, big, dev="cuda", dtype=dtype, grad=True) == "sdpa"
    assert _form("prior", 512, dev="cuda", fold="always") == "fold"
    assert _form("prior", paf.STREAM_MIN_VOXELS, n=82, dev="cuda", fold="never") == "stream"
    assert _form("prior", paf.STREAM_MIN_VOXELS, dev="cuda", grad=True, fold="never") == "sdpa"
    assert _form("prior", 32768) == "fold"  # level 2, N = 26
    assert _form("feature", 32768, n=82, grad=True) == "stream"  # CPU training streams too
    assert _form("feature", 4096, n=82) == "sdpa"
    with pytest.raises(ValueError, match="side must be"):
        _form("voxels", 100)
    with pytest.raises(ValueError, match="fold must be"):
        _form("prior", 100, fold="sometimes")


@pytest.mark.parametrize("direction", ["prior", "feature"])
def test_explicit_attention_core(direction, one_thread):
    """The ``math`` core (the GPUs' float32 choice) equals the reference sublayer and SDPA in
    values and gradients (float64), and passes gradcheck; an unknown core is refused."""
    prm = make_block(64, head_dim=16).params()
    a = prm.prior_attn if direction == "prior" else prm.feat_attn
    f = torch.randn(2, 23, 64, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    q, kv = (p, f) if direction == "prior" else (f, p)
    g = torch.randn_like(q)
    outs = []
    for fn in (lambda x, y: paf._projected_cross_attention(x, y, a, "math"),
               lambda x, y: paf._projected_cross_attention(x, y, a, "sdpa"),
               lambda x, y: cross_attention_sublayer(x, y, a)):
        out = fn(q, kv)
        outs.append((out, *torch.autograd.grad(out, [q, kv, a.w_q, a.norm_kv_weight], g)))
    for ours, other in zip(outs[0], outs[2], strict=True):
        torch.testing.assert_close(ours, other, rtol=1e-10, atol=1e-10)
    for ours, other in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(ours, other, rtol=1e-10, atol=1e-10)
    small = (q[:1, :4, :].detach().requires_grad_(), kv[:1, :6, :].detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: paf._projected_cross_attention(x, y, a, "math"),
                                    small)
    with pytest.raises(ValueError, match="core must be"):
        paf._projected_cross_attention(q, kv, a, "flash")


def test_plain_feature_mlp_and_streamed_default(monkeypatch, one_thread):
    """``streamed_mlp=False`` (the GPUs' default) runs PyTorch's layers and equals the
    reference; the block asks for the streaming MLP with ``fold="always"`` and leaves the
    device's default otherwise, which streams on the CPU above ``MLP_STREAM_MIN`` hidden
    activations."""
    blk = make_block(64)
    f = torch.randn(2, 29, 64, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 4, 64, dtype=torch.float64, requires_grad=True)
    gf, gp = torch.randn_like(f), torch.randn_like(p)
    ref = _grads(prior_attention_block_reference, f, p, blk, gf, gp)
    calls = []
    streamed = paf.feature_mlp
    monkeypatch.setattr(paf, "feature_mlp", lambda *a: (calls.append(1), streamed(*a))[1])
    out = _grads(lambda *a: paf.prior_attention_block_fused(*a, streamed_mlp=False), f, p, blk,
                 gf, gp)
    assert not calls
    for g_out, g_ref in zip([out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]], strict=True):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-10)
    asked = []
    mlp_fused = paf.feature_mlp_fused
    monkeypatch.setattr(paf, "feature_mlp_fused",
                        lambda *a: (asked.append(a[3]), mlp_fused(*a))[1])
    hidden = 2 * 29 * 4 * 64  # B x L x 4C
    for fold in ("always", "auto", "never"):
        paf.prior_attention_block_fused(f, p, blk.params(), fold=fold)
    assert asked == [True, None, None] and calls == [1]  # small: PyTorch's layers by default
    for least, streams in ((hidden, False), (hidden - 1, True)):
        monkeypatch.setattr(paf, "MLP_STREAM_MIN", least)
        calls.clear()
        paf.prior_attention_block_fused(f, p, blk.params())
        assert calls == ([1] if streams else [])


def test_formulation_follows_autocast():
    """Float32 tokens under autocast compute their projections in autocast's dtype: that is the
    dtype the per-device choice sees."""
    f = torch.randn(1, 8, 64)
    assert paf._compute_dtype(f) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert paf._compute_dtype(f) == torch.bfloat16
        assert paf._compute_dtype(torch.zeros(3, dtype=torch.int64)) == torch.int64


def test_fold_needs_enough_voxels(monkeypatch, one_thread):
    """``auto`` folds from ``FOLD_MIN_VOXELS`` voxels only (level 4 of a 128^3 crop, 512 voxels,
    runs projected); ``always`` folds any volume. Both equal the reference."""
    monkeypatch.undo()
    assert paf.FOLD_MIN_VOXELS > 512
    assert not paf.use_fold(10, 26, 320, length=512) and paf.use_fold(10, 26, 320, length=4096)
    assert paf.use_fold(10, 26, 320, "always", length=512)
    monkeypatch.setattr(paf, "FOLD_MIN_VOXELS", 12)
    calls = []
    gather = paf.prior_gather
    monkeypatch.setattr(paf, "prior_gather", lambda *a, **k: (calls.append(1), gather(*a, **k))[1])
    prm = make_block(32, head_dim=16).params()
    p = torch.randn(1, 3, 32, dtype=torch.float64)
    for length, folded in ((11, False), (12, True)):
        f = torch.randn(1, length, 32, dtype=torch.float64)
        out = paf.prior_cross_attention_fused(f, p, prm.prior_attn)
        assert len(calls) == int(folded)
        torch.testing.assert_close(out, cross_attention_sublayer(p, f, prm.prior_attn),
                                   rtol=1e-10, atol=1e-10)
        calls.clear()


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize(
    "b, length, n, c, head_dim, chunk",
    [
        (1, 37, 60, 64, 16, 8),  # several chunks, L not a multiple of the chunk
        (2, 5, 1, 48, 16, 64),  # one prior, one chunk, C not a multiple of 32
        (2, 50, 9, 40, 20, None),  # default chunking
    ],
)
def test_streamed_projected_sublayers_without_grad(native, b, length, n, c, head_dim, chunk,
                                                    one_thread, monkeypatch):
    """Unfolded sublayers stream from ``STREAM_MIN_VOXELS`` voxels (without gradients, and with
    them on the CPU), equal to the reference in float64; below it they run through SDPA."""
    import hermes.ops.prior_attention_projected as proj

    calls = []
    for name in ("prior_cross_attention_projected", "feature_cross_attention_projected"):
        fn = getattr(proj, name)
        monkeypatch.setattr(proj, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n),
                                                                          _fn(*a, **k))[1])
    monkeypatch.setattr(paf, "STREAM_MIN_VOXELS", length)
    with backend(native):
        prm = make_block(c, head_dim=head_dim).params()
        f = torch.randn(b, length, c, dtype=torch.float64)
        p = torch.randn(b, n, c, dtype=torch.float64)
        with torch.no_grad():
            pf = paf.prior_cross_attention_fused(f, p, prm.prior_attn, chunk, fold="never")
            fp = paf.feature_cross_attention_fused(f, p, prm.feat_attn, chunk, fold="never")
        assert len(calls) == 2
        torch.testing.assert_close(pf, cross_attention_sublayer(p, f, prm.prior_attn),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fp, cross_attention_sublayer(f, p, prm.feat_attn),
                                   rtol=1e-10, atol=1e-10)
        out = paf.feature_cross_attention_fused(f, p, prm.feat_attn, chunk, fold="never")
        assert len(calls) == 3 and out.requires_grad  # training on the CPU streams too
        monkeypatch.setattr(paf, "STREAM_MIN_VOXELS", length + 1)  # smaller volumes: SDPA
        out = paf.feature_cross_attention_fused(f, p, prm.feat_attn, chunk, fold="never")
        with torch.no_grad():
            paf.prior_cross_attention_fused(f, p, prm.prior_attn, chunk, fold="never")
        assert len(calls) == 3 and out.requires_grad


@pytest.mark.parametrize("native", BACKENDS)
def test_gradcheck_streamed_projected(native, one_thread):
    """float64 gradcheck of both streamed projected sublayers (three uneven chunks), and every
    gradient (weights included) equal to the reference's."""
    import hermes.ops.prior_attention_projected as proj

    with backend(native):
        prm = make_block(16, head_dim=8).params()
        f = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
        p = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
        for sub, ours, ref in (
            (prm.prior_attn, lambda f_, p_: proj.prior_cross_attention_projected(
                f_, p_, prm.prior_attn, 4), lambda f_, p_: cross_attention_sublayer(
                p_, f_, prm.prior_attn)),
            (prm.feat_attn, lambda f_, p_: proj.feature_cross_attention_projected(
                f_, p_, prm.feat_attn, 4), lambda f_, p_: cross_attention_sublayer(
                f_, p_, prm.feat_attn)),
        ):
            assert torch.autograd.gradcheck(ours, (f, p))
            leaves = [f, p, *(v for v in vars(sub).values() if isinstance(v, torch.Tensor))]
            out = ours(f, p)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, leaves, g)
            want = torch.autograd.grad(ref(f, p), leaves, g)
            for a_, b_ in zip(got, want, strict=True):
                torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-10)


def test_streamed_projected_ops_opcheck_and_strides():
    d = torch.float64
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 9, 8, dtype=d, generator=g)
    q = torch.randn(2, 2, 3, 4, dtype=d, generator=g)
    keys = torch.randn(2, 2, 4, 3, dtype=d, generator=g)
    w_kv, w_q = torch.randn(16, 8, dtype=d, generator=g), torch.randn(8, 8, dtype=d, generator=g)
    w_out, b_out = torch.randn(8, 8, dtype=d, generator=g), torch.randn(8, dtype=d, generator=g)
    w, b = torch.ones(8, dtype=d), torch.zeros(8, dtype=d)
    ops = torch.ops.hermes
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    f.requires_grad_(), q.requires_grad_(), w_kv.requires_grad_()
    gather = (f, q, w_kv, w, b, 1e-5, 4)
    attend = (f, keys, q, w_q, w_out, b_out, w, b, 1e-5, 4)
    torch.library.opcheck(ops.prior_gather_proj_fwd, gather, test_utils=tests)
    torch.library.opcheck(ops.feature_attend_proj_fwd, attend, test_utils=tests)
    for op, args in ((ops.prior_gather_proj_fwd, gather), (ops.feature_attend_proj_fwd, attend)):
        strided = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
                   if isinstance(t, torch.Tensor) and t.dim() > 1 else t for t in args]
        torch.testing.assert_close(op(*strided), op(*args), rtol=0, atol=0)


def test_block_float32_realistic_shape():
    """Level-3-like shape (C = 256, 8 heads), N = 26, default chunking, float32."""
    blk = make_block(256, dtype=torch.float32)
    f = torch.randn(1, 1500, 256, requires_grad=True)
    p = torch.randn(1, 26, 256, requires_grad=True)
    gf, gp = torch.randn_like(f), torch.randn_like(p)
    ref = _grads(prior_attention_block_reference, f, p, blk, gf, gp)
    out = _grads(paf.prior_attention_block_fused, f, p, blk, gf, gp)
    for a_, r_ in ((out[0], ref[0]), (out[1], ref[1])):
        torch.testing.assert_close(a_, r_, rtol=1e-4, atol=1e-4)
    names = ["features", "priors"] + [nm for nm, _ in blk.named_parameters()]
    for name, g_out, g_ref in zip(names, out[2], ref[2], strict=True):
        scale = g_ref.abs().max().clamp_min(1e-6)
        err = ((g_out - g_ref).abs().max() / scale).item()
        assert err < 2e-4, f"{name}: relative error {err:.2e}"


def test_multi_chunk_float32_level2_like():
    """Many chunks of the online softmax at C = 128 (level 2 width)."""
    blk = make_block(128, dtype=torch.float32)
    f = torch.randn(1, 3000, 128) * 2
    p = torch.randn(1, 26, 128)
    with torch.no_grad():
        ref = prior_attention_block_reference(f, p, blk.params())
        out = paf.prior_attention_block_fused(f, p, blk.params(), chunk=256)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)


def test_prior_gather_float16_long_volume_stays_finite():
    # Flat scores (zero folds) weight every voxel by 1 before normalising; with a LayerNorm
    # bias of 3 a single 40,000-voxel chunk sums to 120,000 > float16's 65504. The float16
    # chunk cap keeps every partial sum in range: the result is the voxels' mean, ~3.
    f = torch.randn(1, 40_000, 8).half()
    fold = torch.zeros(1, 2, 8, dtype=torch.float16)
    w, b = torch.ones(8, dtype=torch.float16), torch.full((8,), 3.0, dtype=torch.float16)
    z = paf.prior_gather(f, fold, w, b, 1e-5)
    ref = F.layer_norm(f.float(), (8,), w.float(), b.float(), 1e-5).mean(1)
    torch.testing.assert_close(z.float(), ref.expand(1, 2, 8), rtol=0, atol=2e-2)


def test_non_contiguous_inputs():
    blk = make_block(64)
    base = torch.randn(2, 64, 31, dtype=torch.float64)
    f = base.transpose(1, 2).requires_grad_(False)  # B x L x C view with channel stride L
    pbase = torch.randn(2, 9, 64, dtype=torch.float64)
    p = pbase[:, ::2]  # strided priors
    assert not f.is_contiguous() and not p.is_contiguous()
    with torch.no_grad():
        ref = prior_attention_block_reference(f, p, blk.params())
        out = paf.prior_attention_block_fused(f, p, blk.params(), chunk=8)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_mixed_null_padded_batch():
    """Samples with different task counts padded with the null token: each sample equals its
    own batch of one (padded the same way), and the batch equals the reference."""
    blk = make_block(64)
    c = 64
    task_table = torch.randn(6, c, dtype=torch.float64)  # last row = null token
    mods = torch.randn(2, 3, c, dtype=torch.float64)
    idx = torch.tensor([[0, 1, -1, -1], [2, 3, 4, -1], [-1, -1, -1, -1]])
    mod_idx = torch.tensor([0, 1, 1])
    priors = torch.cat([task_table[idx.remainder(6)], mods[mod_idx]], 1)  # B x 7 x C
    feats = torch.randn(3, 27, c, dtype=torch.float64)
    with torch.no_grad():
        ref = prior_attention_block_reference(feats, priors, blk.params())
        out = paf.prior_attention_block_fused(feats, priors, blk.params(), chunk=10)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
        for i in range(3):
            one = paf.prior_attention_block_fused(feats[i:i + 1], priors[i:i + 1], blk.params())
            torch.testing.assert_close(one[0], out[0][i:i + 1])
            torch.testing.assert_close(one[1], out[1][i:i + 1])


# ------------------------------------------------------------------------------------------------
# model switch, custom-op machinery, validation
# ------------------------------------------------------------------------------------------------


def test_model_uses_fused_by_default_and_switches(monkeypatch):
    torch.manual_seed(0)
    inter = PriorFeatureInteraction(64, depth=2).double()
    x = torch.randn(2, 64, 3, 4, 5, dtype=torch.float64)
    p = torch.randn(2, 5, 64, dtype=torch.float64)
    calls = []
    real = paf.prior_attention_block_fused
    monkeypatch.setattr(paf, "prior_attention_block_fused",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("HERMES_PRIOR_IMPL", raising=False)
    with torch.no_grad():
        fused = inter(x, p)
        assert len(calls) == 2
        paf.set_prior_impl(inter, "reference")
        ref = inter(x, p)
        assert len(calls) == 2
        paf.set_prior_impl(inter, None)
        monkeypatch.setenv("HERMES_PRIOR_IMPL", "reference")
        ref_env = inter(x, p)
        assert len(calls) == 2
        monkeypatch.setenv("HERMES_PRIOR_IMPL", "bogus")
        with pytest.raises(ValueError, match="HERMES_PRIOR_IMPL"):
            inter(x, p)
    torch.testing.assert_close(fused[0], ref[0])
    torch.testing.assert_close(fused[1], ref[1])
    torch.testing.assert_close(ref_env[0], ref[0])
    with pytest.raises(ValueError, match="implementation"):
        paf.set_prior_impl(inter, "fast")


def test_custom_ops_opcheck():
    """Schema, fake (meta) kernels and autograd registration of the torch.library ops."""
    d = torch.float64
    f = torch.randn(2, 7, 4, dtype=d, requires_grad=True)
    a = torch.randn(2, 6, 4, dtype=d, requires_grad=True)
    v = torch.randn(2, 6, 4, dtype=d, requires_grad=True)
    w, b = torch.ones(4, dtype=d, requires_grad=True), torch.zeros(4, dtype=d, requires_grad=True)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.hermes.prior_gather_fwd, (f, a, w, b, 1e-5, 3),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.hermes.feature_scatter_fwd, (f, a, v, w, b, b, 2, 1e-5, 3),
                          test_utils=tests)
    w1, b1 = torch.randn(8, 4, dtype=d, requires_grad=True), torch.randn(8, dtype=d)
    w2, b2 = torch.randn(4, 8, dtype=d, requires_grad=True), torch.randn(4, dtype=d)
    torch.library.opcheck(torch.ops.hermes.feature_mlp_fwd, (f, w, b, w1, b1, w2, b2, 1e-4, 3),
                          test_utils=tests)


def _strided(t):
    """The same values in a non-contiguous layout (last two dims swapped in memory)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


def test_every_custom_op_fake_kernel_matches_real_strides():
    """Fake (meta) kernels of all twelve ops, forward and backward, give the real results'
    shapes, dtypes and strides, also for non-contiguous inputs (what torch.compile relies on)."""
    d, g = torch.float64, torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, dtype=d, generator=g)

    f, a, v, w, b, ob = r(2, 7, 8), r(2, 6, 8), r(2, 6, 8), r(8), r(8), r(8)
    w1, b1, w2, b2 = r(16, 8), r(16), r(8, 16), r(8)
    q, wkv, keys, vals = r(2, 2, 3, 4), r(16, 8), r(2, 2, 4, 3), r(2, 2, 3, 4)
    wq, wo = r(8, 8), r(8, 8)
    ops = torch.ops.hermes
    z, lse = ops.prior_gather_fwd(f, a, w, b, 1e-5, 3)
    o, lse_p = ops.prior_gather_proj_fwd(f, q, wkv, w, b, 1e-5, 3)
    cases = [
        (ops.prior_gather_fwd, (f, a, w, b, 1e-5, 3)),
        (ops.prior_gather_bwd, (r(*z.shape), f, a, w, b, z, lse, 1e-5, 3)),
        (ops.feature_scatter_fwd, (f, a, v, w, b, ob, 2, 1e-5, 3)),
        (ops.feature_scatter_bwd, (r(*f.shape), f, a, v, w, b, 2, 1e-5, 3)),
        (ops.feature_mlp_fwd, (f, w, b, w1, b1, w2, b2, 1e-4, 3)),
        (ops.feature_mlp_bwd, (r(*f.shape), f, w, b, w1, b1, w2, 1e-4, 3)),
        (ops.prior_gather_proj_fwd, (f, q, wkv, w, b, 1e-5, 3)),
        (ops.prior_gather_proj_bwd, (r(*o.shape), f, q, wkv, w, b, o, lse_p, 1e-5, 3)),
        (ops.feature_attend_proj_fwd, (f, keys, vals, wq, wo, ob, w, b, 1e-5, 3)),
        (ops.feature_attend_proj_bwd, (r(*f.shape), f, keys, vals, wq, wo, w, b, 1e-5, 3)),
    ]
    tests = ("test_schema", "test_faketensor")
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=tests)
        torch.library.opcheck(op, tuple(_strided(t) for t in args), test_utils=tests)


def test_custom_ops_accept_non_contiguous_inputs():
    # the raw ops (as torch.compile or a user may call them) must not read strided tensors as
    # row-major buffers: same results as with contiguous copies
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 8, 30, generator=g).transpose(1, 2)  # B x L x C, channel stride L
    a = torch.randn(2, 8, 6, generator=g).transpose(1, 2)
    v = torch.randn(2, 6, 8, generator=g)
    w, b = torch.ones(16)[::2], torch.zeros(8)
    w1, b1 = torch.randn(8, 16, generator=g).t(), torch.randn(16, generator=g)
    w2, b2 = torch.randn(16, 8, generator=g).t(), torch.randn(8, generator=g)
    ops = torch.ops.hermes
    for args, op in (((f, a, w, b, 1e-5, 7), ops.prior_gather_fwd),
                     ((f, a, v, w, b, b, 2, 1e-5, 7), ops.feature_scatter_fwd),
                     ((f, w, b, w1, b1, w2, b2, 1e-5, 7), ops.feature_mlp_fwd)):
        dense = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in args]
        got, want = op(*args), op(*dense)
        for x, y in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_meta_device_shapes(monkeypatch):
    blk = make_block(64, dtype=torch.float32).to("meta")
    f = torch.empty(2, 100, 64, device="meta")
    p = torch.empty(2, 7, 64, device="meta")
    out_f, out_p = paf.prior_attention_block_fused(f, p, blk.params())
    assert out_f.shape == f.shape and out_p.shape == p.shape and out_f.device.type == "meta"
    monkeypatch.setattr(paf, "STREAM_MIN_VOXELS", 1)
    with torch.no_grad():  # the streamed projected ops' fake kernels
        out_f, out_p = paf.prior_attention_block_fused(f, p, blk.params(), fold="never")
    assert out_f.shape == f.shape and out_p.shape == p.shape and out_f.device.type == "meta"


def test_bad_inputs_raise_clear_errors():
    blk = make_block(64, dtype=torch.float32)
    prm = blk.params()
    f, p = torch.randn(1, 10, 64), torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="B x L x C"):
        paf.prior_attention_block_fused(f[0], p, prm)
    with pytest.raises(ValueError, match="disagree"):
        paf.prior_attention_block_fused(f, torch.randn(1, 3, 32), prm)
    with pytest.raises(ValueError, match="disagree"):
        paf.prior_attention_block_fused(f, torch.randn(2, 3, 64), prm)
    with pytest.raises(TypeError, match="dtype"):
        paf.prior_attention_block_fused(f, p.double(), prm)
    with pytest.raises(ValueError, match="at least one"):
        paf.prior_attention_block_fused(f[:, :0], p, prm)
    wrong = make_block(32, dtype=torch.float32).params()
    with pytest.raises(ValueError, match="do not match width"):
        paf.prior_attention_block_fused(torch.randn(1, 10, 32), torch.randn(1, 3, 32),
                                        prm)
    with pytest.raises(ValueError, match="do not match width"):
        paf.prior_attention_block_fused(f, p, wrong)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        paf.prior_attention_block_fused(f, p, prm, chunk=-4)
    with pytest.raises(ValueError, match="not divisible by heads"):
        paf.feature_scatter(f, torch.randn(1, 7, 64), torch.randn(1, 7, 64), prm.feat_attn
                            .norm_q_weight, prm.feat_attn.norm_q_bias, prm.feat_attn.b_out, 2,
                            1e-5)


@pytest.mark.parametrize("fold", ["auto", "never"])
def test_cpu_autocast_bfloat16_rule(fold, one_thread, monkeypatch):
    """Under autocast (F.linear in bf16) the fused block runs and obeys the precision rule
    |fused - fp32 ref| <= 2 |PyTorch bf16 - fp32 ref| + eps (folded; and streamed projected)."""
    monkeypatch.setattr(paf, "STREAM_MIN_VOXELS", 1)
    blk = make_block(64, dtype=torch.float32)
    f, p = torch.randn(1, 300, 64), torch.randn(1, 7, 64)
    with torch.no_grad():
        ref = prior_attention_block_reference(f, p, blk.params())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = prior_attention_block_reference(f.bfloat16(), p.bfloat16(), blk.params())
            ours = paf.prior_attention_block_fused(f.bfloat16(), p.bfloat16(), blk.params(),
                                                   chunk=128, fold=fold)
    for r_, s_, o_ in zip(ref, same, ours, strict=True):
        assert o_.dtype == torch.bfloat16
        err_ours = (o_.float() - r_).abs().max()
        err_torch = (s_.float() - r_).abs().max()
        assert err_ours <= 2 * err_torch + 1e-2 * r_.abs().max()


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a device)
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("fold, math_from", [("always", None), ("auto", None), ("auto", 1)])
def test_cuda_matches_cpu_reference_float32(fold, math_from, monkeypatch):
    """The fused kernels (``always``) and the GPU's default formulations (``auto``: SDPA, and
    explicit attention from ``GPU_MATH_MIN_VOXELS[_FORWARD]``, lowered here) against the CPU
    reference."""
    assert native_available(torch.device("cuda"), torch.float32), "built without CUDA kernels"
    if math_from is not None:
        monkeypatch.setattr(paf, "GPU_MATH_MIN_VOXELS", math_from)
        monkeypatch.setattr(paf, "GPU_MATH_MIN_VOXELS_FORWARD", math_from)
    blk = make_block(128, dtype=torch.float32)
    f = torch.randn(2, 3000, 128, requires_grad=True)
    p = torch.randn(2, 26, 128, requires_grad=True)
    gf, gp = torch.randn_like(f), torch.randn_like(p)
    ref = _grads(prior_attention_block_reference, f, p, blk, gf, gp)
    blk_c = blk.cuda()
    fc, pc = f.detach().cuda().requires_grad_(), p.detach().cuda().requires_grad_()
    out = _grads(lambda *a: paf.prior_attention_block_fused(*a, chunk=1000, fold=fold), fc, pc,
                 blk_c, gf.cuda(), gp.cuda())
    torch.testing.assert_close(out[0].cpu(), ref[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out[1].cpu(), ref[1], rtol=2e-3, atol=2e-3)
    for g_out, g_ref in zip(out[2], ref[2], strict=True):
        scale = g_ref.abs().max().clamp_min(1e-6)
        assert ((g_out.cpu() - g_ref).abs().max() / scale) < 5e-3
    with torch.no_grad():  # inference takes its own choices (explicit attention forward-only)
        inf = paf.prior_attention_block_fused(fc, pc, blk_c.params(), chunk=1000, fold=fold)
    for o_, r_ in zip(inf, ref[:2], strict=True):
        torch.testing.assert_close(o_.cpu(), r_, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("fold", ["always", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_rule(dtype, fold):
    """|kernel - fp32 ref| <= 2 |PyTorch same dtype - fp32 ref| + eps (outputs and grads)."""
    assert native_available(torch.device("cuda"), dtype), "built without CUDA kernels"
    blk = make_block(128, dtype=torch.float32).cuda()
    f = torch.randn(1, 4096, 128, device="cuda")
    p = torch.randn(1, 26, 128, device="cuda")
    gf, gp = torch.randn_like(f), torch.randn_like(p)

    def run(fn, module, dt):
        module = module.to(dt)
        ff, pp = f.to(dt).requires_grad_(), p.to(dt).requires_grad_()
        return _grads(fn, ff, pp, module, gf.to(dt), gp.to(dt))

    ref = run(prior_attention_block_reference, make_block(128, torch.float32).cuda(),
              torch.float32)
    same = run(prior_attention_block_reference, make_block(128, torch.float32).cuda(), dtype)
    # chunks of 1000 voxels: the online softmax rescales across chunks in half precision too
    ours = run(lambda *a: paf.prior_attention_block_fused(*a, chunk=1000, fold=fold),
               make_block(128, torch.float32).cuda(), dtype)
    eps = 1e-2 if dtype == torch.bfloat16 else 2e-3
    flat = lambda o: [o[0], o[1], *o[2]]  # noqa: E731
    for r_, s_, o_ in zip(flat(ref), flat(same), flat(ours), strict=True):
        scale = r_.abs().max().float()
        err_ours = (o_.float() - r_.float()).abs().max()
        err_torch = (s_.float() - r_.float()).abs().max()
        assert err_ours <= 2 * err_torch + eps * scale
    del blk


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_streamed_projected_forward(dtype, monkeypatch):
    """Inference with N = 82 (unfolded, streamed): float32 close to the reference, half
    precision by the |ours - fp32| <= 2 |PyTorch same dtype - fp32| + eps rule."""
    monkeypatch.setattr(paf, "STREAM_MIN_VOXELS", 1)
    blk = make_block(128, dtype=torch.float32).cuda()
    f = torch.randn(1, 5000, 128, device="cuda")
    p = torch.randn(1, 82, 128, device="cuda")
    with torch.no_grad():
        ref = prior_attention_block_reference(f, p, blk.params())
        blk_d = make_block(128, dtype=torch.float32).cuda().to(dtype)
        same = prior_attention_block_reference(f.to(dtype), p.to(dtype), blk_d.params())
        ours = paf.prior_attention_block_fused(f.to(dtype), p.to(dtype), blk_d.params(),
                                               chunk=1000, fold="never")
    for r_, s_, o_ in zip(ref, same, ours, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(o_, r_, rtol=2e-3, atol=2e-3)
        else:
            eps = (1e-2 if dtype == torch.bfloat16 else 2e-3) * r_.abs().max()
            assert (o_.float() - r_).abs().max() <= 2 * (s_.float() - r_).abs().max() + eps


@pytest.mark.parametrize("length, chunk", [(512, 504), (17, 16), (1, 8), (64, 8), (1000, 333)])
def test_chunks_are_balanced(length, chunk):
    """The voxels are split into the fewest chunks of at most ``chunk``, of equal size but the
    last (512 at most 504: two of 256, not 504 + 8), covering every voxel once in order."""
    spans = list(paf._chunks(length, chunk))
    sizes = [s1 - s0 for s0, s1 in spans]
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert len(spans) == -(-length // chunk) and max(sizes) <= chunk
    assert max(sizes) - min(sizes) <= len(spans)


def test_default_chunk_avoids_power_of_two_strides():
    """CPU chunks (the row stride of the transposed score buffers) are never powers of two, and
    stay within the per-thread budget."""
    for width in (3, 104, 128, 256, 328, 512, 1280, 10**6):
        chunk = paf.default_chunk(width, torch.device("cpu"))
        assert chunk & (chunk - 1) != 0 and 0 < chunk <= 1 << 16
        assert chunk * width <= max(256 * width, (1 << 18) * torch.get_num_threads())
