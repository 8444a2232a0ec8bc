// CUDA kernels of the fused prior-feature interaction (see hermes/prior_attention.h).
// Data in float32/float64/float16/bfloat16; statistics in float (double for float64 data).
// Everything runs on the caller's stream (torch's current stream).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "hermes/prior_attention.h"

namespace hermes {
namespace prior_attention {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

__device__ __forceinline__ float dexp(float v) { return expf(v); }  // within 2 ulp
__device__ __forceinline__ double dexp(double v) { return exp(v); }

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename S>
__device__ __forceinline__ S warp_max(S v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int kWarps = 8;  // warps per block for row-per-warp kernels

// One warp per row: mean, variance (two passes over the row, read from L1/L2), normalise.
template <typename T>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ b, T* __restrict__ y,
                              typename Acc<T>::type* __restrict__ mean,
                              typename Acc<T>::type* __restrict__ rstd, int64_t rows,
                              int64_t cols, double eps) {
  using S = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  S sum = 0;
  for (int64_t c = lane; c < cols; c += 32) sum += to_acc(xr[c]);
  const S mu = warp_sum(sum) / static_cast<S>(cols);
  S var = 0;
  for (int64_t c = lane; c < cols; c += 32) {
    const S d = to_acc(xr[c]) - mu;
    var += d * d;
  }
  const S rs = S(1) / sqrt(warp_sum(var) / static_cast<S>(cols) + static_cast<S>(eps));
  T* yr = y + row * cols;
  for (int64_t c = lane; c < cols; c += 32) {
    yr[c] = from_acc<T>((to_acc(xr[c]) - mu) * rs * to_acc(w[c]) + to_acc(b[c]));
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// One warp per row for dx; the weight/bias gradients are summed per block in shared memory
// (each lane owns columns lane, lane + 32, ...) and added to global memory with one atomic per
// column and block.
template <typename T>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ rstd,
                              const T* __restrict__ w, T* __restrict__ dx,
                              typename Acc<T>::type* __restrict__ dweight,
                              typename Acc<T>::type* __restrict__ dbias, int64_t rows,
                              int64_t cols, int64_t rows_per_block, bool accumulate) {
  using S = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  S* sdw = reinterpret_cast<S*>(smem_raw);  // 2 * cols
  S* sdb = sdw + cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    sdw[c] = 0;
    sdb[c] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const S inv_n = S(1) / static_cast<S>(cols);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row1 = min(rows, row0 + rows_per_block);
  for (int64_t row = row0 + warp; row < row1; row += kWarps) {
    const T* xr = x + row * cols;
    const T* gr = dy + row * cols;
    const S mu = mean[row];
    const S rs = rstd[row];
    S sg = 0, sgx = 0;
    for (int64_t c = lane; c < cols; c += 32) {
      const S xh = (to_acc(xr[c]) - mu) * rs;
      const S g = to_acc(gr[c]) * to_acc(w[c]);
      sg += g;
      sgx += g * xh;
      atomicAdd(&sdw[c], to_acc(gr[c]) * xh);
      atomicAdd(&sdb[c], to_acc(gr[c]));
    }
    const S c1 = warp_sum(sg) * inv_n;
    const S c2 = warp_sum(sgx) * inv_n;
    T* dr = dx + row * cols;
    for (int64_t c = lane; c < cols; c += 32) {
      const S xh = (to_acc(xr[c]) - mu) * rs;
      const S g = to_acc(gr[c]) * to_acc(w[c]);
      S v = rs * (g - c1 - xh * c2);
      if (accumulate) v += to_acc(dr[c]);
      dr[c] = from_acc<T>(v);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    atomicAdd(&dweight[c], sdw[c]);
    atomicAdd(&dbias[c], sdb[c]);
  }
}

// One thread per (head, column): softmax over the head's n rows (n is small: the priors) at
// stride cols; adjacent threads read adjacent columns (coalesced).
template <typename T>
__global__ void head_softmax_kernel(T* __restrict__ s, T* __restrict__ dp, int64_t heads,
                                    int64_t n, int64_t cols) {
  using S = typename Acc<T>::type;
  const int64_t gidx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gidx >= heads * cols) return;
  const int64_t offset = (gidx / cols) * n * cols + gidx % cols;
  T* p = s + offset;
  S mx = to_acc(p[0]);
  for (int64_t j = 1; j < n; ++j) mx = max(mx, to_acc(p[j * cols]));
  S sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += dexp(to_acc(p[j * cols]) - mx);
  const S inv = S(1) / sum;
  if (dp == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      p[j * cols] = from_acc<T>(dexp(to_acc(p[j * cols]) - mx) * inv);
    }
    return;
  }
  T* g = dp + offset;
  S dot = 0;
  for (int64_t j = 0; j < n; ++j) {
    dot += dexp(to_acc(p[j * cols]) - mx) * inv * to_acc(g[j * cols]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const S pj = dexp(to_acc(p[j * cols]) - mx) * inv;
    p[j * cols] = from_acc<T>(pj);
    g[j * cols] = from_acc<T>(pj * (to_acc(g[j * cols]) - dot));
  }
}

template <typename S>
__device__ S block_reduce(S v, S* shared, bool is_max) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = is_max ? warp_max(v) : warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    S t = lane < nw ? shared[lane] : (is_max ? -INFINITY : S(0));
    t = is_max ? warp_max(t) : warp_sum(t);
    if (lane == 0) shared[0] = t;
  }
  __syncthreads();
  const S out = shared[0];
  __syncthreads();
  return out;
}

// One block per row (one prior query): max, exp and sum over the chunk's voxels.
template <typename T>
__global__ void online_update_kernel(T* __restrict__ s, typename Acc<T>::type* __restrict__ m,
                                     typename Acc<T>::type* __restrict__ l,
                                     typename Acc<T>::type* __restrict__ alpha, int64_t cols) {
  using S = typename Acc<T>::type;
  __shared__ S shared[32];
  const int64_t row = blockIdx.x;
  T* sr = s + row * cols;
  S mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) mx = max(mx, to_acc(sr[j]));
  mx = block_reduce(mx, shared, true);
  const S m_old = m[row];
  const S m_new = max(m_old, mx);
  S sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const S e = dexp(to_acc(sr[j]) - m_new);
    sr[j] = from_acc<T>(e);
    sum += e;
  }
  sum = block_reduce(sum, shared, false);
  if (threadIdx.x == 0) {
    const S a = m_old == -INFINITY ? S(0) : dexp(m_old - m_new);
    l[row] = l[row] * a + sum;
    m[row] = m_new;
    alpha[row] = a;
  }
}

