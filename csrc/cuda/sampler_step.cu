// CUDA side of the fused sampler update. The per-element math is fastdiff/math/sampler_step.h, the same
// header the CPU kernel runs (and the CPU tests exercise).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "fastdiff/math/sampler_step.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }

// x, u (unconditional or only output), c (conditional or null), noise (or null), out: n elements each.
template <typename T>
__global__ void sampler_step_kernel(const T* __restrict__ x, const T* __restrict__ u, const T* __restrict__ c,
                                    const T* __restrict__ noise, T* __restrict__ out, int64_t n, FdStepCoefs k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float uf = to_f(u[i]);
    const float m = c != nullptr ? fd_guide(uf, to_f(c[i]), k.g) : uf;
    const float z = noise != nullptr ? to_f(noise[i]) : 0.f;
    out[i] = from_f<T>(fd_step(to_f(x[i]), m, z, k));
  }
}

template <typename T, typename A>
void launch(const at::Tensor& x, const at::Tensor& m, const at::Tensor* z, bool guided, at::Tensor& out,
            const FdStepCoefs& k) {
  const int64_t n = x.numel();
  const T* up = reinterpret_cast<const T*>(m.data_ptr<A>());
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  if (n == 0) return;
  sampler_step_kernel<T><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr<A>()), up, guided ? up + n : nullptr,
      z ? reinterpret_cast<const T*>(z->data_ptr<A>()) : nullptr, reinterpret_cast<T*>(out.data_ptr<A>()), n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const std::optional<at::Tensor>& noise,
                             std::optional<double> guidance, double px, double pm, double clip, double a, double b,
                             double s) {
  TORCH_CHECK(x.is_cuda() && model_out.device() == x.device(),
              "sampler_step (cuda): x and model_out must be on one CUDA device, got ", x.device(), " and ",
              model_out.device());
  TORCH_CHECK(x.scalar_type() == model_out.scalar_type(), "sampler_step: x and model_out dtypes differ");
  TORCH_CHECK(x.is_contiguous() && model_out.is_contiguous(), "sampler_step (cuda): tensors must be contiguous");
  TORCH_CHECK(model_out.numel() == (guidance.has_value() ? 2 : 1) * x.numel(),
              "sampler_step: model_out ", model_out.sizes(), " does not match x ", x.sizes());
  const at::Tensor* z = noise.has_value() ? &noise.value() : nullptr;
  if (z) TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type() && z->is_contiguous() &&
                         z->device() == x.device(),
                     "sampler_step: noise must be a contiguous tensor like x, on x's device");
  c10::cuda::CUDAGuard guard(x.device());
  FdStepCoefs k{static_cast<float>(guidance.value_or(1.0)), static_cast<float>(px), static_cast<float>(pm),
                static_cast<float>(clip), static_cast<float>(a), static_cast<float>(b),
                z ? static_cast<float>(s) : 0.f};
  at::Tensor out = at::empty_like(x);
  switch (x.scalar_type()) {
    case at::kFloat: launch<float, float>(x, model_out, z, guidance.has_value(), out, k); break;
    case at::kBFloat16: launch<__nv_bfloat16, at::BFloat16>(x, model_out, z, guidance.has_value(), out, k); break;
    case at::kHalf: launch<__half, at::Half>(x, model_out, z, guidance.has_value(), out, k); break;
    default: TORCH_CHECK(false, "sampler_step (cuda): dtype must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("sampler_step", &sampler_step_cuda); }
