// CUDA side of the adaLN ops (modulate, layer_norm_modulate, gate_residual). Per-element math:
// fastdiff/math/modulate.h and norm.h, shared with the CPU kernels. x is (B, ..., D) = B*L rows of D; shift,
// scale, gate are fp32 (B, D). Elementwise ops use a grid-stride loop, the LayerNorm fusion one block per row,
// and the per-batch parameter gradients the column sums of elem.cuh (one group per batch element).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "elem.cuh"
#include "fastdiff/math/modulate.h"
#include "fastdiff/math/norm.h"

namespace fastdiff::cuda {
namespace {

// Index of the (B, D) vector element for flat element i of a (B, L, D) tensor.
__device__ __forceinline__ int64_t bd_index(int64_t i, int64_t L, int64_t D) {
  const int64_t r = i / D;
  return (r / L) * D + (i - r * D);
}

template <typename T>
__global__ void modulate_kernel(const T* __restrict__ x, const float* __restrict__ shift,
                                const float* __restrict__ scale, T* __restrict__ y, int64_t n, int64_t L, int64_t D) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = bd_index(i, L, D);
    y[i] = from_f<T>(fd_modulate(to_f(x[i]), shift[k], scale[k]));
  }
}

// out = a * vec (+ 0): dx = dy * (1 + scale) when one_plus, dy = dout * gate otherwise.
template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ g, const float* __restrict__ v, T* __restrict__ out,
                                  int64_t n, int64_t L, int64_t D, bool one_plus) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float s = v[bd_index(i, L, D)];
    out[i] = from_f<T>(to_f(g[i]) * (one_plus ? 1.f + s : s));
  }
}

template <typename T>
__global__ void gate_residual_kernel(const T* __restrict__ x, const float* __restrict__ gate, const T* __restrict__ y,
                                     T* __restrict__ out, int64_t n, int64_t L, int64_t D) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = from_f<T>(fd_gate_residual(to_f(x[i]), gate[bd_index(i, L, D)], to_f(y[i])));
  }
}

template <typename T>
__global__ void ln_modulate_fwd_kernel(const T* __restrict__ x, const float* __restrict__ shift,
                                       const float* __restrict__ scale, T* __restrict__ y, float* __restrict__ mean,
                                       float* __restrict__ rstd, int64_t L, int64_t D, float eps) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const float* sh = shift + (r / L) * D;
  const float* sc = scale + (r / L) * D;
  const T* xr = x + r * D;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += to_f(xr[j]);
  const float m = block_sum(s, shm) / static_cast<float>(D);
  float v = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float t = to_f(xr[j]) - m;
    v += t * t;
  }
  const float rs = fd_rstd(block_sum(v, shm) / static_cast<float>(D), eps);
  if (threadIdx.x == 0) {
    mean[r] = m;
    rstd[r] = rs;
  }
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    y[r * D + j] = from_f<T>(fd_modulate((to_f(xr[j]) - m) * rs, sh[j], sc[j]));
  }
}

template <typename T>
__global__ void ln_modulate_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ scale, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, T* __restrict__ dx, int64_t L, int64_t D) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const float* sc = scale + (r / L) * D;
  const T* xr = x + r * D;
  const T* gr = dy + r * D;
  const float m = mean[r], rs = rstd[r];
  float sg = 0.f, sgx = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = to_f(gr[j]) * (1.f + sc[j]);
    sg += g;
    sgx += g * (to_f(xr[j]) - m) * rs;
  }
  const float mg = block_sum(sg, shm) / static_cast<float>(D);
  const float mgx = block_sum(sgx, shm) / static_cast<float>(D);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = to_f(gr[j]) * (1.f + sc[j]);
    dx[r * D + j] = from_f<T>(fd_layer_norm_grad_x(g, (to_f(xr[j]) - m) * rs, rs, mg, mgx));
  }
}

