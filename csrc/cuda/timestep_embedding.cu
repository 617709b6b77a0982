// CUDA side of the sinusoidal timestep embedding. Per-element math: fastdiff/math/timestep_embedding.h (shared
// with the CPU kernel); sin/cos run in double on the fp32 argument, so --use_fast_math's __sinf never applies.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "elem.cuh"
#include "fastdiff/math/timestep_embedding.h"

namespace fastdiff::cuda {
namespace {

// One thread per (b, j < half); t: (B,), freq: (half,), out: (B, dim) fp32.
__global__ void timestep_embedding_kernel(const float* __restrict__ t, const float* __restrict__ freq,
                                          float* __restrict__ out, int64_t B, int64_t half, int64_t dim, float scale,
                                          bool flip) {
  const int64_t n = B * (half + 1);  // the extra column per row writes the zero pad of an odd dim
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (half + 1), j = i - b * (half + 1);
    float* o = out + b * dim;
    if (j == half) {
      if (dim % 2 == 1) o[dim - 1] = 0.f;
      continue;
    }
    const float arg = fd_timestep_arg(t[b], freq[j], scale);
    const float s = fd_sin_f32(arg), c = fd_cos_f32(arg);
    o[j] = flip ? c : s;
    o[half + j] = flip ? s : c;
  }
}

at::Tensor timestep_embedding_cuda(const at::Tensor& t, const at::Tensor& freq, int64_t dim, bool flip,
                                   double scale) {
  check_cuda_contig(t, "timestep_embedding", "timesteps");
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat, "timestep_embedding: timesteps must be a 1-D float32 "
              "tensor, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(dim >= 0, "timestep_embedding: embedding_dim must be >= 0, got ", dim);
  const int64_t half = dim / 2, B = t.size(0);
  check_cuda_param(freq, half, "timestep_embedding", "freq", t.device());
  c10::cuda::CUDAGuard guard(t.device());
  at::Tensor out = at::empty({B, dim}, t.options());
  const int64_t n = B * (half + 1);
  if (n == 0 || dim == 0) return out;
  timestep_embedding_kernel<<<elementwise_blocks(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dptr<float>(t), dptr<float>(freq), dptr<float>(out), B, half, dim, static_cast<float>(scale), flip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastdiff::cuda

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("timestep_embedding", &fastdiff::cuda::timestep_embedding_cuda); }
