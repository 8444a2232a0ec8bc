// Portable qualifiers so that small math helpers compile for host and device.
#pragma once

#if defined(__CUDACC__)
#define HERMES_HD __host__ __device__ __forceinline__
#else
#define HERMES_HD inline
#endif
