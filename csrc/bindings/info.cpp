// Build and runtime capabilities of the extension, reported by hermes.ops.capabilities().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"

#ifdef HERMES_WITH_OPENMP
#include <omp.h>
#endif
#ifdef HERMES_WITH_CUDA
#include "hermes/cuda_info.h"
#endif

namespace py = pybind11;

namespace hermes {
namespace bindings {

namespace {

std::vector<std::string> split_archs(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : text) {
    if (c == ',') {
      if (!cur.empty()) out.push_back("sm_" + cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back("sm_" + cur);
  return out;
}

py::dict build_info() {
  py::dict info;
#ifdef HERMES_WITH_OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
#ifdef HERMES_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = split_archs(HERMES_CUDA_ARCHS_STR);
  info["cuda_runtime_version"] = hermes::cuda::runtime_version();
  std::string error;
  int count = hermes::cuda::device_count(&error);
  info["cuda_device_count"] = count;
  info["cuda_error"] = error;
  std::vector<std::string> names;
  for (int i = 0; i < count; ++i) names.push_back(hermes::cuda::device_name(i));
  info["cuda_devices"] = names;
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = std::vector<std::string>{};
  info["cuda_runtime_version"] = 0;
  info["cuda_device_count"] = 0;
  info["cuda_error"] = std::string("extension built without CUDA");
  info["cuda_devices"] = std::vector<std::string>{};
#endif
  return info;
}

}  // namespace

void register_info(py::module_& m) {
  m.def("build_info", &build_info,
        "Dict of what the extension was compiled with and which CUDA devices it sees now.");
#ifdef HERMES_WITH_OPENMP
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n > 0 ? n : 1); },
        "Set the OpenMP thread count used by the CPU kernels.");
#else
  m.def("set_num_threads", [](int) {}, "No-op: the extension was built without OpenMP.");
#endif
}

}  // namespace bindings
}  // namespace hermes
