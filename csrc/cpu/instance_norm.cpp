// CPU (OpenMP) fused instance normalisation + ReLU; see hermes/instance_norm.h.
#include "hermes/instance_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HERMES_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define HERMES_MULTIVERSION
#endif

namespace hermes {
namespace norm {

namespace {

// Work is split into chunks of this many voxels so that two threads share even one plane.
constexpr int64_t kChunk = 1 << 14;

HERMES_MULTIVERSION
void chunk_sums(const float* __restrict__ x, int64_t n, double* sum, double* sumsq) {
  double s = 0.0, q = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    s += v;
    q += v * v;
  }
  *sum = s;
  *sumsq = q;
}

HERMES_MULTIVERSION
void chunk_apply(const float* __restrict__ x, float* __restrict__ y, int64_t n, float mean,
                 float rstd, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::max((x[i] - mean) * rstd, 0.0f);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd;
  }
}

// In-place variant (x == y): the same loops without the no-alias promise.
void chunk_apply_inplace(float* y, int64_t n, float mean, float rstd, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = (y[i] - mean) * rstd;
    y[i] = relu ? std::max(v, 0.0f) : v;
  }
}

}  // namespace

void instance_norm_act_cpu(const float* x, float* y, int64_t planes, int64_t size, float eps,
                           bool relu) {
  if (planes <= 0 || size <= 0) return;
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  const int64_t tasks = planes * chunks;
  std::vector<double> sums(static_cast<size_t>(tasks)), sumsqs(static_cast<size_t>(tasks));
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t p = t / chunks, c = t % chunks;
    const int64_t begin = c * kChunk, n = std::min(kChunk, size - begin);
    chunk_sums(x + p * size + begin, n, &sums[t], &sumsqs[t]);
  }
  std::vector<float> mean(static_cast<size_t>(planes)), rstd(static_cast<size_t>(planes));
  for (int64_t p = 0; p < planes; ++p) {
    double s = 0.0, q = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      s += sums[p * chunks + c];
      q += sumsqs[p * chunks + c];
    }
    const double m = s / static_cast<double>(size);
    const double var = std::max(q / static_cast<double>(size) - m * m, 0.0);
    mean[p] = static_cast<float>(m);
    rstd[p] = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
  }
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t p = t / chunks, c = t % chunks;
    const int64_t begin = c * kChunk, n = std::min(kChunk, size - begin);
    const int64_t off = p * size + begin;
    if (x == y) {
      chunk_apply_inplace(y + off, n, mean[p], rstd[p], relu);
    } else {
      chunk_apply(x + off, y + off, n, mean[p], rstd[p], relu);
    }
  }
}

}  // namespace norm
}  // namespace hermes