template <typename T>
__global__ void gather_bwd_kernel(T* __restrict__ s, T* __restrict__ dp,
                                  const typename Acc<T>::type* __restrict__ lse,
                                  const typename Acc<T>::type* __restrict__ dsum, int64_t rows,
                                  int64_t cols) {
  using S = typename Acc<T>::type;
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols;
    const S p = dexp(to_acc(s[i]) - lse[row]);
    s[i] = from_acc<T>(p);
    dp[i] = from_acc<T>(p * (to_acc(dp[i]) - dsum[row]));
  }
}

__device__ __forceinline__ float dcdf(float z) { return normcdff(z); }
__device__ __forceinline__ double dcdf(double z) { return normcdf(z); }

template <typename T>
__global__ void bias_gelu_kernel(T* __restrict__ u, const T* __restrict__ bias,
                                 T* __restrict__ dg, int64_t rows, int64_t cols) {
  using S = typename Acc<T>::type;
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const S z = to_acc(u[i]) + to_acc(bias[i % cols]);
    const S cdf = dcdf(z);
    if (dg != nullptr) {
      const S pdf = dexp(S(-0.5) * z * z) * S(0.39894228040143267794);
      dg[i] = from_acc<T>(to_acc(dg[i]) * (cdf + z * pdf));
    }
    u[i] = from_acc<T>(z * cdf);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Blocks for n items, per_block each. Kernels without a grid-stride loop rely on covering all
// n, so a count beyond gridDim.x's limit (2^31 - 1) is an error, never a silent truncation.
unsigned grid_for(int64_t n, int64_t per_block) {
  const int64_t g = (n + per_block - 1) / per_block;
  if (g > 2147483647) {
    throw std::length_error("prior attention CUDA kernels: " + std::to_string(n) +
                            " rows exceed one launch; use a smaller chunk");
  }
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("prior attention CUDA kernels: unknown dtype code");
  }
}

}  // namespace

