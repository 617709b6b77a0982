// Torch-facing side of the sinusoidal timestep embedding (diffusers' get_timestep_embedding): schema, checks,
// threading, ISA choice. Forward only: timesteps carry no gradient.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dispatch.h"
#include "tensor_util.h"

FD_DECLARE_ISA_KERNEL(void, timestep_embedding, const float*, const float*, float*, int64_t, int64_t, int64_t,
                      int64_t, float, bool)

namespace fastdiff::cpu {
namespace {

// timesteps: fp32 (B,); freq: fp32 (dim // 2,) from fastdiff/ops/timestep_embedding.py. Returns fp32 (B, dim).
at::Tensor timestep_embedding(const at::Tensor& t, const at::Tensor& freq, int64_t dim, bool flip_sin_to_cos,
                              double scale) {
  fd_check_cpu_contig(t, "timestep_embedding", "timesteps");
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat, "timestep_embedding: timesteps must be a 1-D float32 "
              "tensor, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(dim >= 0, "timestep_embedding: embedding_dim must be >= 0, got ", dim);
  const int64_t half = dim / 2, B = t.size(0);
  fd_check_param(freq, half, "timestep_embedding", "freq");
  at::Tensor out = at::empty({B, dim}, t.options());
  const float *tp = t.data_ptr<float>(), *fp = freq.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // sin and cos in double cost ~40 ns an element: split the batch once the table is a few thousand entries.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dim)), [&](int64_t lo, int64_t hi) {
    FD_ISA_CALL(timestep_embedding, tp, fp, op, lo, hi, half, dim, static_cast<float>(scale), flip_sin_to_cos);
  });
  return out;
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("timestep_embedding(Tensor timesteps, Tensor freq, int dim, bool flip_sin_to_cos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("timestep_embedding", &fastdiff::cpu::timestep_embedding); }
