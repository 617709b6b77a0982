// Sinusoidal timestep embedding with diffusers' get_timestep_embedding semantics, shared by CPU and CUDA.
//   half = dim // 2,  freq_j = exp(-ln(max_period) * j / (half - downscale_freq_shift))   (fp32, j < half)
//   arg_bj = scale * (t_b * freq_j)                                                      (fp32, two roundings)
//   emb_b = [sin(arg_b), cos(arg_b)]  ([cos, sin] with flip_sin_to_cos), zero-padded to dim when dim is odd.
// freq is computed once by torch exactly as diffusers computes it (fastdiff/ops/timestep_embedding.py caches
// it), and arg is rounded exactly as diffusers rounds it, so the arguments are bit-identical. sin/cos are then
// evaluated in double on that fp32 argument and rounded once: correct to 0.5 ulp even for arguments ~1000
// (diffusers' own fp32 sin/cos is within ~1 ulp), and immune to --use_fast_math's inaccurate __sinf.
#pragma once

#include <math.h>

#include "fastdiff/hd.h"

// t * freq, then * scale, each rounded to fp32 as eager PyTorch does.
FD_HD float fd_timestep_arg(float t, float freq, float scale) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(scale, __fmul_rn(t, freq));  // _rn intrinsics are never contracted or reassociated
#else
  volatile float p = t * freq;  // volatile: keep the fp32 rounding of t * freq (-ffast-math may reassociate)
  return scale * p;
#endif
}

FD_HD float fd_sin_f32(float arg) { return static_cast<float>(sin(static_cast<double>(arg))); }
FD_HD float fd_cos_f32(float arg) { return static_cast<float>(cos(static_cast<double>(arg))); }
