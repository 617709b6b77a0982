// GELU in its exact (erf) form and the GEGLU gate built on it, shared by the CPU and CUDA kernels.
//   gelu(g)   = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))          (F.gelu(approximate="none"))
//   gelu'(g)  = Phi(g) + g * phi(g),  phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
//   geglu(x)  = a * gelu(g) with [a, g] = x.chunk(2, dim=-1)           (diffusers' GEGLU: first half is the
//                                                                        value, second half the gate)
//   backward:   dL/da = dy * gelu(g),   dL/dg = dy * a * gelu'(g)
// On the GPU erf/exp are the CUDA device functions. On the CPU they are the inline approximations below:
// a call to glibc's vector erff (libmvec) per 16 lanes made the fused kernel twice as slow as torch's gelu,
// while straight-line FMAs vectorise to full width inside the kernel loop.
#pragma once

#include <math.h>

#include "fastdiff/hd.h"

#define FD_SQRT1_2 0.70710678118654752440f
#define FD_INV_SQRT_2PI 0.39894228040143267794f

// erf(x) as x * P(x^2) / Q(x^2) on [-4, 4] (|erf| rounds to 1 in fp32 beyond): the minimax rational form
// Eigen and XLA use for fp32. Max abs error 4.2e-7 (measured on 2e5 points against double erf, see
// tests/cpp/test_math.cpp); torch's own fp32 gelu is 1.2e-6 off at its worst, so gelu stays as accurate.
FD_HD float fd_erf_rational(float x) {
  x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (all gelu' needs): 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-6
// Taylor polynomial (truncation < 2e-8 relative), 2^n built in the exponent bits. Returns 0 below -87.
FD_HD float fd_exp_nonpos(float x) {
  x = x < -87.f ? -87.f : (x > 0.f ? 0.f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  // r = x - n ln2 with ln 2 split in hi + lo (n * hi is exact). fmaf, not a - b * c: -ffast-math would fold
  // hi + lo back into one rounded constant, which costs ~4e-6 relative accuracy at x ~ -70.
  const float r = fmaf(-n, 1.428606765330187e-06f, fmaf(-n, 0.693145751953125f, x));
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  union { int i; float f; } s;
  s.i = (static_cast<int>(n) + 127) << 23;  // n in [-126, 0]: a normal power of two
  return p * s.f;
}

FD_HD float fd_erf(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  return fd_erf_rational(x);
#endif
}

FD_HD float fd_exp_neg(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fd_exp_nonpos(x);
#endif
}

FD_HD float fd_gelu(float g) { return 0.5f * g * (1.0f + fd_erf(g * FD_SQRT1_2)); }

FD_HD float fd_gelu_grad(float g) {
  const float cdf = 0.5f * (1.0f + fd_erf(g * FD_SQRT1_2));
  return cdf + g * FD_INV_SQRT_2PI * fd_exp_neg(-0.5f * g * g);
}

// dL/da and dL/dg of y = a * gelu(g) for the upstream gradient dy.
FD_HD float fd_geglu_grad_a(float dy, float g) { return dy * fd_gelu(g); }
FD_HD float fd_geglu_grad_g(float dy, float a, float g) { return dy * a * fd_gelu_grad(g); }