void ln_fwd_cuda(const LnFwdArgs& a, std::uintptr_t stream_addr) {
  if (a.rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Acc<T>::type;
    ln_fwd_kernel<T><<<grid_for(a.rows, kWarps), kWarps * 32, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
        static_cast<const T*>(a.bias), static_cast<T*>(a.y), static_cast<S*>(a.mean),
        static_cast<S*>(a.rstd), a.rows, a.cols, a.eps);
  });
  check(cudaGetLastError(), "prior attention LayerNorm (CUDA)");
}

void ln_bwd_cuda(const LnBwdArgs& a, std::uintptr_t stream_addr) {
  if (a.rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  const int64_t rows_per_block = 64;
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Acc<T>::type;
    const size_t smem = 2 * static_cast<size_t>(a.cols) * sizeof(S);
    ln_bwd_kernel<T><<<grid_for(a.rows, rows_per_block), kWarps * 32, smem, stream>>>(
        static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const S*>(a.mean),
        static_cast<const S*>(a.rstd), static_cast<const T*>(a.weight), static_cast<T*>(a.dx),
        static_cast<S*>(a.dweight), static_cast<S*>(a.dbias), a.rows, a.cols, rows_per_block,
        a.accumulate);
  });
  check(cudaGetLastError(), "prior attention LayerNorm backward (CUDA)");
}

void head_softmax_cuda(const HeadSoftmaxArgs& a, std::uintptr_t stream_addr) {
  const int64_t threads = a.heads * a.cols;
  if (threads == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    head_softmax_kernel<T><<<grid_for(threads, 256), 256, 0, stream>>>(
        static_cast<T*>(a.s), static_cast<T*>(a.dp), a.heads, a.n, a.cols);
  });
  check(cudaGetLastError(), "prior attention head softmax (CUDA)");
}

void online_update_cuda(const OnlineUpdateArgs& a, std::uintptr_t stream_addr) {
  if (a.rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Acc<T>::type;
    online_update_kernel<T><<<static_cast<unsigned>(a.rows), 256, 0, stream>>>(
        static_cast<T*>(a.s), static_cast<S*>(a.m), static_cast<S*>(a.l),
        static_cast<S*>(a.alpha), a.cols);
  });
  check(cudaGetLastError(), "prior attention online softmax (CUDA)");
}

void gather_bwd_cuda(const GatherBwdArgs& a, std::uintptr_t stream_addr) {
  if (a.rows * a.cols == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Acc<T>::type;
    const int64_t total = a.rows * a.cols;
    const unsigned grid = grid_for(total, 256) > 4096 ? 4096 : grid_for(total, 256);
    gather_bwd_kernel<T><<<grid, 256, 0, stream>>>(
        static_cast<T*>(a.s), static_cast<T*>(a.dp), static_cast<const S*>(a.lse),
        static_cast<const S*>(a.dsum), a.rows, a.cols);
  });
  check(cudaGetLastError(), "prior attention softmax backward (CUDA)");
}

void bias_gelu_cuda(const BiasGeluArgs& a, std::uintptr_t stream_addr) {
  if (a.rows * a.cols == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_addr);
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t total = a.rows * a.cols;
    const unsigned grid = grid_for(total, 256) > 8192 ? 8192 : grid_for(total, 256);
    bias_gelu_kernel<T><<<grid, 256, 0, stream>>>(static_cast<T*>(a.u),
                                                  static_cast<const T*>(a.bias),
                                                  static_cast<T*>(a.dg), a.rows, a.cols);
  });
  check(cudaGetLastError(), "prior attention bias + GELU (CUDA)");
}

}  // namespace prior_attention
}  // namespace hermes
