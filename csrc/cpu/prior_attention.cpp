// CPU kernels of the fused prior-feature interaction (see hermes/prior_attention.h).
//
// Parallel with OpenMP over rows (the head softmax: over head x column blocks); inner loops are
// written for `#pragma omp simd` vectorisation (including a polynomial exp for float). On x86-64
// with GCC/Clang the float kernels are compiled three times (x86-64-v4 = AVX-512, x86-64-v3 =
// AVX2/FMA, baseline) and picked at load time (target_clones); AVX-512 ran the element-wise
// kernels 1.4-1.8x faster than AVX2 on an AVX-512 machine.
#include "hermes/prior_attention.h"
#include "hermes/cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define HERMES_PA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HERMES_PA_CLONES
#endif

namespace hermes {
namespace prior_attention {
namespace {

template <typename T>
struct Exp;
template <>
struct Exp<float> {
  ExpBounds bounds;
  HERMES_ALWAYS_INLINE float operator()(float x) const { return poly_exp(x, bounds.lo, bounds.hi); }
};
template <>
struct Exp<double> {
  HERMES_ALWAYS_INLINE double operator()(double x) const { return std::exp(x); }
};

// ---------------------------------------------------------------------------------------------
// row kernels (T data, S statistics)
// ---------------------------------------------------------------------------------------------

template <typename T, typename S>
HERMES_ALWAYS_INLINE void ln_fwd_rows(const LnFwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    T* y = static_cast<T*>(a.y) + r * n;
    S sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) sum += static_cast<S>(x[c]);
    const S mean = sum / static_cast<S>(n);
    S var = 0;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < n; ++c) {
      const S d = static_cast<S>(x[c]) - mean;
      var += d * d;
    }
    const S rstd = S(1) / std::sqrt(var / static_cast<S>(n) + static_cast<S>(a.eps));
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      y[c] = static_cast<T>((static_cast<S>(x[c]) - mean) * rstd * static_cast<S>(w[c]) +
                            static_cast<S>(b[c]));
    }
    static_cast<S*>(a.mean)[r] = mean;
    static_cast<S*>(a.rstd)[r] = rstd;
  }
}

template <typename T, typename S>
HERMES_ALWAYS_INLINE void ln_bwd_rows(const LnBwdArgs& a, int64_t r0, int64_t r1, S* pdw, S* pdb) {
  const int64_t n = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const S inv_n = S(1) / static_cast<S>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * n;
    const T* dy = static_cast<const T*>(a.dy) + r * n;
    T* dx = static_cast<T*>(a.dx) + r * n;
    const S mean = static_cast<const S*>(a.mean)[r];
    const S rstd = static_cast<const S*>(a.rstd)[r];
    S sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < n; ++c) {
      const S xh = (static_cast<S>(x[c]) - mean) * rstd;
      const S g = static_cast<S>(dy[c]) * static_cast<S>(w[c]);
      sg += g;
      sgx += g * xh;
      pdw[c] += static_cast<S>(dy[c]) * xh;
      pdb[c] += static_cast<S>(dy[c]);
    }
    const S c1 = sg * inv_n;
    const S c2 = sgx * inv_n;
    if (a.accumulate) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const S xh = (static_cast<S>(x[c]) - mean) * rstd;
        const S g = static_cast<S>(dy[c]) * static_cast<S>(w[c]);
        dx[c] = static_cast<T>(static_cast<S>(dx[c]) + rstd * (g - c1 - xh * c2));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const S xh = (static_cast<S>(x[c]) - mean) * rstd;
        const S g = static_cast<S>(dy[c]) * static_cast<S>(w[c]);
        dx[c] = static_cast<T>(rstd * (g - c1 - xh * c2));
      }
    }
  }
}

// Columns per unit of work of the head softmax: one head's n rows of kColBlock columns (26 x 64
// floats at Hermes shapes) stay in L1 across the passes, and every pass is kColBlock contiguous
// values (SIMD without remainders).
constexpr int64_t kColBlock = 64;

// Head h, columns [c0, c0 + w); kW > 0: w = kW known at compile time (full blocks: no
// remainder loops).
template <typename T, int64_t kW>
HERMES_ALWAYS_INLINE void head_softmax_block(const HeadSoftmaxArgs& a, int64_t h, int64_t c0) {
  const int64_t n = a.n, cols = a.cols;
  const int64_t w = kW > 0 ? kW : std::min(kColBlock, cols - c0);
  const Exp<T> vexp;
  T* p = static_cast<T*>(a.s) + h * n * cols + c0;
  T stat[kColBlock];  // column maxima, then 1 / sums, then the backward dots
  T sum[kColBlock];
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) stat[c] = p[c];
  for (int64_t j = 1; j < n; ++j) {
    const T* q = p + j * cols;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) stat[c] = q[c] > stat[c] ? q[c] : stat[c];
  }
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) sum[c] = 0;
  for (int64_t j = 0; j < n; ++j) {
    T* q = p + j * cols;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const T e = vexp(q[c] - stat[c]);
      q[c] = e;
      sum[c] += e;
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) stat[c] = T(1) / sum[c];
  for (int64_t j = 0; j < n; ++j) {
    T* q = p + j * cols;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) q[c] *= stat[c];
  }
  if (a.dp == nullptr) return;
  T* g = static_cast<T*>(a.dp) + h * n * cols + c0;
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) stat[c] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T* q = p + j * cols;
    const T* gq = g + j * cols;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) stat[c] += q[c] * gq[c];
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* q = p + j * cols;
    T* gq = g + j * cols;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) gq[c] = q[c] * (gq[c] - stat[c]);
  }
}

