#include "bindings.h"

namespace hermes {
namespace bindings {

void register_aggregation(pybind11::module_& m) { (void)m; }

}  // namespace bindings
}  // namespace hermes
