// Torch-facing side of RMSNorm over the last dimension (diffusers' RMSNorm; SD3 q/k norm): schema, checks,
// threading, ISA choice. Saves per-row rstd (fp32) for the backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dispatch.h"
#include "tensor_util.h"

FD_DECLARE_ISA_KERNEL(void, rms_norm_fwd, const float*, const float*, const float*, float*, float*, int64_t,
                      int64_t, float)
FD_DECLARE_ISA_KERNEL(void, rms_norm_fwd, const uint16_t*, const float*, const float*, uint16_t*, float*, int64_t,
                      int64_t, float)
FD_DECLARE_ISA_KERNEL(void, rms_norm_bwd, const float*, const float*, const float*, const float*, float*, float*,
                      float*, int64_t, int64_t)
FD_DECLARE_ISA_KERNEL(void, rms_norm_bwd, const uint16_t*, const uint16_t*, const float*, const float*, uint16_t*,
                      float*, float*, int64_t, int64_t)

namespace fastdiff::cpu {
namespace {

void check_params(const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                  const char* op) {
  fd_check_cpu_contig(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  if (w.has_value()) fd_check_param(*w, x.size(-1), op, "weight");
  if (b.has_value()) fd_check_param(*b, x.size(-1), op, "bias");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                                const std::optional<at::Tensor>& b, double eps) {
  check_params(x, w, b, "rms_norm");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, rstd};
  const float* wp = fd_data_or_null<float>(w);
  const float* bp = fd_data_or_null<float>(b);
  float* rp = rstd.data_ptr<float>();
  fd_float_or_bf16(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = fd_data<T>(x);
    T* yp = fd_data<T>(y);
    at::parallel_for(0, rows, fd_row_grain(d), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(rms_norm_fwd, xp + lo * d, wp, bp, yp + lo * d, rp + lo, hi - lo, d, static_cast<float>(eps));
    });
  });
  return {y, rstd};
}

// Returns (dx, dweight, dbias); dweight/dbias are fp32 vectors when param_grads, else empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& w,
                                                            const at::Tensor& rstd, bool param_grads) {
  check_params(x, w, std::nullopt, "rms_norm_backward");
  fd_check_cpu_contig(dy, "rms_norm_backward", "grad");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "rms_norm_backward: grad ",
              dy.sizes(), " ", dy.scalar_type(), " does not match x ", x.sizes(), " ", x.scalar_type());
  fd_check_param(rstd, rows, "rms_norm_backward", "rstd");
  at::Tensor dx = at::empty_like(x);
  const float* wp = fd_data_or_null<float>(w);
  const float* rp = rstd.data_ptr<float>();
  at::Tensor acc;
  fd_float_or_bf16(x, "rms_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = fd_data<T>(dy);
    const T* xp = fd_data<T>(x);
    T* dp = fd_data<T>(dx);
    acc = fd_rows_with_acc(rows, fd_row_grain(d), param_grads ? 2 * d : 0, [&](int64_t lo, int64_t hi, float* a) {
      FD_ISA_CALL(rms_norm_bwd, gp + lo * d, xp + lo * d, wp, rp + lo, dp + lo * d, a, a ? a + d : nullptr,
                  hi - lo, d);
    });
  });
  return {dx, fd_acc_part(acc, param_grads, 0, d), fd_acc_part(acc, param_grads, d, d)};
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor rstd, bool param_grads) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("rms_norm_fwd", &fastdiff::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fastdiff::cpu::rms_norm_bwd);
}
