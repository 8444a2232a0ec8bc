"""Each formulation of each prior-attention sublayer, timed alone: the data behind the fused op's
per-device choices (:func:`hermes.ops.prior_attention_fused.choose_formulation`).

For each level (as in ``bench_prior_interaction.py``), N, dtype and mode (forward without grad,
forward + backward) this times, interleaved in one process:

* priors <- features and features <- priors, each as ``fold`` (the folded streaming op),
  ``stream`` (the streamed projected op), ``sdpa`` (projections + PyTorch's
  scaled_dot_product_attention) and ``math`` (projections + explicit scores/softmax/values);
* the feature MLP as ``fused`` (the chunked op that recomputes its hidden layer) and ``plain``
  (PyTorch's layers, hidden layer kept for backward);
* the whole fused block as the op chooses (``auto``), for reference.

Times are medians over ``--repeats`` samples of ``--inner`` back-to-back calls. Writes a table
and ``benchmarks/results/prior_formulations_<device>[_quick].json``.

Usage: ``python benchmarks/bench_prior_formulations.py [--device cuda] [--dtypes float32,bfloat16]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_prior_interaction import LEVELS, QUICK_LEVELS, _leaves, _sync, make_inputs

from hermes.ops import prior_attention_fused as paf
from hermes.ops import prior_attention_projected as pap
from hermes.ops.prior_attention import mlp_sublayer

RESULTS = Path(__file__).resolve().parent / "results"


def _sublayer(side: str, form: str):
    """One formulation of priors <- features (``side="prior"``) or features <- priors."""
    prior = side == "prior"

    def run(f, pr, p):
        a = p.prior_attn if prior else p.feat_attn
        if form == "fold":
            op = paf.prior_cross_attention_fused if prior else paf.feature_cross_attention_fused
            return op(f, pr, a, fold="always")
        if form == "stream":
            op = pap.prior_cross_attention_projected if prior \
                else pap.feature_cross_attention_projected
            return op(f, pr, a)
        return paf._projected_cross_attention(*((pr, f) if prior else (f, pr)), a, core=form)
    return run


FORMS = ("fold", "stream", "sdpa", "math")

CASES = {
    "prior_attn": {form: _sublayer("prior", form) for form in FORMS},
    "feat_attn": {form: _sublayer("feature", form) for form in FORMS},
    "feat_mlp": {"fused": lambda f, pr, p: paf.feature_mlp_fused(f, p.feat_mlp, streamed=True),
                 "plain": lambda f, pr, p: mlp_sublayer(f, p.feat_mlp)},
    "block": {"auto": lambda f, pr, p: paf.prior_attention_block_fused(f, pr, p)[0]},
}


def _call(fn, mode: str, f, pr, p) -> None:
    if mode == "fwd":
        with torch.no_grad():
            fn(f, pr, p)
        return
    out = fn(f, pr, p)
    out.backward(torch.ones_like(out))
    for t in _leaves(f, pr, p):
        t.grad = None


def _profile(forms: dict, mode: str, f, pr, p, gpu: bool) -> None:
    """torch.profiler's operators of one call of each folded / fused form (host and device)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for form in ("fold", "fused", "auto"):
        if form in forms:
            with profile(activities=acts) as prof:
                _call(forms[form], mode, f, pr, p)
                _sync("cuda" if gpu else "cpu")
            key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            print(f"--- profile {form} {mode}")
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--priors", default="26,82")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=None, help="default 1 on the CPU, 10 on a GPU")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    ap.add_argument("--shapes", default=None,
                    help="CxL pairs instead of the levels, e.g. 128x8192,128x13824")
    ap.add_argument("--parts", default=",".join(CASES), help="subset of " + ",".join(CASES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators of each fused form")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    inner = args.inner or (10 if gpu else 1)
    levels = QUICK_LEVELS if args.quick else LEVELS
    if args.shapes:
        levels = {f"{c}x{n}": (int(c), int(n))
                  for c, n in (v.split("x") for v in args.shapes.split(","))}
    parts = {k: CASES[k] for k in args.parts.split(",")}
    priors = [5] if args.quick else [int(v) for v in args.priors.split(",")]
    repeats = 1 if args.quick else args.repeats
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for level, (c, length) in levels.items():
            for n in priors:
                f, pr, p = make_inputs(c, length, n, args.device, dtype)
                for part, forms in parts.items():
                    for mode in ("fwd", "fwdbwd"):
                        samples = {form: [] for form in forms}
                        for fn in forms.values():  # warm-up
                            _call(fn, mode, f, pr, p)
                        for _ in range(repeats):
                            for form, fn in forms.items():
                                _sync(args.device)
                                t0 = time.perf_counter()
                                for _ in range(inner):
                                    _call(fn, mode, f, pr, p)
                                _sync(args.device)
                                samples[form].append((time.perf_counter() - t0) / inner)
                        times = {form: statistics.median(v) for form, v in samples.items()}
                        best = min(times, key=times.get)
                        print(f"{dtype_name:<8} L{level} N={n:<3} {part:<10} {mode:<6} "
                              + "  ".join(f"{k} {v * 1e3:7.3f}" for k, v in times.items())
                              + f"   best {best}", flush=True)
                        if args.profile:
                            _profile(forms, mode, f, pr, p, gpu)
                        records += [{"dtype": dtype_name, "level": level, "C": c, "L": length,
                                     "N": n, "part": part, "mode": mode, "form": k,
                                     "seconds": v} for k, v in times.items()]
    device = torch.cuda.get_device_name(args.device) if gpu else "cpu"
    out = args.out or RESULTS / (f"prior_formulations_{'cuda' if gpu else 'cpu'}"
                                 f"{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"device": device, "torch": torch.__version__,
                                        "repeats": repeats, "inner": inner},
                               "results": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
