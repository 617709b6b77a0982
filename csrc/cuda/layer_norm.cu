// CUDA side of LayerNorm over the last dimension. Per-element math: fastdiff/math/norm.h (shared with the CPU
// kernels). One block per row (the row stays in L1 across the passes), parameter gradients by column sums.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "elem.cuh"
#include "fastdiff/math/norm.h"

namespace fastdiff::cuda {
namespace {

// x, y: rows x d; w, b: fp32 d or null; mean, rstd: fp32 per row (written).
template <typename T>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                              T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t d,
                              float eps) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  T* yr = y + r * d;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s += to_f(xr[j]);
  const float m = block_sum(s, shm) / static_cast<float>(d);
  float v = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float t = to_f(xr[j]) - m;
    v += t * t;
  }
  const float rs = fd_rstd(block_sum(v, shm) / static_cast<float>(d), eps);
  if (threadIdx.x == 0) {
    mean[r] = m;
    rstd[r] = rs;
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    yr[j] = from_f<T>(fd_norm_affine((to_f(xr[j]) - m) * rs, w ? w[j] : 1.f, b ? b[j] : 0.f));
  }
}

// dy, x, dx: rows x d; w: fp32 d or null; mean, rstd: fp32 per row.
template <typename T>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                              int64_t d) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  const T* gr = dy + r * d;
  const float m = mean[r], rs = rstd[r];
  float sg = 0.f, sgx = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = to_f(gr[j]) * (w ? w[j] : 1.f);
    sg += g;
    sgx += g * (to_f(xr[j]) - m) * rs;
  }
  const float mg = block_sum(sg, shm) / static_cast<float>(d);
  const float mgx = block_sum(sgx, shm) / static_cast<float>(d);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = to_f(gr[j]) * (w ? w[j] : 1.f);
    dx[r * d + j] = from_f<T>(fd_layer_norm_grad_x(g, (to_f(xr[j]) - m) * rs, rs, mg, mgx));
  }
}

// (dy * xhat, dy) at (row, col): the terms of dweight and dbias.
template <typename T>
struct LnParamTerms {
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  int64_t d;
  __device__ float2 operator()(int64_t r, int64_t j) const {
    const float g = to_f(dy[r * d + j]);
    return make_float2(g * (to_f(x[r * d + j]) - mean[r]) * rstd[r], g);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& w,
                                                                   const std::optional<at::Tensor>& b, double eps) {
  check_cuda_contig(x, "layer_norm", "x");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  if (w.has_value()) check_cuda_param(*w, d, "layer_norm", "weight", x.device());
  if (b.has_value()) check_cuda_param(*b, d, "layer_norm", "bias", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor mean = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  dispatch_float_types(x, "layer_norm", [&](auto tag) {
    using T = decltype(tag);
    ln_fwd_kernel<T><<<static_cast<unsigned>(rows), row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(x), w ? dptr<float>(*w) : nullptr, b ? dptr<float>(*b) : nullptr, dptr<T>(y), dptr<float>(mean),
        dptr<float>(rstd), d, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& w,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool param_grads) {
  check_cuda_contig(x, "layer_norm_backward", "x");
  check_cuda_contig(dy, "layer_norm_backward", "grad");
  check_same_device(dy, x.device(), "layer_norm_backward", "grad");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "layer_norm_backward: grad ",
              dy.sizes(), " does not match x ", x.sizes());
  if (w.has_value()) check_cuda_param(*w, d, "layer_norm_backward", "weight", x.device());
  check_cuda_param(mean, rows, "layer_norm_backward", "mean", x.device());
  check_cuda_param(rstd, rows, "layer_norm_backward", "rstd", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = param_grads ? at::zeros({d}, f32) : at::empty({0}, f32);
  at::Tensor db = param_grads ? at::zeros({d}, f32) : at::empty({0}, f32);
  if (rows == 0) return {dx, dw, db};
  dispatch_float_types(x, "layer_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    ln_bwd_kernel<T><<<static_cast<unsigned>(rows), row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(dy), dptr<T>(x), w ? dptr<float>(*w) : nullptr, dptr<float>(mean), dptr<float>(rstd), dptr<T>(dx),
        d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (param_grads) {
      launch_column_sums(LnParamTerms<T>{dptr<T>(dy), dptr<T>(x), dptr<float>(mean), dptr<float>(rstd), d}, 1, rows,
                         d, dptr<float>(dw), dptr<float>(db));
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastdiff::cuda

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("layer_norm_fwd", &fastdiff::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastdiff::cuda::layer_norm_bwd_cuda);
}
