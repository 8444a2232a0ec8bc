#include "bindings.h"

namespace hermes {
namespace bindings {

void register_prior_attention(pybind11::module_& m) { (void)m; }

}  // namespace bindings
}  // namespace hermes
