// CPU (OpenMP) kernels of the sliding-window patch aggregation; see hermes/aggregate.h.
#include "hermes/aggregate.h"
#include "hermes/cpu_math.h"
#include "hermes/macros.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef HERMES_WITH_OPENMP
#include <omp.h>
#endif


namespace hermes {
namespace aggregate {

namespace {

// float32 -> float16 bits, round to nearest even (same result as torch's .half()). All three
// cases are computed and one is masked in (no branches), so that loops around it vectorise.
HERMES_ALWAYS_INLINE uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7fffffffu;
  // >= 65520 (rounds to inf), inf or nan
  const uint32_t special = 0x7c00u | (static_cast<uint32_t>(mag > 0x7f800000u) << 9);
  // below the smallest normal half: let the FPU round the subnormal (adding 0.5 aligns its bits)
  float f;
  std::memcpy(&f, &mag, sizeof(f));
  f += 0.5f;
  uint32_t sub;
  std::memcpy(&sub, &f, sizeof(sub));
  sub -= 0x3f000000u;
  // normal: rebias the exponent (127 -> 15) and round half to even
  const uint32_t normal = (mag + 0xc8000fffu + ((mag >> 13) & 1u)) >> 13;
  const uint32_t is_special = 0u - static_cast<uint32_t>(mag >= 0x47800000u);  // all ones or 0
  const uint32_t is_sub = 0u - static_cast<uint32_t>(mag < 0x38800000u);
  const uint32_t r = (special & is_special) | (sub & is_sub) | (normal & ~(is_special | is_sub));
  return static_cast<uint16_t>(sign | r);
}

// The logistic function through the polynomial exp (within a few ulp of 1 / (1 + exp(-v))).
HERMES_ALWAYS_INLINE float logistic(float v, const ExpBounds& e) {
  return 1.0f / (1.0f + poly_exp(-v, e.lo, e.hi));
}

}  // namespace

namespace {

// A window of the batch that covers a global plane: its index b in the batch, corner, and the
// plane's weight factor wz[z - sz].
struct PlaneWindow {
  int64_t b, sz, sy;
  int64_t gx, split;  // stored column of the window's first one; columns before the wrap
  float fz;
};

// Windows added together per pass; rows prefetched ahead.
constexpr int64_t kGroup = 8;
constexpr int64_t kAhead = 4;

// Prefetches the n floats at p, one request per 64-byte line, four per step: short runs at
// large strides defeat the hardware prefetchers, and requests sent in one burst arrive
// together (a plain loop of single requests, or one spread over the row, is 15-30 % slower;
// GCC's unroll pragma does not survive link-time optimisation).
template <int kWrite>
HERMES_ALWAYS_INLINE void prefetch_run(const float* p, int64_t n) {
  int64_t x = 0;
  for (; x + 64 <= n; x += 64) {
    __builtin_prefetch(p + x, kWrite);
    __builtin_prefetch(p + x + 16, kWrite);
    __builtin_prefetch(p + x + 32, kWrite);
    __builtin_prefetch(p + x + 48, kWrite);
  }
  for (; x < n; x += 16) __builtin_prefetch(p + x, kWrite);
}

// d[i] += src[i * sxs] * w(fzy, wx[i]) for i < n (sxs == 1: the fast, vectorised path).
HERMES_ALWAYS_INLINE void add_run(float* __restrict__ d, const float* __restrict__ src,
                                  int64_t sxs, const float* __restrict__ wx, int64_t n, float fzy,
                                  float clamp_min) {
  if (sxs == 1) {
    for (int64_t x = 0; x < n; ++x) d[x] += src[x] * window_weight(fzy, wx[x], clamp_min);
  } else {
    for (int64_t x = 0; x < n; ++x) d[x] += src[x * sxs] * window_weight(fzy, wx[x], clamp_min);
  }
}

// Adds global plane z of every window in `wins` (ascending b): each accumulator row is loaded
// once, gets the contributions of all windows covering it in batch order, and is stored once,
// so a batch of overlapping windows moves the shared rows through memory once (the same sums,
// in the same order, as adding the windows one after another). Weights are computed on the
// fly (window_weight). Global row y is stored at row y % H and a window's row in one run, or in
// two where its columns wrap at W: the caller keeps the rows (columns) of one call within H (W)
// consecutive ones, so that no two of them share a stored row (column).
HERMES_MULTIVERSION
void add_plane(float* acc, float* wsum, const AccGeometry& geom, const float* patches,
               const PatchStrides& st, const WindowWeights& wt, int64_t z,
               const PlaneWindow* wins, int64_t nwin, bool add_weight) {
  const int64_t C = geom.channels, L = geom.ring, H = geom.height, W = geom.width;
  const int64_t plane = H * W;
  const int64_t gz = z % L;
  const int64_t rh = wt.roi_h, rw = wt.roi_w;
  const float clamp_min = wt.clamp_min;
  const float* __restrict__ wx = wt.wx;
  int64_t y_lo = wins[0].sy, y_hi = 0;
  for (int64_t k = 0; k < nwin; ++k) {
    y_lo = std::min(y_lo, wins[k].sy);
    y_hi = std::max(y_hi, wins[k].sy + rh);
  }
  const int64_t gy_lo = y_lo % H;  // stored row of y_lo; later rows step and wrap at H
  auto next = [H](int64_t gy, int64_t step) { return gy + step >= H ? gy + step - H : gy + step; };
  if (add_weight) {
    for (int64_t y = y_lo, gy = gy_lo; y < y_hi; ++y, gy = next(gy, 1)) {
      float* dst = wsum + gz * plane + gy * W;
      for (int64_t k = 0; k < nwin; ++k) {
        const PlaneWindow& w = wins[k];
        if (y < w.sy || y >= w.sy + rh) continue;
        const float fzy = w.fz * wt.wy[y - w.sy];
        float* __restrict__ d = dst + w.gx;
        for (int64_t x = 0; x < w.split; ++x) d[x] += window_weight(fzy, wx[x], clamp_min);
        for (int64_t x = w.split; x < rw; ++x)
          dst[x - w.split] += window_weight(fzy, wx[x], clamp_min);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* dst_plane = acc + (c * L + gz) * plane;
    for (int64_t y = y_lo, gy = gy_lo; y < y_hi; ++y, gy = next(gy, 1)) {
      float* dst_row = dst_plane + gy * W;
      for (int64_t k = 0; k < nwin; ++k) {
        const PlaneWindow& w = wins[k];
        if (y < w.sy || y >= w.sy + rh) continue;
        const float* src =
            patches + w.b * st.batch + c * st.c + (z - w.sz) * st.z + (y - w.sy) * st.y;
        if (y + kAhead < w.sy + rh) {  // the rows kAhead ahead
          const float* ahead = dst_plane + next(gy, kAhead) * W;
          prefetch_run<1>(ahead + w.gx, w.split);
          prefetch_run<1>(ahead, rw - w.split);
          if (st.x == 1) prefetch_run<0>(src + kAhead * st.y, rw);
        }
        const float fzy = w.fz * wt.wy[y - w.sy];
        add_run(dst_row + w.gx, src, st.x, wx, w.split, fzy, clamp_min);
        if (w.split < rw) {
          add_run(dst_row, src + w.split * st.x, st.x, wx + w.split, rw - w.split, fzy,
                  clamp_min);
        }
      }
    }
  }
}

}  // namespace

void add_patches_cpu(float* acc, float* wsum, const AccGeometry& geom, const float* patches,
                     const PatchStrides& strides, const int64_t* starts, int64_t count,
                     const WindowWeights& weights, bool add_weight) {
  const int64_t roi[3] = {weights.roi_d, weights.roi_h, weights.roi_w};
  const int64_t size[3] = {geom.ring, geom.height, geom.width};
  // Windows go in groups of up to kGroup consecutive ones; a group is added plane by plane
  // (the planes are independent). Groups whose planes, rows or columns would alias in the
  // accumulator are split.
  for (int64_t g0 = 0; g0 < count;) {
    int64_t lo[3], hi[3], g1 = g0 + 1;
    for (int a = 0; a < 3; ++a) hi[a] = (lo[a] = starts[3 * g0 + a]) + roi[a];
    for (; g1 < count && g1 - g0 < kGroup; ++g1) {
      bool fits = true;
      for (int a = 0; a < 3; ++a) {
        const int64_t s = starts[3 * g1 + a];
        fits = fits && std::max(hi[a], s + roi[a]) - std::min(lo[a], s) <= size[a];
      }
      if (!fits) break;
      for (int a = 0; a < 3; ++a) {
        lo[a] = std::min(lo[a], starts[3 * g1 + a]);
        hi[a] = std::max(hi[a], starts[3 * g1 + a] + roi[a]);
      }
    }
    const int64_t z_lo = lo[0], z_hi = hi[0], rd = roi[0], W = geom.width;
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 2)
#endif
    for (int64_t z = z_lo; z < z_hi; ++z) {
      PlaneWindow wins[kGroup];
      int64_t nwin = 0;
      for (int64_t b = g0; b < g1; ++b) {
        const int64_t sz = starts[3 * b];
        if (z < sz || z >= sz + rd) continue;
        const int64_t gx = starts[3 * b + 2] % W;
        wins[nwin++] = PlaneWindow{b, sz, starts[3 * b + 1], gx, std::min(roi[2], W - gx),
                                   weights.wz[z - sz]};
      }
      if (nwin > 0)
        add_plane(acc, wsum, geom, patches, strides, weights, z, wins, nwin, add_weight);
    }
    g0 = g1;
  }
}

namespace {

// Rows per finalisation block: each channel is read as one run of up to kRowBlock rows (longer
// streams than single rows for the prefetchers), the label scratch stays in the L1/L2 caches.
constexpr int64_t kRowBlock = 16;

// Finalizes global rows [ya, yb) x columns [xa, xb) of global plane z (inside the crop; the
// columns stored in one run) into the output; `best` and `arg` hold (yb - ya) x (xb - xa) floats.
HERMES_MULTIVERSION
void finalize_rows(const FinalizeArgs& a, int64_t z, int64_t ya, int64_t yb, int64_t xa,
                   int64_t xb, float* __restrict__ best, float* __restrict__ arg) {
  const int64_t C = a.geom.channels, L = a.geom.ring, H = a.geom.height, W = a.geom.width;
  const int64_t plane = H * W;
  const int64_t gz = z % L, gx = xa % W;
  const int64_t n = xb - xa;
  const int64_t out_plane = a.out_h * a.out_w;
  const int64_t out_volume = a.out_d * out_plane;
  auto wrow = [&](int64_t y) -> const float* { return a.wsum + gz * plane + (y % H) * W + gx; };
  auto acc_row = [&](int64_t c, int64_t y) -> const float* {
    return a.acc + (c * L + gz) * plane + (y % H) * W + gx;
  };
  auto out_row = [&](int64_t y) -> int64_t {
    return (z - a.out_z0) * out_plane + (y - a.y0) * a.out_w + (xa - a.x0);
  };
  const ExpBounds exp_bounds;
  switch (a.kind) {
    case kOutFloat32: {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t y = ya; y < yb; ++y) {
          const float* __restrict__ src = acc_row(c, y);
          const float* __restrict__ w = wrow(y);
          float* __restrict__ dst = static_cast<float*>(a.out) + c * out_volume + out_row(y);
          if (a.sigmoid) {
            for (int64_t x = 0; x < n; ++x) dst[x] = logistic(src[x] / w[x], exp_bounds);
          } else {
            for (int64_t x = 0; x < n; ++x) dst[x] = src[x] / w[x];
          }
        }
      }
      break;
    }
    case kOutFloat16: {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t y = ya; y < yb; ++y) {
          const float* __restrict__ src = acc_row(c, y);
          const float* __restrict__ w = wrow(y);
          uint16_t* __restrict__ dst =
              static_cast<uint16_t*>(a.out) + c * out_volume + out_row(y);
          if (a.sigmoid) {  // two simple loops vectorise better than one
            for (int64_t x = 0; x < n; ++x) best[x] = logistic(src[x] / w[x], exp_bounds);
            for (int64_t x = 0; x < n; ++x) dst[x] = float_to_half_bits(best[x]);
          } else {
            for (int64_t x = 0; x < n; ++x) dst[x] = float_to_half_bits(src[x] / w[x]);
          }
        }
      }
      break;
    }
    case kOutMask: {
      const float t = a.threshold;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t y = ya; y < yb; ++y) {
          const float* __restrict__ src = acc_row(c, y);
          const float* __restrict__ w = wrow(y);
          uint8_t* __restrict__ dst = static_cast<uint8_t*>(a.out) + c * out_volume + out_row(y);
          for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<uint8_t>(src[x] / w[x] >= t);
        }
      }
      break;
    }
    default: {  // labels; the running argmax is kept as a float so that the loop vectorizes
      for (int64_t y = ya; y < yb; ++y) {
        const float* __restrict__ src = acc_row(0, y);
        const float* __restrict__ w = wrow(y);
        float* __restrict__ b = best + (y - ya) * n;
        float* __restrict__ g = arg + (y - ya) * n;
        for (int64_t x = 0; x < n; ++x) {
          b[x] = src[x] / w[x];
          g[x] = 0.0f;
        }
      }
      for (int64_t c = 1; c < C; ++c) {
        const float cf = static_cast<float>(c);
        for (int64_t y = ya; y < yb; ++y) {
          const float* __restrict__ src = acc_row(c, y);
          const float* __restrict__ w = wrow(y);
          float* __restrict__ b = best + (y - ya) * n;
          float* __restrict__ g = arg + (y - ya) * n;
          // Written as max and arithmetic, not as selects: GCC turns `b = better ? v : b`
          // into masked stores, which are slow on AMD CPUs. Same results: max(b, v) is
          // (b < v) ? v : b, strict so ties keep the lowest channel; the channel indices are
          // small integers, so g + 1 * (c - g) is exactly c and g + 0 * (c - g) exactly g.
          // A NaN logit makes the best value NaN for good (as torch.max does), so the
          // voxel's label is 0 whichever channel the NaN is in.
          for (int64_t x = 0; x < n; ++x) {
            const float v = src[x] / w[x];
            const float bx = b[x], gx = g[x];
            const float better = bx < v ? 1.0f : 0.0f;
            const float m = std::max(bx, v);
            b[x] = v != v ? v : m;
            g[x] = gx + better * (cf - gx);
          }
        }
      }
      const float t = a.threshold;
      for (int64_t y = ya; y < yb; ++y) {
        const float* __restrict__ b = best + (y - ya) * n;
        const float* __restrict__ g = arg + (y - ya) * n;
        if (a.kind == kOutLabelU8) {
          uint8_t* __restrict__ dst = static_cast<uint8_t*>(a.out) + out_row(y);
          for (int64_t x = 0; x < n; ++x)
            dst[x] = static_cast<uint8_t>(b[x] >= t ? static_cast<int32_t>(g[x]) + 1 : 0);
        } else {
          uint16_t* __restrict__ dst = static_cast<uint16_t*>(a.out) + out_row(y);
          for (int64_t x = 0; x < n; ++x)
            dst[x] = static_cast<uint16_t>(b[x] >= t ? static_cast<int32_t>(g[x]) + 1 : 0);
        }
      }
      break;
    }
  }
}

}  // namespace

