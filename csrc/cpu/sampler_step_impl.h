// Kernel bodies of the fused sampler update, compiled once per ISA (see isa_begin.h).
// Every pointer is to a contiguous run of n elements; u/c/noise may be null (see below).
#pragma once

#include "fastdiff/math/bf16.h"
#include "fastdiff/math/sampler_step.h"

namespace fastdiff::cpu::FD_ISA {

// x: current sample; u: model output (unconditional half when c != null); c: conditional half or null;
// noise: standard normal noise or null (then s is ignored); out: next sample (may alias x).
void sampler_step_f32(const float* x, const float* u, const float* c, const float* noise, float* out,
                      int64_t n, const FdStepCoefs& k) {
  FdStepCoefs kk = k;
  if (noise == nullptr) kk.s = 0.f;
  if (c != nullptr) {
    if (noise != nullptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = fd_step(x[i], fd_guide(u[i], c[i], kk.g), noise[i], kk);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = fd_step(x[i], fd_guide(u[i], c[i], kk.g), 0.f, kk);
    }
  } else if (noise != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = fd_step(x[i], u[i], noise[i], kk);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = fd_step(x[i], u[i], 0.f, kk);
  }
}

void sampler_step_bf16(const uint16_t* x, const uint16_t* u, const uint16_t* c, const uint16_t* noise,
                       uint16_t* out, int64_t n, const FdStepCoefs& k) {
  FdStepCoefs kk = k;
  if (noise == nullptr) kk.s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float uf = fd_bf16_to_float(u[i]);
    const float m = c != nullptr ? fd_guide(uf, fd_bf16_to_float(c[i]), kk.g) : uf;
    const float z = noise != nullptr ? fd_bf16_to_float(noise[i]) : 0.f;
    out[i] = fd_float_to_bf16(fd_step(fd_bf16_to_float(x[i]), m, z, kk));
  }
}

}  // namespace fastdiff::cpu::FD_ISA
