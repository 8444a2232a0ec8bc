"""Benchmark of one Hermes attention block: official formulation vs SDPA vs fused (ours).

Side by side in one run, at the three prior-fusion levels of a 128^3 crop (level 2: C=128,
L=32^3; level 3: C=256, L=16^3; level 4: C=320, L=8^3) with N = 26 and N = 82 prior tokens:

* ``official``: the published module structure: q / kv Linear layers, head split, einsum scores,
  softmax, einsum with the values, output Linear; MLP Linear -> GELU -> Linear.
* ``sdpa``: the same projections with ``torch.nn.functional.scaled_dot_product_attention``.
* ``fused``: :func:`hermes.ops.prior_attention_fused.prior_attention_block_fused`.

Two scopes: ``xattn`` (the two cross-attention sublayers only: priors <- features, then
features <- priors) and ``block`` (all four sublayers). Modes: forward (no grad) and forward +
backward (gradients of inputs and weights). Times are medians over interleaved repeats, with the
default allocator. Peak memory above the inputs and weights: the peak RSS of a child process
(CPU; reset before each run, glibc's mmap threshold lowered there so that freed buffers leave the
RSS) or ``torch.cuda.max_memory_allocated``. The floor column is the time of the voxel-sized GEMMs
of the cheapest exact formulation at the measured ``torch.mm`` rate (:func:`gemm_floor_flops`,
:func:`gemm_rate`); ``official / floor`` bounds the speed-up any exact implementation can reach.

Usage::

    python benchmarks/bench_prior_interaction.py            # full table, CPU (and CUDA if any)
    python benchmarks/bench_prior_interaction.py --quick    # CI smoke: tiny shapes, 1 repeat

Writes ``benchmarks/results/prior_interaction_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from proc_memory import reset_peak_rss, rss_bytes, status_bytes
from torch import Tensor

from hermes.ops.prior_attention import CrossAttentionParams, MLPParams, PriorBlockParams
from hermes.ops.prior_attention_fused import (
    feature_cross_attention_fused,
    prior_attention_block_fused,
    prior_cross_attention_fused,
)

LEVELS = {2: (128, 32**3), 3: (256, 16**3), 4: (320, 8**3)}
QUICK_LEVELS = {2: (64, 6 * 7 * 5), 3: (96, 4**3)}
IMPLS = ("official", "sdpa", "fused")
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# the two baselines, written from the published module structure
# ------------------------------------------------------------------------------------------------


def _official_attn(x_q: Tensor, x_kv: Tensor, p: CrossAttentionParams, sdpa: bool) -> Tensor:
    c = x_q.shape[-1]
    q = F.linear(F.layer_norm(x_q, (c,), p.norm_q_weight, p.norm_q_bias, p.eps), p.w_q)
    k, v = F.linear(F.layer_norm(x_kv, (c,), p.norm_kv_weight, p.norm_kv_bias, p.eps),
                    p.w_kv).chunk(2, dim=-1)
    b, lq, inner = q.shape
    d = inner // p.heads
    q, k, v = (t.reshape(b, -1, p.heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        attn = torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5
        out = torch.einsum("bhij,bhjd->bhid", attn.softmax(dim=-1), v)
    out = out.permute(0, 2, 1, 3).reshape(b, lq, inner)
    return x_q + F.linear(out, p.w_out, p.b_out)


def _official_mlp(x: Tensor, p: MLPParams) -> Tensor:
    h = F.layer_norm(x, (x.shape[-1],), p.norm_weight, p.norm_bias, p.eps)
    return x + F.linear(F.gelu(F.linear(h, p.w1, p.b1)), p.w2, p.b2)


def run_impl(impl: str, scope: str, f: Tensor, pr: Tensor, p: PriorBlockParams):
    """One scope (``xattn`` or ``block``) of one implementation -> (features, priors)."""
    if impl == "fused":
        if scope == "block":
            return prior_attention_block_fused(f, pr, p)
        pr = prior_cross_attention_fused(f, pr, p.prior_attn)
        return feature_cross_attention_fused(f, pr, p.feat_attn), pr
    sdpa = impl == "sdpa"
    pr = _official_attn(pr, f, p.prior_attn, sdpa)
    if scope == "block":
        pr = _official_mlp(pr, p.prior_mlp)
    f = _official_attn(f, pr, p.feat_attn, sdpa)
    if scope == "block":
        f = _official_mlp(f, p.feat_mlp)
    return f, pr


# ------------------------------------------------------------------------------------------------
# set-up and measurement
# ------------------------------------------------------------------------------------------------


def make_inputs(c: int, length: int, n: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Features 1 x L x C, priors 1 x N x C and block weights (all requiring grad)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    heads, inner, hidden = c // 32, (c // 32) * 32, 4 * c

    def attn():
        return CrossAttentionParams(1 + r(c, scale=0.1), r(c, scale=0.1), 1 + r(c, scale=0.1),
                                    r(c, scale=0.1), r(inner, c, scale=c**-0.5),
                                    r(2 * inner, c, scale=c**-0.5), r(c, inner, scale=inner**-0.5),
                                    r(c, scale=0.1), heads)

    def mlp():
        return MLPParams(1 + r(c, scale=0.1), r(c, scale=0.1), r(hidden, c, scale=c**-0.5),
                         r(hidden, scale=0.1), r(c, hidden, scale=hidden**-0.5), r(c, scale=0.1))

    p = PriorBlockParams(attn(), mlp(), attn(), mlp())
    for sub in (p.prior_attn, p.prior_mlp, p.feat_attn, p.feat_mlp):
        for name, v in vars(sub).items():
            if isinstance(v, Tensor):  # make the weights leaves again
                setattr(sub, name, v.detach().requires_grad_())
    return r(1, length, c), r(1, n, c), p


def _leaves(f: Tensor, pr: Tensor, p: PriorBlockParams) -> list[Tensor]:
    out = [f, pr]
    for sub in (p.prior_attn, p.prior_mlp, p.feat_attn, p.feat_mlp):
        out += [v for v in vars(sub).values() if isinstance(v, Tensor)]
    return out


def step(impl: str, scope: str, mode: str, f: Tensor, pr: Tensor, p: PriorBlockParams,
         grads: tuple[Tensor, Tensor]) -> None:
    """One forward (``fwd``, no grad) or forward + backward (``fwdbwd``)."""
    if mode == "fwd":
        with torch.no_grad():
            run_impl(impl, scope, f, pr, p)
        return
    fo, po = run_impl(impl, scope, f, pr, p)
    torch.autograd.backward([fo, po], list(grads))
    for t in _leaves(f, pr, p):
        t.grad = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(configs, device: str, dtype: torch.dtype, repeats: int,
             clock: str = "wall", inner: int = 1) -> dict:
    """Median seconds per (level, n, scope, mode, impl), impls interleaved within each repeat.

    Each sample times ``inner`` back-to-back calls (GPU: launches queue up as in a training
    loop, so the per-call host overhead overlaps the device work) and divides by ``inner``.

    ``clock="cpu"`` measures process CPU time instead of wall time: with one thread this is the
    work done, robust against other jobs on a shared host (with several threads it would count
    OpenMP spin-waiting).
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    out = {}
    for level, c, length, n in configs:
        f, pr, p = make_inputs(c, length, n, device, dtype)
        grads = (torch.randn_like(f), torch.randn_like(pr))
        for scope in ("xattn", "block"):
            for mode in ("fwd", "fwdbwd"):
                samples = {impl: [] for impl in IMPLS}
                for impl in IMPLS:  # warm-up
                    step(impl, scope, mode, f, pr, p, grads)
                for _ in range(repeats):
                    for impl in IMPLS:
                        _sync(device)
                        t0 = timer()
                        for _ in range(inner):
                            step(impl, scope, mode, f, pr, p, grads)
                        _sync(device)
                        samples[impl].append((timer() - t0) / inner)
                print(f"level {level} N={n} {scope} {mode}: " + ", ".join(
                    f"{i} {statistics.median(samples[i]) * 1e3:.1f} ms" for i in IMPLS),
                    file=sys.stderr, flush=True)
                for impl in IMPLS:
                    out[(level, n, scope, mode, impl)] = statistics.median(samples[impl])
    return out


