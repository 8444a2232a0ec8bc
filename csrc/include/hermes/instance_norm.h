// Fused instance normalisation (no affine, biased variance) and ReLU, for inference.
#pragma once
#include <cstdint>

namespace hermes {
namespace norm {

// For each of `planes` rows of `size` contiguous floats (one (sample, channel) volume each):
// y = (x - mean) / sqrt(var + eps), then max(y, 0) when `relu`. Statistics are accumulated in
// double. `x` and `y` must not overlap.
void instance_norm_act_cpu(const float* x, float* y, int64_t planes, int64_t size, float eps,
                           bool relu);

}  // namespace norm
}  // namespace hermes
