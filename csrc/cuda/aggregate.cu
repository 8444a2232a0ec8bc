// CUDA kernels of the sliding-window patch aggregation; see hermes/aggregate.h.
// Patches are added one launch per patch on the caller's stream: within a launch every thread
// owns distinct voxels, and launches are ordered, so no atomics are needed and results are
// deterministic (the same per-voxel summation order as the CPU kernels).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "hermes/aggregate.h"

namespace hermes {
namespace aggregate {

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("hermes aggregate (CUDA) ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

// One thread per patch voxel (z, y, x); it loops over the channels.
__global__ void add_patch_kernel(float* __restrict__ acc, float* __restrict__ wsum,
                                 AccGeometry geom, const float* __restrict__ patch,
                                 PatchStrides st, int64_t sz, int64_t sy, int64_t sx,
                                 WindowWeights w, bool add_weight) {
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t y = blockIdx.y;
  const int64_t z = blockIdx.z;
  if (x >= w.roi_w) return;
  const int64_t plane = geom.height * geom.width;
  const int64_t gz = (sz + z) % geom.ring;
  const float weight = window_weight(w.wz[z] * w.wy[y], w.wx[x], w.clamp_min);
  const int64_t dst = gz * plane + ((sy + y) % geom.height) * geom.width + (sx + x) % geom.width;
  if (add_weight) wsum[dst] = __fadd_rn(wsum[dst], weight);  // rounded add, as the CPU
  const int64_t src = z * st.z + y * st.y + x * st.x;
  const int64_t acc_channel = geom.ring * plane;
  // Separate rounded multiply and add (no fused multiply-add), as on the CPU: the same sums.
  for (int64_t c = 0; c < geom.channels; ++c) {
    const int64_t i = c * acc_channel + dst;
    acc[i] = __fadd_rn(acc[i], __fmul_rn(patch[c * st.c + src], weight));
  }
}

__device__ __forceinline__ float logistic(float v) { return 1.0f / (1.0f + expf(-v)); }

// One thread per voxel of planes [z0, z1) x rows [r0, r1) x columns [q0, q1) (the voxels
// outside the crop too, so that zero_after resets the padding).
__global__ void finalize_kernel(FinalizeArgs a) {
  const int64_t x = a.q0 + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t y = a.r0 + blockIdx.y;
  const int64_t z = a.z0 + blockIdx.z;
  const int64_t W = a.geom.width, H = a.geom.height, C = a.geom.channels;
  if (x >= a.q1) return;
  const int64_t plane = H * W;
  const int64_t acc_channel = a.geom.ring * plane;
  const int64_t at = (z % a.geom.ring) * plane + (y % H) * W + x % W;
  const bool inside = y >= a.y0 && y < a.y1 && x >= a.x0 && x < a.x1;
  if (inside) {
    const float wt = a.wsum[at];
    const int64_t out_plane = a.out_h * a.out_w;
    const int64_t out_volume = a.out_d * out_plane;
    const int64_t o = (z - a.out_z0) * out_plane + (y - a.y0) * a.out_w + (x - a.x0);
    if (a.kind == kOutFloat32 || a.kind == kOutFloat16 || a.kind == kOutMask) {
      for (int64_t c = 0; c < C; ++c) {
        float v = a.acc[c * acc_channel + at] / wt;
        if (a.kind == kOutMask) {
          static_cast<unsigned char*>(a.out)[c * out_volume + o] = v >= a.threshold ? 1 : 0;
          continue;
        }
        if (a.sigmoid) v = logistic(v);
        if (a.kind == kOutFloat32) {
          static_cast<float*>(a.out)[c * out_volume + o] = v;
        } else {
          static_cast<__half*>(a.out)[c * out_volume + o] = __float2half_rn(v);
        }
      }
    } else {
      float best = a.acc[at] / wt;
      int arg = 0;
      for (int64_t c = 1; c < C; ++c) {
        const float v = a.acc[c * acc_channel + at] / wt;
        if (v > best) {
          best = v;
          arg = static_cast<int>(c);
        } else if (v != v) {
          best = v;  // NaN, as torch.max: label 0 whichever channel it is in
        }
      }
      const int label = best >= a.threshold ? arg + 1 : 0;
      if (a.kind == kOutLabelU8) {
        static_cast<unsigned char*>(a.out)[o] = static_cast<unsigned char>(label);
      } else {
        static_cast<unsigned short*>(a.out)[o] = static_cast<unsigned short>(label);
      }
    }
  }
  if (a.zero_after) {
    for (int64_t c = 0; c < C; ++c) a.acc[c * acc_channel + at] = 0.0f;
    a.wsum[at] = 0.0f;
  }
}

// Threads per block along x: the row length rounded up to whole warps (at most 256), so that
// rows of 96 or 192 voxels leave no thread idle.
inline int threads_for(int64_t row) {
  const int64_t warps = (row + 31) / 32;
  return static_cast<int>(warps * 32 > 256 ? 256 : warps * 32);
}

}  // namespace

void add_patches_cuda(float* acc, float* wsum, const AccGeometry& geom, const float* patches,
                      const PatchStrides& strides, const int64_t* starts, int64_t count,
                      const WindowWeights& weights, bool add_weight, std::uintptr_t stream) {
  if (count == 0) return;
  if (weights.roi_w < 1 || weights.roi_h < 1 || weights.roi_d < 1) {
    throw std::invalid_argument("hermes aggregate (CUDA): empty window");
  }
  if (weights.roi_h > 65535 || weights.roi_d > 65535) {
    throw std::runtime_error("hermes aggregate (CUDA): window depth/height above 65535");
  }
  const int threads = threads_for(weights.roi_w);
  const dim3 block(threads);
  const dim3 grid(static_cast<unsigned>((weights.roi_w + threads - 1) / threads),
                  static_cast<unsigned>(weights.roi_h), static_cast<unsigned>(weights.roi_d));
  for (int64_t b = 0; b < count; ++b) {
    add_patch_kernel<<<grid, block, 0, as_stream(stream)>>>(
        acc, wsum, geom, patches + b * strides.batch, strides, starts[3 * b],
        starts[3 * b + 1], starts[3 * b + 2], weights, add_weight);
    check(cudaGetLastError(), "add_patches launch");
  }
}

void finalize_cuda(const FinalizeArgs& args, std::uintptr_t stream) {
  if (args.z1 <= args.z0 || args.r1 <= args.r0 || args.q1 <= args.q0) return;
  if (args.r1 - args.r0 > 65535 || args.z1 - args.z0 > 65535) {
    throw std::runtime_error("hermes aggregate (CUDA): slab rows/planes above 65535");
  }
  const int64_t cols = args.q1 - args.q0;
  const int threads = threads_for(cols);
  const dim3 block(threads);
  const dim3 grid(static_cast<unsigned>((cols + threads - 1) / threads),
                  static_cast<unsigned>(args.r1 - args.r0),
                  static_cast<unsigned>(args.z1 - args.z0));
  finalize_kernel<<<grid, block, 0, as_stream(stream)>>>(args);
  check(cudaGetLastError(), "finalize launch");
}

void zero_cuda(float* data, int64_t count, std::uintptr_t stream) {
  check(cudaMemsetAsync(data, 0, sizeof(float) * static_cast<size_t>(count), as_stream(stream)),
        "zero");
}

}  // namespace aggregate
}  // namespace hermes
