// Element-wise kernels of the fused prior-feature interaction (hermes/ops/prior_attention_fused.py).
//
// The GEMMs of the fused block run in torch (BLAS / cuBLAS); these kernels are the streaming,
// row-wise parts around them. All buffers are contiguous row-major; `dtype` selects the element
// type of the data buffers (kFloat32, kFloat64, and on CUDA also kFloat16 / kBFloat16). The
// statistics buffers (mean, rstd, running max/sum, lse, dsum) and the LayerNorm weight-gradient
// accumulators are double for kFloat64 data and float otherwise; LayerNorm weight/bias have the
// data type. Shapes are validated in Python before any call.
#pragma once
#include <cstdint>

namespace hermes {
namespace prior_attention {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y = LayerNorm(x) over the last dim (rows x cols); mean/rstd per row.
struct LnFwdArgs {
  int dtype;
  const void* x;
  const void* weight;
  const void* bias;
  void* y;
  void* mean;
  void* rstd;
  int64_t rows;
  int64_t cols;
  double eps;
};

// dx (+)= dLN/dx . dy; dweight += sum_rows dy * xhat; dbias += sum_rows dy.
struct LnBwdArgs {
  int dtype;
  const void* dy;
  const void* x;
  const void* mean;
  const void* rstd;
  const void* weight;
  void* dx;
  void* dweight;  // accumulators, stats type
  void* dbias;
  int64_t rows;
  int64_t cols;
  bool accumulate;
};

// Softmax over the rows of each of `heads` groups of `n` consecutive rows of s ((heads*n) x cols),
// per column, in place: the scores of the column's voxel against the group's n priors. (Columns
// are voxels: every pass of the CPU kernel runs along contiguous memory, and adjacent CUDA
// threads read adjacent columns.) With dp != nullptr (backward): s holds raw scores and becomes
// the probabilities p, and dp becomes p * (dp - sum_group(p * dp)).
struct HeadSoftmaxArgs {
  int dtype;
  void* s;
  void* dp;
  int64_t heads;
  int64_t n;
  int64_t cols;
};

// One chunk of the online softmax over columns: s (rows x cols) raw -> exp(s - m_new);
// m (running max) and l (running sum) updated; alpha = exp(m_old - m_new).
struct OnlineUpdateArgs {
  int dtype;
  void* s;
  void* m;
  void* l;
  void* alpha;
  int64_t rows;
  int64_t cols;
};

// s (rows x cols) raw -> p = exp(s - lse[row]); dp -> p * (dp - dsum[row]).
struct GatherBwdArgs {
  int dtype;
  void* s;
  void* dp;
  const void* lse;
  const void* dsum;
  int64_t rows;
  int64_t cols;
};

// u (rows x cols) <- GELU(u + bias) (exact, erf form); with dg != nullptr (backward) also
// dg <- dg * GELU'(u + bias). bias has cols entries.
struct BiasGeluArgs {
  int dtype;
  void* u;
  const void* bias;
  void* dg;
  int64_t rows;
  int64_t cols;
};

void ln_fwd_cpu(const LnFwdArgs& a);
void ln_bwd_cpu(const LnBwdArgs& a);
void head_softmax_cpu(const HeadSoftmaxArgs& a);
void online_update_cpu(const OnlineUpdateArgs& a);
void gather_bwd_cpu(const GatherBwdArgs& a);
void bias_gelu_cpu(const BiasGeluArgs& a);

#ifdef HERMES_WITH_CUDA
void ln_fwd_cuda(const LnFwdArgs& a, std::uintptr_t stream);
void ln_bwd_cuda(const LnBwdArgs& a, std::uintptr_t stream);
void head_softmax_cuda(const HeadSoftmaxArgs& a, std::uintptr_t stream);
void online_update_cuda(const OnlineUpdateArgs& a, std::uintptr_t stream);
void gather_bwd_cuda(const GatherBwdArgs& a, std::uintptr_t stream);
void bias_gelu_cuda(const BiasGeluArgs& a, std::uintptr_t stream);
#endif

}  // namespace prior_attention
}  // namespace hermes