def gemm_floor_flops(c: int, length: int, n: int, scope: str, mode: str) -> float:
    """Floating-point operations of the voxel-sized GEMMs of the cheapest exact formulation.

    Per voxel and cross-attention sublayer, the folded form multiplies ``2 H N C`` and the
    projected form ``2 (C I + N I)`` (I = H * 32; each sublayer has two such GEMM halves, so the
    two sublayers together cost ``4 min(H N C, C I + N I)``); the feature MLP ``8 C^2`` (C x 4C
    twice). A backward costs two GEMMs per forward GEMM (no recomputation counted), so
    forward + backward is 3x forward. Prior-sized (N x C) work is left out: a lower bound.
    """
    heads = c // 32
    inner = heads * 32
    macs = 4 * min(heads * n * c, c * inner + n * inner)
    if scope == "block":
        macs += 8 * c * c
    return 2.0 * macs * length * (3 if mode == "fwdbwd" else 1)


def memory_floor_bytes(c: int, length: int, n: int, scope: str, mode: str,
                       itemsize: int) -> int:
    """Bytes any implementation holds at its peak above the inputs and weights: the outputs
    (features L x C, priors N x C) and, for forward + backward, the gradients of the inputs and
    of the scope's weights (an attention sublayer ``5 C + 4 I C`` values, an MLP ``7 C + 8 C^2``),
    with the shapes of :func:`make_inputs`. Scratch and saved activations are left out: a lower
    bound.
    """
    inner = (c // 32) * 32
    tokens = (length + n) * c
    if mode == "fwd":
        return tokens * itemsize
    weights = 2 * (5 * c + 4 * inner * c)
    if scope == "block":
        weights += 2 * (7 * c + 8 * c * c)
    return (2 * tokens + weights) * itemsize


def gemm_rate(device: str, dtype: torch.dtype, clock: str = "wall") -> float:
    """Best measured ``torch.mm`` rate (FLOP/s): the floor's GEMM speed.

    A 1024^3 product on the CPU; on a GPU ten back-to-back 4096^3 products per sample, so that
    launch latency does not count.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    gpu = device.startswith("cuda")
    size, inner = (4096, 10) if gpu else (1024, 1)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(6):
        _sync(device)
        t0 = timer()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (timer() - t0) / inner)
    return 2 * size**3 / best


def _peak_rss_bytes() -> int:
    peak = status_bytes("VmHWM")
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak


def memory_all(configs, device: str, dtype: torch.dtype) -> dict:
    """Peak extra bytes above inputs and weights per (level, n, scope, mode, impl).

    CUDA: ``max_memory_allocated``. CPU: the kernel's peak RSS (reset before each run through
    /proc/self/clear_refs), meaningful in the child process of ``_cpu_memory``, whose lowered
    mmap threshold makes freed tensors leave the RSS at once (torch's CPU allocator does not
    cache).
    """
    out = {}
    if not device.startswith("cuda") and not reset_peak_rss():
        return out
    for level, c, length, n in configs:
        f, pr, p = make_inputs(c, length, n, device, dtype)
        grads = (torch.randn_like(f), torch.randn_like(pr))
        for scope in ("xattn", "block"):
            for mode in ("fwd", "fwdbwd"):
                for impl in IMPLS:
                    step(impl, scope, mode, f, pr, p, grads)  # warm-up (workspaces, caches)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        step(impl, scope, mode, f, pr, p, grads)
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() - base
                    else:
                        reset_peak_rss()
                        base = rss_bytes()
                        step(impl, scope, mode, f, pr, p, grads)
                        peak = _peak_rss_bytes() - base
                    out[(level, n, scope, mode, impl)] = max(peak, 0)
    return out


def _cpu_memory(argv: list[str]) -> dict:
    """CPU peak memory, measured in a child process whose glibc returns freed memory at once
    (mmap threshold 64 KiB) so that the resident set follows the live tensors. Timings stay in
    this process with the default allocator, as users run (the lowered threshold would add page
    faults to every allocation above 64 KiB)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.json"
        subprocess.run([sys.executable, __file__, *argv, "--memory-json", str(path)], env=env,
                       check=True)
        return {tuple(r[:-1]): r[-1] for r in json.loads(path.read_text())}


