// CUDA side of GEGLU. Per-element math: fastdiff/math/gelu.h, the header the CPU kernel runs too.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "elem.cuh"
#include "fastdiff/math/gelu.h"

namespace fastdiff::cuda {
namespace {

// x: rows x 2h ([a | g] per row), y: rows x h. One thread per output element, grid-stride.
template <typename T>
__global__ void geglu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const T* a = x + r * 2 * h;
    y[i] = from_f<T>(to_f(a[j]) * fd_gelu(to_f(a[h + j])));
  }
}

// dy: rows x h, x: rows x 2h, dx: rows x 2h ([da | dg]).
template <typename T>
__global__ void geglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t n,
                                 int64_t h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const int64_t ia = r * 2 * h + j;
    const float g = to_f(x[ia + h]), d = to_f(dy[i]);
    dx[ia] = from_f<T>(fd_geglu_grad_a(d, g));
    dx[ia + h] = from_f<T>(fd_geglu_grad_g(d, to_f(x[ia]), g));
  }
}

at::Tensor geglu_cuda(const at::Tensor& x) {
  check_cuda_contig(x, "geglu", "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu: the last dimension of x must be even, got ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1) / 2, n = x.numel() / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = h;
  at::Tensor y = at::empty(sizes, x.options());
  if (n == 0) return y;
  dispatch_float_types(x, "geglu", [&](auto tag) {
    using T = decltype(tag);
    geglu_fwd_kernel<T><<<elementwise_blocks(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(x), dptr<T>(y), n, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor geglu_backward_cuda(const at::Tensor& dy, const at::Tensor& x) {
  check_cuda_contig(x, "geglu_backward", "x");
  check_cuda_contig(dy, "geglu_backward", "grad");
  check_same_device(dy, x.device(), "geglu_backward", "grad");
  TORCH_CHECK(x.size(-1) % 2 == 0 && dy.numel() * 2 == x.numel() && dy.scalar_type() == x.scalar_type(),
              "geglu_backward: grad ", dy.sizes(), " does not match x ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1) / 2, n = dy.numel();
  at::Tensor dx = at::empty_like(x);
  if (n == 0) return dx;
  dispatch_float_types(x, "geglu_backward", [&](auto tag) {
    using T = decltype(tag);
    geglu_bwd_kernel<T><<<elementwise_blocks(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dptr<T>(dy), dptr<T>(x), dptr<T>(dx), n, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace fastdiff::cuda

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("geglu", &fastdiff::cuda::geglu_cuda);
  m.impl("geglu_backward", &fastdiff::cuda::geglu_backward_cuda);
}
