// Bindings of the fused prior-attention element-wise kernels. Tensors cross as raw addresses
// (tensor.data_ptr()) with their sizes; hermes/ops/_prior_kernels.py validates everything first.
// Each function takes `cuda` (run the CUDA kernel on `stream`) or runs on the CPU.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "hermes/prior_attention.h"

namespace py = pybind11;

namespace hermes {
namespace bindings {

namespace {

namespace pa = hermes::prior_attention;

void* vp(std::uintptr_t address) { return reinterpret_cast<void*>(address); }

void check_sizes(int64_t rows, int64_t cols, const char* what) {
  if (rows < 0 || cols < 1) throw std::invalid_argument(std::string(what) + ": bad sizes");
}

[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) + ": hermes._C was built without CUDA");
}

}  // namespace

void register_prior_attention(py::module_& m) {
#ifdef HERMES_WITH_CUDA
  m.attr("pa_cuda_compiled") = true;
#else
  m.attr("pa_cuda_compiled") = false;
#endif
  m.def(
      "pa_ln_fwd",
      [](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
         std::uintptr_t mean, std::uintptr_t rstd, int64_t rows, int64_t cols, double eps,
         bool cuda, std::uintptr_t stream) {
        check_sizes(rows, cols, "pa_ln_fwd");
        pa::LnFwdArgs a{dtype, vp(x), vp(w), vp(b), vp(y), vp(mean), vp(rstd), rows, cols, eps};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::ln_fwd_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_ln_fwd");
#endif
        } else {
          py::gil_scoped_release release;
          pa::ln_fwd_cpu(a);
        }
      },
      "LayerNorm of rows x cols (y, per-row mean and rstd).");
  m.def(
      "pa_ln_bwd",
      [](int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t mean, std::uintptr_t rstd,
         std::uintptr_t w, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db, int64_t rows,
         int64_t cols, bool accumulate, bool cuda, std::uintptr_t stream) {
        check_sizes(rows, cols, "pa_ln_bwd");
        pa::LnBwdArgs a{dtype, vp(dy), vp(x), vp(mean), vp(rstd), vp(w), vp(dx), vp(dw), vp(db),
                        rows, cols, accumulate};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::ln_bwd_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_ln_bwd");
#endif
        } else {
          py::gil_scoped_release release;
          pa::ln_bwd_cpu(a);
        }
      },
      "LayerNorm backward: dx (+)= dLN/dx, dweight += sum dy*xhat, dbias += sum dy.");
  m.def(
      "pa_head_softmax",
      [](int dtype, std::uintptr_t s, std::uintptr_t dp, int64_t heads, int64_t n, int64_t cols,
         bool cuda, std::uintptr_t stream) {
        check_sizes(heads * n, cols, "pa_head_softmax");
        if (heads < 1 || n < 1) throw std::invalid_argument("pa_head_softmax: bad sizes");
        pa::HeadSoftmaxArgs a{dtype, vp(s), dp == 0 ? nullptr : vp(dp), heads, n, cols};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::head_softmax_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_head_softmax");
#endif
        } else {
          py::gil_scoped_release release;
          pa::head_softmax_cpu(a);
        }
      },
      "Softmax over each head's n rows of a (heads*n) x cols matrix, per column (dp != 0: also "
      "the softmax backward into dp).");
  m.def(
      "pa_online_update",
      [](int dtype, std::uintptr_t s, std::uintptr_t mx, std::uintptr_t l, std::uintptr_t alpha,
         int64_t rows, int64_t cols, bool cuda, std::uintptr_t stream) {
        check_sizes(rows, cols, "pa_online_update");
        pa::OnlineUpdateArgs a{dtype, vp(s), vp(mx), vp(l), vp(alpha), rows, cols};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::online_update_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_online_update");
#endif
        } else {
          py::gil_scoped_release release;
          pa::online_update_cpu(a);
        }
      },
      "One chunk of an online softmax over columns (running max/sum, rescale factor).");
  m.def(
      "pa_gather_bwd",
      [](int dtype, std::uintptr_t s, std::uintptr_t dp, std::uintptr_t lse, std::uintptr_t dsum,
         int64_t rows, int64_t cols, bool cuda, std::uintptr_t stream) {
        check_sizes(rows, cols, "pa_gather_bwd");
        pa::GatherBwdArgs a{dtype, vp(s), vp(dp), vp(lse), vp(dsum), rows, cols};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::gather_bwd_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_gather_bwd");
#endif
        } else {
          py::gil_scoped_release release;
          pa::gather_bwd_cpu(a);
        }
      },
      "Softmax backward from saved log-sum-exp: s <- p = exp(s - lse), dp <- p (dp - dsum).");
  m.def(
      "pa_bias_gelu",
      [](int dtype, std::uintptr_t u, std::uintptr_t bias, std::uintptr_t dg, int64_t rows,
         int64_t cols, bool cuda, std::uintptr_t stream) {
        check_sizes(rows, cols, "pa_bias_gelu");
        pa::BiasGeluArgs a{dtype, vp(u), vp(bias), dg == 0 ? nullptr : vp(dg), rows, cols};
        if (cuda) {
#ifdef HERMES_WITH_CUDA
          pa::bias_gelu_cuda(a, stream);
#else
          (void)stream;
          no_cuda("pa_bias_gelu");
#endif
        } else {
          py::gil_scoped_release release;
          pa::bias_gelu_cpu(a);
        }
      },
      "u <- GELU(u + bias) in place (dg != 0: also dg <- dg * GELU'(u + bias)).");
}

}  // namespace bindings
}  // namespace hermes
