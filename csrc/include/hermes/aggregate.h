// Weighted patch aggregation for sliding-window inference (CPU OpenMP and CUDA).
//
// The accumulator holds `ring` planes of `height` rows of `width` columns, and global voxel
// (z, y, x) is stored at (z % ring, y % height, x % width). With the volume's own sizes it is a
// plain C x D x H x W volume; a ring of planes, rows or columns (that size equal to the window's)
// holds only the slab that windows still touch (streaming mode along that axis; the patches are
// read in their own layout).
// All buffers are contiguous float32 unless stated; the Python front end validates shapes,
// dtypes, devices and bounds before calling, so these functions trust their arguments.
#pragma once
#include <cstdint>

#include "hermes/macros.h"

namespace hermes {
namespace aggregate {

// Geometry of the accumulator `acc` (C x ring x height x width) and of the weight sum `wsum`
// (ring x height x width); plane, row and column indices are taken modulo these sizes.
struct AccGeometry {
  int64_t channels;
  int64_t ring;
  int64_t height;
  int64_t width;
};

// Separable window weights: w(z, y, x) = max((wz[z] * wy[y]) * wx[x], clamp_min), the float32
// product taken in that order (the order MONAI's importance map uses). Constant blending passes
// tables of ones and clamp_min = 0.
struct WindowWeights {
  const float* wz;  // length roi_d
  const float* wy;  // length roi_h
  const float* wx;  // length roi_w
  int64_t roi_d;
  int64_t roi_h;
  int64_t roi_w;
  float clamp_min;
};

// One weight of WindowWeights from fzy = wz[z] * wy[y] (hoisted out of the row loops): the same
// float32 operations, so CPU and CUDA kernels get the same bits.
HERMES_HD float window_weight(float fzy, float wx, float clamp_min) {
  const float w = fzy * wx;
  return w < clamp_min ? clamp_min : w;
}

// Element strides of the patches (count x C x roi_d x roi_h x roi_w); any non-negative layout, a
// unit x stride is the fast path (a transposed view then needs no copy).
struct PatchStrides {
  int64_t batch;
  int64_t c;
  int64_t z;
  int64_t y;
  int64_t x;
};

// What finalize() writes for every voxel (c, z, y, x) of the crop, with v = acc / wsum:
enum OutputKind : int {
  kOutFloat32 = 0,  // float32 v, or sigmoid(v) when `sigmoid`
  kOutFloat16 = 1,  // float16 (round to nearest even) of v or sigmoid(v)
  kOutMask = 2,     // uint8 (bool) v >= threshold, per channel
  kOutLabelU8 = 3,  // uint8 label: 1 + argmax_c v if max_c v >= threshold else 0 (single plane)
  kOutLabelU16 = 4  // as kOutLabelU8, uint16
};

struct FinalizeArgs {
  float* acc;
  float* wsum;
  AccGeometry geom;
  int64_t z0, z1;     // global planes [z0, z1) to finalize (z1 - z0 <= ring)
  int64_t r0, r1;     // global rows [r0, r1) of those planes (r1 - r0 <= height)
  int64_t q0, q1;     // global columns [q0, q1) of those rows (q1 - q0 <= width)
  int64_t y0, y1;     // crop rows (global) written to the output
  int64_t x0, x1;     // crop columns (global) written to the output
  int64_t out_z0;     // global plane stored at output plane 0
  void* out;          // (C|1) x out_d x out_h x out_w, element type from `kind`
  int64_t out_d, out_h, out_w;
  int kind;           // OutputKind
  bool sigmoid;       // float kinds: apply the logistic function
  float threshold;    // mask/label kinds: threshold on v (the logit of the probability threshold)
  bool zero_after;    // reset acc and wsum on planes [z0, z1) x rows [r0, r1) x columns [q0, q1)
};

// Adds `count` patches (count x C x roi_d x roi_h x roi_w, element layout `strides`) weighted by
// `weights` into `acc`, patch b at global corner starts[3*b .. 3*b+2] (z, y, x), in order
// b = 0, 1, ... so that every voxel sums its contributions in a fixed order (deterministic).
// When `add_weight`, the weight is also added to `wsum`.
void add_patches_cpu(float* acc, float* wsum, const AccGeometry& geom, const float* patches,
                     const PatchStrides& strides, const int64_t* starts, int64_t count,
                     const WindowWeights& weights, bool add_weight);

void finalize_cpu(const FinalizeArgs& args);

// Sets `count` floats to zero (parallel; used to reset reused buffers).
void zero_cpu(float* data, int64_t count);

#ifdef HERMES_WITH_CUDA
// CUDA versions: every pointer is a device pointer except `starts`, which stays on the host (the
// weight tables wz/wy/wx are device pointers). Work is queued on `stream`
// (a cudaStream_t passed as an integer); patches are added one launch after another on that
// stream, so results are deterministic. Errors raise std::runtime_error.
void add_patches_cuda(float* acc, float* wsum, const AccGeometry& geom, const float* patches,
                      const PatchStrides& strides, const int64_t* starts, int64_t count,
                      const WindowWeights& weights, bool add_weight, std::uintptr_t stream);
void finalize_cuda(const FinalizeArgs& args, std::uintptr_t stream);
void zero_cuda(float* data, int64_t count, std::uintptr_t stream);
#endif

}  // namespace aggregate
}  // namespace hermes