// (dy, dy * x) for modulate; (dy, dy * xhat) for layer_norm_modulate (mean/rstd non-null); (dout * y, 0) for the gate.
template <typename T>
struct ModTerms {
  const T* g;
  const T* x;
  const float* mean;
  const float* rstd;
  int64_t D;
  bool product_only;
  __device__ float2 operator()(int64_t r, int64_t j) const {
    const float gv = to_f(g[r * D + j]);
    float xv = to_f(x[r * D + j]);
    if (mean != nullptr) xv = (xv - mean[r]) * rstd[r];
    return product_only ? make_float2(gv * xv, 0.f) : make_float2(gv, gv * xv);
  }
};

struct Dims {
  int64_t B, L, D, rows, n;
};

Dims check_x(const at::Tensor& x, const char* op) {
  check_cuda_contig(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (B, ..., D), got shape ", x.sizes());
  Dims d{x.size(0), 0, x.size(-1), 0, x.numel()};
  d.rows = d.D ? d.n / d.D : 0;
  d.L = d.B ? d.rows / d.B : 0;
  return d;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_cuda_contig(t, op, name);
  check_same_device(t, x.device(), op, name);
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), op, ": ", name, " ", t.sizes(),
              " does not match x ", x.sizes());
}

at::Tensor maybe_zeros(bool wanted, const Dims& d, const at::Tensor& like) {
  const auto f32 = like.options().dtype(at::kFloat);
  return wanted ? at::zeros({d.B, d.D}, f32) : at::empty({0}, f32);
}