void finalize_cpu(const FinalizeArgs& a) {
  const int64_t C = a.geom.channels, L = a.geom.ring, H = a.geom.height, W = a.geom.width;
  const int64_t plane = H * W;
  const int64_t rows = a.r1 - a.r0;
  const int64_t blocks_per_plane = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t blocks = (a.z1 - a.z0) * blocks_per_plane;
  // the columns in at most two runs of stored columns (they wrap at W)
  const int64_t wrap = std::min(a.q1, a.q0 + W - a.q0 % W);
  const int64_t runs[2][2] = {{a.q0, wrap}, {wrap, a.q1}};
  const int64_t n = std::max<int64_t>(std::min(a.x1, a.q1) - std::max(a.x0, a.q0), 0);
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel
#endif
  {
    std::vector<float> best(static_cast<size_t>(kRowBlock * n) + 1);
    std::vector<float> arg(static_cast<size_t>(kRowBlock * n) + 1);
#ifdef HERMES_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < blocks; ++r) {
      const int64_t z = a.z0 + r / blocks_per_plane;
      const int64_t ya = a.r0 + (r % blocks_per_plane) * kRowBlock;
      const int64_t yb = std::min(ya + kRowBlock, a.r1);
      const int64_t ca = std::max(ya, a.y0), cb = std::min(yb, a.y1);  // inside the crop
      for (const auto& run : runs) {
        const int64_t xa = std::max(run[0], a.x0), xb = std::min(run[1], a.x1);
        if (ca < cb && xa < xb) finalize_rows(a, z, ca, cb, xa, xb, best.data(), arg.data());
      }
      if (a.zero_after) {  // the stored rows and columns, in runs split where they wrap
        const int64_t gz = z % L;
        const bool whole = a.q0 % W == 0 && a.q1 - a.q0 == W;  // consecutive rows: one run
        for (int64_t y = ya; y < yb;) {
          const int64_t gy = y % H, len = whole ? std::min(yb - y, H - gy) : 1;
          for (const auto& run : runs) {
            if (run[0] >= run[1]) continue;
            const int64_t at = gz * plane + gy * W + run[0] % W;
            const size_t bytes = sizeof(float) * static_cast<size_t>(len * (run[1] - run[0]));
            for (int64_t c = 0; c < C; ++c) std::memset(a.acc + c * L * plane + at, 0, bytes);
            std::memset(a.wsum + at, 0, bytes);
          }
          y += len;
        }
      }
    }
  }
}

void zero_cpu(float* data, int64_t count) {
  const int64_t chunk = int64_t(1) << 16;
  const int64_t chunks = (count + chunk - 1) / chunk;
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t begin = i * chunk;
    const int64_t len = std::min(chunk, count - begin);
    std::memset(data + begin, 0, sizeof(float) * len);
  }
}

}  // namespace aggregate
}  // namespace hermes
