// Queries of the CUDA runtime, compiled only when the extension is built with CUDA.
#pragma once
#include <string>

namespace hermes {
namespace cuda {

// Number of CUDA devices usable now; 0 (and a reason in `error`) without a driver or GPU.
int device_count(std::string* error);
// Version of the CUDA runtime linked into the extension, e.g. 13000.
int runtime_version();
// Name of device `index`, or "" when it cannot be queried.
std::string device_name(int index);

}  // namespace cuda
}  // namespace hermes