// Units u0..u1 of (head, column block), head-major.
template <typename T>
HERMES_ALWAYS_INLINE void head_softmax_units(const HeadSoftmaxArgs& a, int64_t u0, int64_t u1) {
  const int64_t blocks = (a.cols + kColBlock - 1) / kColBlock;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c0 = (u % blocks) * kColBlock;
    if (c0 + kColBlock <= a.cols) {
      head_softmax_block<T, kColBlock>(a, u / blocks, c0);
    } else {
      head_softmax_block<T, 0>(a, u / blocks, c0);
    }
  }
}

template <typename T>
HERMES_ALWAYS_INLINE void online_update_rows(const OnlineUpdateArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.cols;
  const Exp<T> vexp;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = static_cast<T*>(a.s) + r * n;
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    T& m = static_cast<T*>(a.m)[r];
    const T m_new = std::max(m, mx);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T e = vexp(s[j] - m_new);
      s[j] = e;
      sum += e;
    }
    const T alpha = std::exp(m - m_new);  // exact 0 for the first chunk (m = -inf)
    T& l = static_cast<T*>(a.l)[r];
    l = l * alpha + sum;
    m = m_new;
    static_cast<T*>(a.alpha)[r] = alpha;
  }
}

template <typename T>
HERMES_ALWAYS_INLINE void gather_bwd_rows(const GatherBwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.cols;
  const Exp<T> vexp;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = static_cast<T*>(a.s) + r * n;
    T* g = static_cast<T*>(a.dp) + r * n;
    const T lse = static_cast<const T*>(a.lse)[r];
    const T ds = static_cast<const T*>(a.dsum)[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T p = vexp(s[j] - lse);
      s[j] = p;
      g[j] = p * (g[j] - ds);
    }
  }
}

// Normal cdf Phi(z) and density phi(z). float: erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7)
// with the shared exp(-z^2/2) (branch-free, so the loops vectorise).
HERMES_ALWAYS_INLINE void normal_parts(float z, const Exp<float>& vexp, float& cdf, float& pdf) {
  const float ax = std::fabs(z) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly =
      t * (0.254829592f +
           t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float e = vexp(-0.5f * z * z);
  const float tail = 0.5f * poly * e;
  cdf = 0.5f + std::copysign(0.5f - tail, z);  // 1 - tail for z >= 0, tail for z < 0
  pdf = e * 0.39894228040143268f;
}
HERMES_ALWAYS_INLINE void normal_parts(double z, const Exp<double>&, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-z * 0.70710678118654752440);
  pdf = std::exp(-0.5 * z * z) * 0.39894228040143267794;
}

template <typename T>
HERMES_ALWAYS_INLINE void bias_gelu_rows(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.cols;
  const T* bias = static_cast<const T*>(a.bias);
  const Exp<T> vexp;
  for (int64_t r = r0; r < r1; ++r) {
    T* u = static_cast<T*>(a.u) + r * n;
    if (a.dg == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T z = u[j] + bias[j];
        T cdf, pdf;
        normal_parts(z, vexp, cdf, pdf);
        u[j] = z * cdf;
      }
    } else {
      T* g = static_cast<T*>(a.dg) + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T z = u[j] + bias[j];
        T cdf, pdf;
        normal_parts(z, vexp, cdf, pdf);
        g[j] *= cdf + z * pdf;
        u[j] = z * cdf;
      }
    }
  }
}

// float instantiations, compiled per ISA (AVX2/FMA and baseline)
HERMES_PA_CLONES void ln_fwd_f32(const LnFwdArgs& a, int64_t r0, int64_t r1) {
  ln_fwd_rows<float, float>(a, r0, r1);
}
HERMES_PA_CLONES void ln_bwd_f32(const LnBwdArgs& a, int64_t r0, int64_t r1, float* dw,
                                 float* db) {
  ln_bwd_rows<float, float>(a, r0, r1, dw, db);
}
HERMES_PA_CLONES void head_softmax_f32(const HeadSoftmaxArgs& a, int64_t u0, int64_t u1) {
  head_softmax_units<float>(a, u0, u1);
}
HERMES_PA_CLONES void online_update_f32(const OnlineUpdateArgs& a, int64_t r0, int64_t r1) {
  online_update_rows<float>(a, r0, r1);
}
HERMES_PA_CLONES void gather_bwd_f32(const GatherBwdArgs& a, int64_t r0, int64_t r1) {
  gather_bwd_rows<float>(a, r0, r1);
}

HERMES_PA_CLONES void bias_gelu_f32(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  bias_gelu_rows<float>(a, r0, r1);
}

