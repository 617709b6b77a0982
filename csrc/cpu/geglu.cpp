// Torch-facing side of GEGLU (y = a * gelu(g), [a, g] = x.chunk(2, -1)): schema, checks, threading, ISA choice.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dispatch.h"
#include "tensor_util.h"

FD_DECLARE_ISA_KERNEL(void, geglu_fwd, const float*, float*, int64_t, int64_t)
FD_DECLARE_ISA_KERNEL(void, geglu_fwd, const uint16_t*, uint16_t*, int64_t, int64_t)
FD_DECLARE_ISA_KERNEL(void, geglu_bwd, const float*, const float*, float*, int64_t, int64_t)
FD_DECLARE_ISA_KERNEL(void, geglu_bwd, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t)

namespace fastdiff::cpu {
namespace {

void check_x(const at::Tensor& x) {
  fd_check_cpu_contig(x, "geglu", "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu: the last dimension of x must be even (value and "
              "gate halves), got shape ", x.sizes());
}

at::Tensor geglu(const at::Tensor& x) {
  check_x(x);
  const int64_t h = x.size(-1) / 2, rows = h ? x.numel() / (2 * h) : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = h;
  at::Tensor y = at::empty(sizes, x.options());
  fd_float_or_bf16(x, "geglu", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = fd_data<T>(x);
    T* yp = fd_data<T>(y);
    at::parallel_for(0, rows, fd_row_grain(h), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(geglu_fwd, xp + lo * 2 * h, yp + lo * h, hi - lo, h);
    });
  });
  return y;
}

at::Tensor geglu_backward(const at::Tensor& dy, const at::Tensor& x) {
  check_x(x);
  fd_check_cpu_contig(dy, "geglu_backward", "grad");
  const int64_t h = x.size(-1) / 2, rows = h ? x.numel() / (2 * h) : 0;
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.numel() == rows * h, "geglu_backward: grad ", dy.sizes(),
              " ", dy.scalar_type(), " does not match the output of x ", x.sizes(), " ", x.scalar_type());
  at::Tensor dx = at::empty_like(x);
  fd_float_or_bf16(x, "geglu_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* dp = fd_data<T>(dy);
    const T* xp = fd_data<T>(x);
    T* gp = fd_data<T>(dx);
    at::parallel_for(0, rows, fd_row_grain(h), [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(geglu_bwd, dp + lo * h, xp + lo * 2 * h, gp + lo * 2 * h, hi - lo, h);
    });
  });
  return dx;
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("geglu(Tensor x) -> Tensor");
  m.def("geglu_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("geglu", &fastdiff::cpu::geglu);
  m.impl("geglu_backward", &fastdiff::cpu::geglu_backward);
}
