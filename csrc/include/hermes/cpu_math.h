// Vectorisable float math for the CPU kernels (host only): loops that call these compile to SIMD
// code, unlike loops around std::exp.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define HERMES_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HERMES_ALWAYS_INLINE inline
#endif

namespace hermes {

// exp for float: Cody-Waite range reduction and a degree-6 polynomial (cephes coefficients),
// about 1-2 ulp on [-87, 88], the argument clamped to [lo, hi]. Arithmetic only, so the loops
// around it vectorise. Pass the bounds from ExpBounds: with literal constants GCC threads the
// clamp's constant arm into a separate path and the loop no longer vectorises (10x slower).
HERMES_ALWAYS_INLINE float poly_exp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - kf * 0.693359375f) - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The clamp bounds of poly_exp, hidden from the optimiser (see there).
struct ExpBounds {
  float lo = -87.0f;
  float hi = 88.0f;
  ExpBounds() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm("" : "+x"(lo), "+x"(hi));
#endif
  }
};

}  // namespace hermes
