// Bindings of the sliding-window aggregation kernels. Tensors cross as raw addresses
// (tensor.data_ptr()) with their sizes; hermes/ops/aggregate.py validates everything first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "bindings.h"
#include "hermes/aggregate.h"

namespace py = pybind11;

namespace hermes {
namespace bindings {

namespace {

using aggregate::AccGeometry;
using aggregate::FinalizeArgs;
using aggregate::PatchStrides;
using aggregate::WindowWeights;

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

AccGeometry make_geom(int64_t channels, int64_t ring, int64_t height, int64_t width) {
  return AccGeometry{channels, ring, height, width};
}

PatchStrides make_strides(const std::array<int64_t, 5>& s) {
  for (int64_t v : s) {
    if (v < 0) throw std::invalid_argument("aggregate add: negative patch strides");
  }
  return PatchStrides{s[0], s[1], s[2], s[3], s[4]};
}

WindowWeights make_weights(std::uintptr_t wz, std::uintptr_t wy, std::uintptr_t wx,
                           int64_t roi_d, int64_t roi_h, int64_t roi_w, float clamp_min) {
  return WindowWeights{ptr<const float>(wz), ptr<const float>(wy), ptr<const float>(wx),
                       roi_d, roi_h, roi_w, clamp_min};
}

// ranges: z0, z1, r0, r1, q0, q1 (planes, rows, columns finalized), y0, y1, x0, x1 (crop).
FinalizeArgs make_finalize(std::uintptr_t acc, std::uintptr_t wsum, int64_t channels,
                           int64_t ring, int64_t height, int64_t width,
                           const std::array<int64_t, 10>& ranges, int64_t out_z0,
                           std::uintptr_t out, int64_t out_d, int64_t out_h, int64_t out_w,
                           int kind, bool sigmoid, float threshold, bool zero_after) {
  if (kind < aggregate::kOutFloat32 || kind > aggregate::kOutLabelU16) {
    throw std::invalid_argument("aggregate finalize: unknown output kind");
  }
  const auto& r = ranges;
  return FinalizeArgs{ptr<float>(acc), ptr<float>(wsum), make_geom(channels, ring, height, width),
                      r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], out_z0,
                      ptr<void>(out), out_d, out_h, out_w, kind, sigmoid, threshold, zero_after};
}

}  // namespace

void register_aggregation(py::module_& m) {
  m.def(
      "aggregate_add_cpu",
      [](std::uintptr_t acc, std::uintptr_t wsum, int64_t channels, int64_t ring, int64_t height,
         int64_t width, std::uintptr_t patches, std::array<int64_t, 5> strides,
         std::uintptr_t starts, int64_t count, std::uintptr_t wz, std::uintptr_t wy,
         std::uintptr_t wx, int64_t roi_d, int64_t roi_h, int64_t roi_w, float clamp_min,
         bool add_weight) {
        py::gil_scoped_release release;
        aggregate::add_patches_cpu(ptr<float>(acc), ptr<float>(wsum),
                                   make_geom(channels, ring, height, width),
                                   ptr<const float>(patches), make_strides(strides),
                                   ptr<const int64_t>(starts), count,
                                   make_weights(wz, wy, wx, roi_d, roi_h, roi_w, clamp_min),
                                   add_weight);
      },
      "Weighted scatter-add of count x C x roi patches (element strides: batch, c, z, y, x) "
      "into a C x ring x height x width accumulator (indices stored modulo those sizes).");
  m.def(
      "aggregate_finalize_cpu",
      [](std::uintptr_t acc, std::uintptr_t wsum, int64_t channels, int64_t ring, int64_t height,
         int64_t width, std::array<int64_t, 10> ranges, int64_t out_z0, std::uintptr_t out,
         int64_t out_d, int64_t out_h, int64_t out_w, int kind, bool sigmoid, float threshold,
         bool zero_after) {
        FinalizeArgs args =
            make_finalize(acc, wsum, channels, ring, height, width, ranges, out_z0, out, out_d,
                          out_h, out_w, kind, sigmoid, threshold, zero_after);
        py::gil_scoped_release release;
        aggregate::finalize_cpu(args);
      },
      "Normalise planes x rows x columns (ranges: z0, z1, r0, r1, q0, q1, crop y0, y1, x0, x1) "
      "by the weight sum and write the requested output kind.");
  m.def(
      "aggregate_zero_cpu",
      [](std::uintptr_t data, int64_t count) {
        py::gil_scoped_release release;
        aggregate::zero_cpu(ptr<float>(data), count);
      },
      "Zero `count` float32 values.");
#ifdef HERMES_WITH_CUDA
  m.def(
      "aggregate_add_cuda",
      [](std::uintptr_t acc, std::uintptr_t wsum, int64_t channels, int64_t ring, int64_t height,
         int64_t width, std::uintptr_t patches, std::array<int64_t, 5> strides,
         std::uintptr_t starts, int64_t count, std::uintptr_t wz, std::uintptr_t wy,
         std::uintptr_t wx, int64_t roi_d, int64_t roi_h, int64_t roi_w, float clamp_min,
         bool add_weight, std::uintptr_t stream) {
        aggregate::add_patches_cuda(ptr<float>(acc), ptr<float>(wsum),
                                    make_geom(channels, ring, height, width),
                                    ptr<const float>(patches), make_strides(strides),
                                    ptr<const int64_t>(starts), count,
                                    make_weights(wz, wy, wx, roi_d, roi_h, roi_w, clamp_min),
                                    add_weight, stream);
      },
      "CUDA aggregate_add_cpu on `stream` (starts is a host address, the rest device).");
  m.def(
      "aggregate_finalize_cuda",
      [](std::uintptr_t acc, std::uintptr_t wsum, int64_t channels, int64_t ring, int64_t height,
         int64_t width, std::array<int64_t, 10> ranges, int64_t out_z0, std::uintptr_t out,
         int64_t out_d, int64_t out_h, int64_t out_w, int kind, bool sigmoid, float threshold,
         bool zero_after, std::uintptr_t stream) {
        aggregate::finalize_cuda(
            make_finalize(acc, wsum, channels, ring, height, width, ranges, out_z0, out, out_d,
                          out_h, out_w, kind, sigmoid, threshold, zero_after),
            stream);
      },
      "CUDA aggregate_finalize_cpu on `stream`.");
  m.def(
      "aggregate_zero_cuda",
      [](std::uintptr_t data, int64_t count, std::uintptr_t stream) {
        aggregate::zero_cuda(ptr<float>(data), count, stream);
      },
      "Zero `count` float32 values on `stream`.");
#endif
}

}  // namespace bindings
}  // namespace hermes
