// Each op family registers its functions into the `hermes._C` module from its own file.
#pragma once
#include <pybind11/pybind11.h>

namespace hermes {
namespace bindings {

void register_info(pybind11::module_& m);
void register_prior_attention(pybind11::module_& m);
void register_aggregation(pybind11::module_& m);
void register_instance_norm(pybind11::module_& m);

}  // namespace bindings
}  // namespace hermes
