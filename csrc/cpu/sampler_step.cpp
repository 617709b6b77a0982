// Torch-facing side of the fused sampler update: schema, checks, threading, ISA dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "dispatch.h"
#include "fastdiff/hd.h"
#include "fastdiff/math/sampler_step.h"

FD_DECLARE_ISA_KERNEL(void, sampler_step_f32, const float*, const float*, const float*, const float*, float*,
                      int64_t, const FdStepCoefs&)
FD_DECLARE_ISA_KERNEL(void, sampler_step_bf16, const uint16_t*, const uint16_t*, const uint16_t*,
                      const uint16_t*, uint16_t*, int64_t, const FdStepCoefs&)

namespace fastdiff::cpu {
namespace {

// model_out has batch 2B (unconditional first, then conditional) when guidance is given, else batch B.
at::Tensor sampler_step(const at::Tensor& x, const at::Tensor& model_out, const std::optional<at::Tensor>& noise,
                        std::optional<double> guidance, double px, double pm, double clip, double a, double b,
                        double s) {
  TORCH_CHECK(x.device().is_cpu() && model_out.device().is_cpu(), "sampler_step (cpu): tensors must be on CPU");
  TORCH_CHECK(x.scalar_type() == model_out.scalar_type(), "sampler_step: x is ", x.scalar_type(),
              " but model_out is ", model_out.scalar_type(), "; pass both in one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sampler_step (cpu): dtype must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && model_out.is_contiguous(), "sampler_step (cpu): tensors must be contiguous");
  const int64_t n = x.numel();
  if (guidance.has_value()) {
    TORCH_CHECK(model_out.numel() == 2 * n, "sampler_step: with guidance, model_out must hold the unconditional "
                "and the conditional output (batch 2B) for x of batch B; got ", model_out.sizes(), " for x ",
                x.sizes());
  } else {
    TORCH_CHECK(model_out.numel() == n, "sampler_step: model_out ", model_out.sizes(), " does not match x ",
                x.sizes());
  }
  const at::Tensor* z = nullptr;
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x.sizes() && noise->scalar_type() == x.scalar_type() && noise->is_contiguous()
                && noise->device().is_cpu(), "sampler_step: noise must be a contiguous CPU tensor like x");
    z = &noise.value();
  }
  FdStepCoefs k{static_cast<float>(guidance.value_or(1.0)), static_cast<float>(px), static_cast<float>(pm),
                static_cast<float>(clip), static_cast<float>(a), static_cast<float>(b), static_cast<float>(s)};
  at::Tensor out = at::empty_like(x);
  const bool guided = guidance.has_value();
  // Grain: 64K elements a task keeps both cores busy on a 64x64x4 latent without thread overhead dominating.
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    const float* up = model_out.data_ptr<float>();
    const float* cp = guided ? up + n : nullptr;
    const float* zp = z ? z->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(sampler_step_f32, xp + lo, up + lo, cp ? cp + lo : nullptr, zp ? zp + lo : nullptr, op + lo,
                  hi - lo, k);
    });
  } else {
    auto bf = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    const uint16_t* xp = bf(x);
    const uint16_t* up = bf(model_out);
    const uint16_t* cp = guided ? up + n : nullptr;
    const uint16_t* zp = z ? bf(*z) : nullptr;
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      FD_ISA_CALL(sampler_step_bf16, xp + lo, up + lo, cp ? cp + lo : nullptr, zp ? zp + lo : nullptr, op + lo,
                  hi - lo, k);
    });
  }
  return out;
}

}  // namespace
}  // namespace fastdiff::cpu

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("sampler_step(Tensor x, Tensor model_out, Tensor? noise, float? guidance, float px, float pm, "
        "float clip, float a, float b, float s) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("sampler_step", &fastdiff::cpu::sampler_step); }
