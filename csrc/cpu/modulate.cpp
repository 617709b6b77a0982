// Torch-facing side of the adaLN ops of DiT / SD3: modulate, layer_norm_modulate (AdaLayerNormZero's
// norm(x) * (1 + scale) + shift in one pass) and gate_residual (x + gate * y). x is (B, ..., D), contiguous;
// shift/scale/gate are fp32 (B, D) (the Python wrappers cast them). Math: fastdiff/math/modulate.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dispatch.h"
#include "tensor_util.h"

#define FD_MOD_DECLARE(T)                                                                                        \
  FD_DECLARE_ISA_KERNEL(void, modulate_fwd, const T*, const float*, const float*, T*, int64_t, int64_t, int64_t, \
                        int64_t)                                                                                 \
  FD_DECLARE_ISA_KERNEL(void, modulate_bwd, const T*, const T*, const float*, T*, float*, int64_t, int64_t,      \
                        int64_t, int64_t, int64_t)                                                               \
  FD_DECLARE_ISA_KERNEL(void, layer_norm_modulate_fwd, const T*, const float*, const float*, T*, float*, float*, \
                        int64_t, int64_t, int64_t, int64_t, float)                                               \
  FD_DECLARE_ISA_KERNEL(void, layer_norm_modulate_bwd, const T*, const T*, const float*, const float*,           \
                        const float*, T*, float*, int64_t, int64_t, int64_t, int64_t, int64_t)                   \
  FD_DECLARE_ISA_KERNEL(void, gate_residual_fwd, const T*, const float*, const T*, T*, int64_t, int64_t, int64_t, \
                        int64_t)                                                                                 \
  FD_DECLARE_ISA_KERNEL(void, gate_residual_bwd, const T*, const float*, const T*, T*, float*, int64_t, int64_t, \
                        int64_t, int64_t)
FD_MOD_DECLARE(float)
FD_MOD_DECLARE(uint16_t)
#undef FD_MOD_DECLARE

