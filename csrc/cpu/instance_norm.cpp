// CPU (OpenMP) fused instance normalisation + ReLU; see hermes/instance_norm.h.
#include "hermes/instance_norm.h"
#include "hermes/macros.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

// Calls fn(chunk index, plane, offset of the chunk in the plane, chunk length) for every chunk,
// in parallel.
template <typename Fn>
void for_chunks(int64_t planes, int64_t size, Fn&& fn) {
  const int64_t chunks = (size + kChunk - 1) / kChunk;
#ifdef HERMES_WITH_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t t = 0; t < planes * chunks; ++t) {
    const int64_t begin = (t % chunks) * kChunk;
    fn(t, t / chunks, begin, std::min(kChunk, size - begin));
  }
}

}  // namespace

void instance_norm_act_cpu(const float* x, float* y, int64_t planes, int64_t size, float eps,
                           bool relu) {
  if (planes <= 0 || size <= 0) return;
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  std::vector<double> sums(static_cast<size_t>(planes * chunks));
  std::vector<double> sumsqs(sums.size());
  for_chunks(planes, size, [&](int64_t t, int64_t p, int64_t begin, int64_t n) {
    chunk_sums(x + p * size + begin, n, &sums[t], &sumsqs[t]);
  });
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
  for_chunks(planes, size, [&](int64_t, int64_t p, int64_t begin, int64_t n) {
    chunk_apply(x + p * size + begin, y + p * size + begin, n, mean[p], rstd[p], relu);
  });
}

}  // namespace norm
}  // namespace hermes
