// Per-element math of the fused sampler update, shared by the CPU kernel (csrc/cpu) and the CUDA kernel
// (csrc/cuda). One pass over the latents replaces the eager sequence
//   m   = u + g * (c - u)              classifier-free guidance (u: unconditional, c: conditional output)
//   y   = px * x + pm * m              the prediction the sampler works with (x0, eps, v, ...)
//   y   = clamp(y, -clip, clip)        optional (DDPM/DDIM "clip_sample")
//   out = a * y + b * x + s * noise    the step: DDPM posterior mean + sigma z, DDIM eq. 12, Euler, flow Euler
// Every one-step sampler of fastdiff is this form for some coefficients (fastdiff/samplers derives them).
#pragma once

#include "fastdiff/hd.h"

struct FdStepCoefs {
  float g;     // guidance scale; only read when the kernel has a separate conditional input
  float px;    // weight of x in the prediction
  float pm;    // weight of the (guided) model output in the prediction
  float clip;  // > 0: clamp the prediction to [-clip, clip]; <= 0: no clamp
  float a;     // weight of the prediction in the output
  float b;     // weight of x in the output
  float s;     // weight of the noise in the output
};

FD_HD float fd_guide(float uncond, float cond, float g) { return uncond + g * (cond - uncond); }

FD_HD float fd_step(float x, float m, float noise, const FdStepCoefs& k) {
  float y = k.px * x + k.pm * m;
  if (k.clip > 0.f) y = y < -k.clip ? -k.clip : (y > k.clip ? k.clip : y);
  return k.a * y + k.b * x + k.s * noise;
}