// ---------------------------------------------------------------------------------------------
// drivers
// ---------------------------------------------------------------------------------------------

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Split [0, rows) into `blocks` contiguous ranges (blocks <= threads) and run f(block, r0, r1).
template <typename F>
void for_blocks(int64_t rows, int64_t work_per_row, F&& f) {
  int64_t blocks = std::min<int64_t>(max_threads(), rows);
  if (rows * work_per_row < (1 << 17)) blocks = 1;  // too little work to fork and join
  if (blocks <= 1) {
    f(0, int64_t(0), rows);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(blocks))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = rows * blk / blocks;
    const int64_t r1 = rows * (blk + 1) / blocks;
    f(blk, r0, r1);
  }
}

void check_dtype(int dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kFloat64) {
    throw std::invalid_argument(std::string(what) +
                                ": the CPU kernels support float32 and float64 only");
  }
}

}  // namespace

void ln_fwd_cpu(const LnFwdArgs& a) {
  check_dtype(a.dtype, "prior attention LayerNorm");
  if (a.dtype == kFloat32) {
    for_blocks(a.rows, a.cols, [&](int64_t, int64_t r0, int64_t r1) { ln_fwd_f32(a, r0, r1); });
  } else {
    for_blocks(a.rows, a.cols,
               [&](int64_t, int64_t r0, int64_t r1) { ln_fwd_rows<double, double>(a, r0, r1); });
  }
}

namespace {
template <typename S, typename RowFn>
void ln_bwd_driver(const LnBwdArgs& a, RowFn&& rows_fn) {
  const int64_t n = a.cols;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(max_threads(), a.rows));
  std::vector<S> partial(static_cast<size_t>(blocks * 2 * n), S(0));
  for_blocks(a.rows, a.cols, [&](int64_t blk, int64_t r0, int64_t r1) {
    S* dw = partial.data() + blk * 2 * n;
    rows_fn(r0, r1, dw, dw + n);
  });
  S* dweight = static_cast<S*>(a.dweight);
  S* dbias = static_cast<S*>(a.dbias);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const S* dw = partial.data() + blk * 2 * n;
    for (int64_t c = 0; c < n; ++c) {
      dweight[c] += dw[c];
      dbias[c] += dw[n + c];
    }
  }
}
}  // namespace

void ln_bwd_cpu(const LnBwdArgs& a) {
  check_dtype(a.dtype, "prior attention LayerNorm backward");
  if (a.dtype == kFloat32) {
    ln_bwd_driver<float>(a, [&](int64_t r0, int64_t r1, float* dw, float* db) {
      ln_bwd_f32(a, r0, r1, dw, db);
    });
  } else {
    ln_bwd_driver<double>(a, [&](int64_t r0, int64_t r1, double* dw, double* db) {
      ln_bwd_rows<double, double>(a, r0, r1, dw, db);
    });
  }
}

void head_softmax_cpu(const HeadSoftmaxArgs& a) {
  check_dtype(a.dtype, "prior attention head softmax");
  const int64_t units = a.heads * ((a.cols + kColBlock - 1) / kColBlock);
  const int64_t work = a.n * kColBlock * 4;
  if (a.dtype == kFloat32) {
    for_blocks(units, work, [&](int64_t, int64_t u0, int64_t u1) { head_softmax_f32(a, u0, u1); });
  } else {
    for_blocks(units, work,
               [&](int64_t, int64_t u0, int64_t u1) { head_softmax_units<double>(a, u0, u1); });
  }
}

void online_update_cpu(const OnlineUpdateArgs& a) {
  check_dtype(a.dtype, "prior attention online softmax");
  if (a.dtype == kFloat32) {
    for_blocks(a.rows, a.cols * 4,
               [&](int64_t, int64_t r0, int64_t r1) { online_update_f32(a, r0, r1); });
  } else {
    for_blocks(a.rows, a.cols * 4,
               [&](int64_t, int64_t r0, int64_t r1) { online_update_rows<double>(a, r0, r1); });
  }
}

void gather_bwd_cpu(const GatherBwdArgs& a) {
  check_dtype(a.dtype, "prior attention softmax backward");
  if (a.dtype == kFloat32) {
    for_blocks(a.rows, a.cols * 4,
               [&](int64_t, int64_t r0, int64_t r1) { gather_bwd_f32(a, r0, r1); });
  } else {
    for_blocks(a.rows, a.cols * 4,
               [&](int64_t, int64_t r0, int64_t r1) { gather_bwd_rows<double>(a, r0, r1); });
  }
}

void bias_gelu_cpu(const BiasGeluArgs& a) {
  check_dtype(a.dtype, "prior attention bias + GELU");
  if (a.dtype == kFloat32) {
    for_blocks(a.rows, a.cols * 8,
               [&](int64_t, int64_t r0, int64_t r1) { bias_gelu_f32(a, r0, r1); });
  } else {
    for_blocks(a.rows, a.cols * 8,
               [&](int64_t, int64_t r0, int64_t r1) { bias_gelu_rows<double>(a, r0, r1); });
  }
}

}  // namespace prior_attention
}  // namespace hermes