at::Tensor modulate_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  const Dims d = check_x(x, "modulate");
  check_cuda_param(shift, d.B * d.D, "modulate", "shift", x.device());
  check_cuda_param(scale, d.B * d.D, "modulate", "scale", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (d.n == 0) return y;
  dispatch_float_types(x, "modulate", [&](auto tag) {
    using T = decltype(tag);
    modulate_kernel<T><<<elementwise_blocks(d.n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(x), dptr<float>(shift), dptr<float>(scale), dptr<T>(y), d.n, d.L, d.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& scale, bool param_grads) {
  const Dims d = check_x(x, "modulate_backward");
  check_like(dy, x, "modulate_backward", "grad");
  check_cuda_param(scale, d.B * d.D, "modulate_backward", "scale", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dshift = maybe_zeros(param_grads, d, x), dscale = maybe_zeros(param_grads, d, x);
  if (d.n == 0) return {dx, dshift, dscale};
  dispatch_float_types(x, "modulate_backward", [&](auto tag) {
    using T = decltype(tag);
    scale_rows_kernel<T><<<elementwise_blocks(d.n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(dy), dptr<float>(scale), dptr<T>(dx), d.n, d.L, d.D, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (param_grads) {
      launch_column_sums(ModTerms<T>{dptr<T>(dy), dptr<T>(x), nullptr, nullptr, d.D, false}, d.B, d.L, d.D,
                         dptr<float>(dshift), dptr<float>(dscale));
    }
  });
  return {dx, dshift, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                                        const at::Tensor& scale, double eps) {
  const Dims d = check_x(x, "layer_norm_modulate");
  check_cuda_param(shift, d.B * d.D, "layer_norm_modulate", "shift", x.device());
  check_cuda_param(scale, d.B * d.D, "layer_norm_modulate", "scale", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor mean = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  if (d.rows == 0) return {y, mean, rstd};
  dispatch_float_types(x, "layer_norm_modulate", [&](auto tag) {
    using T = decltype(tag);
    ln_modulate_fwd_kernel<T><<<static_cast<unsigned>(d.rows), row_threads(d.D), 0,
                                c10::cuda::getCurrentCUDAStream()>>>(dptr<T>(x), dptr<float>(shift),
                                                                     dptr<float>(scale), dptr<T>(y), dptr<float>(mean),
                                                                     dptr<float>(rstd), d.L, d.D,
                                                                     static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_modulate_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                            const at::Tensor& scale,
                                                                            const at::Tensor& mean,
                                                                            const at::Tensor& rstd, bool param_grads) {
  const Dims d = check_x(x, "layer_norm_modulate_backward");
  check_like(dy, x, "layer_norm_modulate_backward", "grad");
  check_cuda_param(scale, d.B * d.D, "layer_norm_modulate_backward", "scale", x.device());
  check_cuda_param(mean, d.rows, "layer_norm_modulate_backward", "mean", x.device());
  check_cuda_param(rstd, d.rows, "layer_norm_modulate_backward", "rstd", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dshift = maybe_zeros(param_grads, d, x), dscale = maybe_zeros(param_grads, d, x);
  if (d.rows == 0) return {dx, dshift, dscale};
  dispatch_float_types(x, "layer_norm_modulate_backward", [&](auto tag) {
    using T = decltype(tag);
    ln_modulate_bwd_kernel<T><<<static_cast<unsigned>(d.rows), row_threads(d.D), 0,
                                c10::cuda::getCurrentCUDAStream()>>>(dptr<T>(dy), dptr<T>(x), dptr<float>(scale),
                                                                     dptr<float>(mean), dptr<float>(rstd), dptr<T>(dx),
                                                                     d.L, d.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (param_grads) {
      launch_column_sums(ModTerms<T>{dptr<T>(dy), dptr<T>(x), dptr<float>(mean), dptr<float>(rstd), d.D, false}, d.B,
                         d.L, d.D, dptr<float>(dshift), dptr<float>(dscale));
    }
  });
  return {dx, dshift, dscale};
}

at::Tensor gate_residual_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  const Dims d = check_x(x, "gate_residual");
  check_cuda_param(gate, d.B * d.D, "gate_residual", "gate", x.device());
  check_like(y, x, "gate_residual", "y");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (d.n == 0) return out;
  dispatch_float_types(x, "gate_residual", [&](auto tag) {
    using T = decltype(tag);
    gate_residual_kernel<T><<<elementwise_blocks(d.n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(x), dptr<float>(gate), dptr<T>(y), dptr<T>(out), d.n, d.L, d.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_residual_bwd_cuda(const at::Tensor& dout, const at::Tensor& gate,
                                                          const at::Tensor& y, bool gate_grad) {
  const Dims d = check_x(y, "gate_residual_backward");
  check_like(dout, y, "gate_residual_backward", "grad");
  check_cuda_param(gate, d.B * d.D, "gate_residual_backward", "gate", y.device());
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dy = at::empty_like(y);
  at::Tensor dgate = maybe_zeros(gate_grad, d, y);
  if (d.n == 0) return {dy, dgate};
  dispatch_float_types(y, "gate_residual_backward", [&](auto tag) {
    using T = decltype(tag);
    scale_rows_kernel<T><<<elementwise_blocks(d.n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(dout), dptr<float>(gate), dptr<T>(dy), d.n, d.L, d.D, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gate_grad) {
      launch_column_sums(ModTerms<T>{dptr<T>(dout), dptr<T>(y), nullptr, nullptr, d.D, true}, d.B, d.L, d.D,
                         dptr<float>(dgate), nullptr);
    }
  });
  return {dy, dgate};
}

}  // namespace
}  // namespace fastdiff::cuda

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("modulate", &fastdiff::cuda::modulate_cuda);
  m.impl("modulate_bwd", &fastdiff::cuda::modulate_bwd_cuda);
  m.impl("layer_norm_modulate", &fastdiff::cuda::layer_norm_modulate_cuda);
  m.impl("layer_norm_modulate_bwd", &fastdiff::cuda::layer_norm_modulate_bwd_cuda);
  m.impl("gate_residual", &fastdiff::cuda::gate_residual_cuda);
  m.impl("gate_residual_bwd", &fastdiff::cuda::gate_residual_bwd_cuda);
}
