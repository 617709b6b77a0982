// Kernel body of the sinusoidal timestep embedding, compiled once per ISA. Math and the rounding argument:
// fastdiff/math/timestep_embedding.h. t: fp32 timesteps; freq: fp32 table of `half` frequencies (computed by
// torch exactly as diffusers does); out: rows [b0, b1) of a (B, dim) fp32 matrix.
#pragma once

#include "fastdiff/math/timestep_embedding.h"

namespace fastdiff::cpu::FD_ISA {

void timestep_embedding(const float* t, const float* freq, float* out, int64_t b0, int64_t b1, int64_t half,
                        int64_t dim, float scale, bool flip_sin_to_cos) {
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * dim;
    float* first = o;          // sin, or cos when flipped
    float* second = o + half;  // cos, or sin when flipped
    for (int64_t j = 0; j < half; ++j) {
      const float arg = fd_timestep_arg(t[b], freq[j], scale);
      const float s = fd_sin_f32(arg), c = fd_cos_f32(arg);
      first[j] = flip_sin_to_cos ? c : s;
      second[j] = flip_sin_to_cos ? s : c;
    }
    if (dim % 2 == 1) o[dim - 1] = 0.f;  // diffusers zero-pads odd dims
  }
}

}  // namespace fastdiff::cpu::FD_ISA
