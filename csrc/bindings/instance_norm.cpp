// Binding of the fused instance-norm + ReLU CPU kernel; hermes/ops/norm.py validates first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "hermes/instance_norm.h"

namespace hermes {
namespace bindings {

void register_instance_norm(pybind11::module_& m) {
  m.def(
      "instance_norm_act_cpu",
      [](std::uintptr_t x, std::uintptr_t y, int64_t planes, int64_t size, float eps, bool relu) {
        pybind11::gil_scoped_release release;
        norm::instance_norm_act_cpu(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y),
                                    planes, size, eps, relu);
      },
      pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("planes"), pybind11::arg("size"),
      pybind11::arg("eps"), pybind11::arg("relu"),
      "Instance norm (no affine, biased variance) then optional ReLU over `planes` contiguous "
      "float32 rows of `size` voxels into y (not overlapping x).");
}

}  // namespace bindings
}  // namespace hermes
