// Portable qualifiers: small math helpers for host and device; multiversioned CPU loops.
#pragma once

#if defined(__CUDACC__)
#define HERMES_HD __host__ __device__ __forceinline__
#else
#define HERMES_HD inline
#endif

// CPU hot loops compiled twice (AVX2 and baseline x86-64) and picked at load time. AVX2 without
// FMA: the results are bit-identical to the baseline build (no contraction is possible).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define HERMES_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define HERMES_MULTIVERSION
#endif