namespace fastdiff::cpu {
namespace {

struct Dims {
  int64_t B, L, D, rows;
};

// x: (B, ..., D) contiguous CPU tensor; the per-batch vectors: fp32 (B, D).
Dims check_x(const at::Tensor& x, const char* op) {
  fd_check_cpu_contig(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (B, ..., D), got shape ", x.sizes());
  Dims d{x.size(0), 0, x.size(-1), 0};
  d.rows = d.D ? x.numel() / d.D : 0;
  d.L = d.B ? d.rows / d.B : 0;
  return d;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  fd_check_cpu_contig(t, op, name);
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), op, ": ", name, " ", t.sizes(), " ",
              t.scalar_type(), " does not match x ", x.sizes(), " ", x.scalar_type());
}

at::Tensor per_batch(const at::Tensor& acc, bool wanted, int64_t part, const Dims& d) {
  at::Tensor t = fd_acc_part(acc, wanted, part * d.B * d.D, d.B * d.D);
  return wanted ? t.view({d.B, d.D}) : t;
}

at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  const Dims d = check_x(x, "modulate");
  fd_check_param(shift, d.B * d.D, "modulate", "shift");
  fd_check_param(scale, d.B * d.D, "modulate", "scale");
  at::Tensor y = at::empty_like(x);
  fd_float_or_bf16(x, "modulate", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = fd_data<T>(x);
    T* yp = fd_data<T>(y);
    const float *sh = shift.data_ptr<float>(), *sc = scale.data_ptr<float>();
    at::parallel_for(0, d.rows, fd_row_grain(d.D), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(modulate_fwd, xp, sh, sc, yp, lo, hi, d.L, d.D);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& scale, bool param_grads) {
  const Dims d = check_x(x, "modulate_backward");
  check_like(dy, x, "modulate_backward", "grad");
  fd_check_param(scale, d.B * d.D, "modulate_backward", "scale");
  at::Tensor dx = at::empty_like(x);
  at::Tensor acc;
  fd_float_or_bf16(x, "modulate_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *gp = fd_data<T>(dy), *xp = fd_data<T>(x);
    T* dp = fd_data<T>(dx);
    const float* sc = scale.data_ptr<float>();
    acc = fd_rows_with_acc(d.rows, fd_row_grain(d.D), param_grads ? 2 * d.B * d.D : 0,
                           [&](int64_t lo, int64_t hi, float* a) {
                             FD_ISA_CALL(modulate_bwd, gp, xp, sc, dp, a, d.B, lo, hi, d.L, d.D);
                           });
  });
  return {dx, per_batch(acc, param_grads, 0, d), per_batch(acc, param_grads, 1, d)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate(const at::Tensor& x, const at::Tensor& shift,
                                                                   const at::Tensor& scale, double eps) {
  const Dims d = check_x(x, "layer_norm_modulate");
  fd_check_param(shift, d.B * d.D, "layer_norm_modulate", "shift");
  fd_check_param(scale, d.B * d.D, "layer_norm_modulate", "scale");
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor mean = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  if (d.rows == 0) return {y, mean, rstd};
  fd_float_or_bf16(x, "layer_norm_modulate", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = fd_data<T>(x);
    T* yp = fd_data<T>(y);
    const float *sh = shift.data_ptr<float>(), *sc = scale.data_ptr<float>();
    float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    at::parallel_for(0, d.rows, fd_row_grain(d.D), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(layer_norm_modulate_fwd, xp, sh, sc, yp, mp, rp, lo, hi, d.L, d.D, static_cast<float>(eps));
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                       const at::Tensor& scale,
                                                                       const at::Tensor& mean,
                                                                       const at::Tensor& rstd, bool param_grads) {
  const Dims d = check_x(x, "layer_norm_modulate_backward");
  check_like(dy, x, "layer_norm_modulate_backward", "grad");
  fd_check_param(scale, d.B * d.D, "layer_norm_modulate_backward", "scale");
  fd_check_param(mean, d.rows, "layer_norm_modulate_backward", "mean");
  fd_check_param(rstd, d.rows, "layer_norm_modulate_backward", "rstd");
  at::Tensor dx = at::empty_like(x);
  at::Tensor acc;
  fd_float_or_bf16(x, "layer_norm_modulate_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *gp = fd_data<T>(dy), *xp = fd_data<T>(x);
    T* dp = fd_data<T>(dx);
    const float *sc = scale.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    acc = fd_rows_with_acc(d.rows, fd_row_grain(d.D), param_grads ? 2 * d.B * d.D : 0,
                           [&](int64_t lo, int64_t hi, float* a) {
                             FD_ISA_CALL(layer_norm_modulate_bwd, gp, xp, sc, mp, rp, dp, a, d.B, lo, hi, d.L, d.D);
                           });
  });
  return {dx, per_batch(acc, param_grads, 0, d), per_batch(acc, param_grads, 1, d)};
}

at::Tensor gate_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  const Dims d = check_x(x, "gate_residual");
  fd_check_param(gate, d.B * d.D, "gate_residual", "gate");
  check_like(y, x, "gate_residual", "y");
  at::Tensor out = at::empty_like(x);
  fd_float_or_bf16(x, "gate_residual", [&](auto tag) {
    using T = decltype(tag);
    const T *xp = fd_data<T>(x), *yp = fd_data<T>(y);
    T* op = fd_data<T>(out);
    const float* gp = gate.data_ptr<float>();
    at::parallel_for(0, d.rows, fd_row_grain(d.D), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(gate_residual_fwd, xp, gp, yp, op, lo, hi, d.L, d.D);
    });
  });
  return out;
}

// Returns (dy, dgate); dx is the incoming gradient itself.
std::tuple<at::Tensor, at::Tensor> gate_residual_bwd(const at::Tensor& dout, const at::Tensor& gate,
                                                     const at::Tensor& y, bool gate_grad) {
  const Dims d = check_x(y, "gate_residual_backward");
  check_like(dout, y, "gate_residual_backward", "grad");
  fd_check_param(gate, d.B * d.D, "gate_residual_backward", "gate");
  at::Tensor dy = at::empty_like(y);
  at::Tensor acc;
  fd_float_or_bf16(y, "gate_residual_backward", [&](auto tag) {
    using T = decltype(tag);
    const T *gp = fd_data<T>(dout), *yp = fd_data<T>(y);
    T* dp = fd_data<T>(dy);
    const float* gt = gate.data_ptr<float>();
    acc = fd_rows_with_acc(d.rows, fd_row_grain(d.D), gate_grad ? d.B * d.D : 0,
                           [&](int64_t lo, int64_t hi, float* a) {
                             FD_ISA_CALL(gate_residual_bwd, gp, gt, yp, dp, a, lo, hi, d.L, d.D);
                           });
  });
  return {dy, per_batch(acc, gate_grad, 0, d)};
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("modulate(Tensor x, Tensor shift, Tensor scale) -> Tensor");
  m.def("modulate_bwd(Tensor grad, Tensor x, Tensor scale, bool param_grads) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_modulate_bwd(Tensor grad, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
        "bool param_grads) -> (Tensor, Tensor, Tensor)");
  m.def("gate_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gate_residual_bwd(Tensor grad, Tensor gate, Tensor y, bool gate_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("modulate", &fastdiff::cpu::modulate);
  m.impl("modulate_bwd", &fastdiff::cpu::modulate_bwd);
  m.impl("layer_norm_modulate", &fastdiff::cpu::layer_norm_modulate);
  m.impl("layer_norm_modulate_bwd", &fastdiff::cpu::layer_norm_modulate_bwd);
  m.impl("gate_residual", &fastdiff::cpu::gate_residual);
  m.impl("gate_residual_bwd", &fastdiff::cpu::gate_residual_bwd);
}
