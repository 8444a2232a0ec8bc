#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "Hermes native kernels (CPU, and CUDA when compiled with it)";
  hermes::bindings::register_info(m);
  hermes::bindings::register_prior_attention(m);
  hermes::bindings::register_aggregation(m);
  hermes::bindings::register_instance_norm(m);
}