def render(times: dict, mems: dict, floors: dict, mem_floors: dict, configs, device_name: str,
           rate: float) -> str:
    mib = 1 << 20
    lines = [f"Device: {device_name}; GEMM rate {rate / 1e9:.0f} GFLOP/s (torch.mm 1024^3, best of "
             "6). Floor: the voxel-sized GEMMs of the cheapest exact formulation at that rate "
             "(gemm_floor_flops); max = official / floor, the largest speed-up any exact "
             "implementation could reach. Memory floor: outputs and gradients, which every "
             "implementation holds (memory_floor_bytes); min = floor / official, the smallest "
             "fused/official ratio any implementation could reach.", "",
             "| level | C | L | N | scope | mode | official ms | sdpa ms | fused ms | "
             "speed-up vs official | vs sdpa | floor ms | fused/floor | max vs official | "
             "peak MiB official | sdpa | fused | fused/official | floor MiB | min vs official |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for level, c, length, n in configs:
        for scope in ("xattn", "block"):
            for mode in ("fwd", "fwdbwd"):
                key = (level, n, scope, mode)
                t = {i: times[(*key, i)] * 1e3 for i in IMPLS}
                m = {i: mems.get((*key, i), float("nan")) / mib for i in IMPLS}
                floor = floors[key] * 1e3
                # peaks under 0.1 MiB (tiny --quick shapes) give no meaningful ratio
                ok = m["official"] >= 0.1
                ratio = f"{m['fused'] / m['official']:.2f}" if ok else "-"
                mem_floor = mem_floors[key] / mib
                least = f"{mem_floor / m['official']:.2f}" if ok else "-"
                lines.append(
                    f"| {level} | {c} | {length} | {n} | {scope} | {mode} | {t['official']:.1f} | "
                    f"{t['sdpa']:.1f} | {t['fused']:.1f} | {t['official'] / t['fused']:.2f}x | "
                    f"{t['sdpa'] / t['fused']:.2f}x | {floor:.3g} | {t['fused'] / floor:.2f} | "
                    f"{t['official'] / floor:.2f}x | {m['official']:.0f} | {m['sdpa']:.0f} | "
                    f"{m['fused']:.0f} | {ratio} | {mem_floor:.3g} | {least} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (CI smoke)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=None,
                    help="calls per timed sample (default 1 on the CPU, 10 on a GPU)")
    ap.add_argument("--levels", default="2,3,4")
    ap.add_argument("--priors", default="26,82")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall time, or process CPU time (meaningful with --threads 1 on a "
                    "shared host)")
    ap.add_argument("--out", default=None, help="output stem (default results/prior_interaction_"
                    "<device>)")
    ap.add_argument("--memory-json", default=None, help=argparse.SUPPRESS)  # internal: CPU child
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    levels = QUICK_LEVELS if args.quick else LEVELS
    wanted = [int(v) for v in args.levels.split(",")]
    priors = [5] if args.quick else [int(v) for v in args.priors.split(",")]
    configs = [(lv, *levels[lv], n) for lv in levels if lv in wanted or args.quick
               for n in priors]
    repeats = 1 if args.quick else args.repeats
    if args.clock == "cpu" and device != "cpu":
        raise SystemExit("--clock cpu is for CPU runs")
    if args.memory_json:  # the CPU memory child (see _cpu_memory)
        mems = memory_all(configs, device, dtype)
        Path(args.memory_json).write_text(json.dumps([[*k, v] for k, v in mems.items()]))
        return 0
    inner = args.inner or (10 if device.startswith("cuda") else 1)
    times = time_all(configs, device, dtype, repeats, args.clock, inner)
    rate = gemm_rate(device, dtype, args.clock)
    floors = {(lv, n, s, m): gemm_floor_flops(c, length, n, s, m) / rate
              for lv, c, length, n in configs for s in ("xattn", "block")
              for m in ("fwd", "fwdbwd")}
    mem_floors = {(lv, n, s, m): memory_floor_bytes(c, length, n, s, m, dtype.itemsize)
                  for lv, c, length, n in configs for s in ("xattn", "block")
                  for m in ("fwd", "fwdbwd")}
    if args.no_memory:
        mems = {}
    elif device == "cpu":
        mems = _cpu_memory(argv if argv is not None else sys.argv[1:])
    else:
        mems = memory_all(configs, device, dtype)
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, " \
                      f"{torch.get_num_threads()} threads"
    device_name += f", {args.clock} clock"
    table = render(times, mems, floors, mem_floors, configs, device_name, rate)
    print(table)
    stem = Path(args.out) if args.out else RESULTS / (
        f"prior_interaction_{device.split(':')[0]}" + ("_quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {"level": lv, "n": n, "scope": s, "mode": m, "impl": i, "seconds": v,
         "peak_bytes": mems.get((lv, n, s, m, i)),
         "floor_seconds": floors[(lv, n, s, m)], "floor_bytes": mem_floors[(lv, n, s, m)]}
        for (lv, n, s, m, i), v in times.items()
    ]
    meta = {"device": device_name, "dtype": args.dtype, "repeats": repeats, "inner": inner,
            "clock": args.clock, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gemm_flops_per_s": rate,
            "configs": [{"level": lv, "C": c, "L": length, "N": n} for lv, c, length, n in configs]}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {stem.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
