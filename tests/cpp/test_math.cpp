// Unit tests of the per-element math shared by the CPU and CUDA kernels (csrc/include/fastdiff/math), against
// long-double closed forms and exact bit-level references. Built by CMakeLists.txt with the extension's host
// flags (-O3 -ffast-math): NaN/inf are therefore checked through bit patterns, never std::isnan.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fastdiff/math/bf16.h"
#include "fastdiff/math/gelu.h"
#include "fastdiff/math/modulate.h"
#include "fastdiff/math/norm.h"
#include "fastdiff/math/sampler_step.h"
#include "fastdiff/math/timestep_embedding.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                             \
  do {                                                               \
    ++g_checks;                                                      \
    if (!(cond)) {                                                   \
      ++g_failures;                                                  \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
      std::printf(__VA_ARGS__);                                      \
      std::printf("\n");                                             \
    }                                                                \
  } while (0)

uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
bool is_nan_bits32(uint32_t u) { return (u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0; }
bool is_nan_bits16(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu) != 0; }

// Round-to-nearest-even of an fp32 bit pattern to bf16, by exact integer comparison of the dropped half.
uint16_t ref_rne(uint32_t u) {
  const uint32_t lo = u >> 16, rest = u & 0xffffu;
  if (rest > 0x8000u || (rest == 0x8000u && (lo & 1u))) return static_cast<uint16_t>(lo + 1);
  return static_cast<uint16_t>(lo);
}

void test_bf16() {
  // Every bf16 value survives widening and narrowing unchanged; NaNs stay NaNs with their sign.
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = fd_float_to_bf16(fd_bf16_to_float(static_cast<uint16_t>(h)));
    if (is_nan_bits16(static_cast<uint16_t>(h))) {
      CHECK(is_nan_bits16(back) && (back & 0x8000u) == (h & 0x8000u), "NaN 0x%04x -> 0x%04x", h, back);
    } else {
      CHECK(back == h, "round trip 0x%04x -> 0x%04x", h, back);
    }
  }
  // Ties go to even, both ways; just off a tie goes to the nearer value.
  CHECK(fd_float_to_bf16(from_bits(0x3f808000u)) == 0x3f80, "tie to even (down)");
  CHECK(fd_float_to_bf16(from_bits(0x3f818000u)) == 0x3f82, "tie to even (up)");
  CHECK(fd_float_to_bf16(from_bits(0x3f808001u)) == 0x3f81, "above tie");
  CHECK(fd_float_to_bf16(from_bits(0x3f807fffu)) == 0x3f80, "below tie");
  CHECK(fd_float_to_bf16(from_bits(0xbf808000u)) == 0xbf80, "negative tie");
  // Overflow rounds to infinity; infinities and signed zeros are exact; NaN payloads that would round into
  // the infinity pattern (signalling NaN 0x7f800001) stay NaN.
  CHECK(fd_float_to_bf16(from_bits(0x7f7fffffu)) == 0x7f80, "FLT_MAX -> inf");
  CHECK(fd_float_to_bf16(from_bits(0x7f7f8000u)) == 0x7f80, "tie at the top -> inf (even)");
  CHECK(fd_float_to_bf16(from_bits(0x7f800000u)) == 0x7f80, "+inf");
  CHECK(fd_float_to_bf16(from_bits(0xff800000u)) == 0xff80, "-inf");
  CHECK(fd_float_to_bf16(from_bits(0x80000000u)) == 0x8000, "-0");
  CHECK(is_nan_bits16(fd_float_to_bf16(from_bits(0x7f800001u))), "sNaN stays NaN");
  CHECK(is_nan_bits16(fd_float_to_bf16(from_bits(0xffffffffu))), "NaN with full payload stays NaN");
  // Random fp32 patterns (every exponent, subnormals included) against the exact integer rounding.
  std::mt19937 rng(1234);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = rng();
    if (is_nan_bits32(u)) continue;
    const uint16_t got = fd_float_to_bf16(from_bits(u)), want = ref_rne(u);
    if (got != want) { CHECK(got == want, "0x%08x -> 0x%04x, want 0x%04x", u, got, want); break; }
  }
}

void test_sampler_step() {
  // DDIM-style x0 from eps with CFG, clamp, a*x0 + b*x + s*z, against long double.
  const float xs[] = {-3.f, -0.7f, 0.f, 0.4f, 2.5f};
  const float us[] = {-1.f, 0.2f, 1.3f};
  for (float x : xs)
    for (float u : us)
      for (float c : us)
        for (float clip : {0.f, 1.f}) {
          FdStepCoefs k{7.5f, 1.25f, -0.6f, clip, 0.8f, 0.15f, 0.05f};
          const float z = 0.3f;
          const float got = fd_step(x, fd_guide(u, c, k.g), z, k);
          long double m = (long double)u + 7.5L * ((long double)c - u);
          long double y = 1.25L * x + (long double)-0.6f * m;
          if (clip > 0) y = y < -1 ? -1 : (y > 1 ? 1 : y);
          const long double want = (long double)0.8f * y + (long double)0.15f * x + (long double)0.05f * z;
          CHECK(std::fabs((long double)got - want) <= 1e-5L * (1 + std::fabs(want)), "x=%g u=%g c=%g clip=%g: %g vs %Lg",
                x, u, c, clip, got, want);
        }
  // No clamp when clip <= 0; s = 0 ignores the noise.
  FdStepCoefs k{1.f, 0.f, 1.f, 0.f, 1.f, 0.f, 0.f};
  CHECK(fd_step(0.f, 100.f, 5.f, k) == 100.f, "no clamp, no noise");
}

void test_gelu() {
  float max_erf = 0.f, max_exp_rel = 0.f;
  for (int i = -800000; i <= 800000; ++i) {
    const float x = i * 1e-5f;  // [-8, 8]
    const long double e = std::erf((long double)x);
    max_erf = std::fmax(max_erf, (float)std::fabs((long double)fd_erf_rational(x) - e));
    const long double g = 0.5L * x * (1 + std::erf((long double)x / std::sqrt(2.0L)));
    const float got = fd_gelu(x);
    // gelu(x) = x * Phi(x): erf's absolute error times |x|/2, plus fp32 rounding of the result.
    CHECK(std::fabs((long double)got - g) <= 2.5e-7L * std::fabs((long double)x) + 2.4e-7L * std::fabs(g) + 1e-30L,
          "gelu(%g) = %.9g, want %.9Lg", x, got, g);
    const long double phi = std::exp(-0.5L * x * x) / std::sqrt(2 * 3.14159265358979323846264L);
    const long double dg = 0.5L * (1 + std::erf((long double)x / std::sqrt(2.0L))) + x * phi;
    CHECK(std::fabs((long double)fd_gelu_grad(x) - dg) <= 1e-6L, "gelu'(%g) = %.9g, want %.9Lg", x, fd_gelu_grad(x), dg);
    if (g_failures > 20) return;
  }
  CHECK(max_erf <= 4.5e-7f, "erf max abs error %g", max_erf);
  for (int i = 0; i <= 870000; ++i) {
    const float x = -i * 1e-4f;
    const long double e = std::exp((long double)x);
    max_exp_rel = std::fmax(max_exp_rel, (float)(std::fabs((long double)fd_exp_nonpos(x) - e) / e));
  }
  CHECK(max_exp_rel <= 3e-7f, "exp max rel error %g", max_exp_rel);
  CHECK(fd_exp_nonpos(-200.f) < 1e-37f && fd_exp_nonpos(-200.f) >= 0.f, "exp underflow clamps");
  // GEGLU gradient pieces: d(a*gelu(g))/da = gelu(g), d/dg = a*gelu'(g).
  CHECK(fd_geglu_grad_a(2.f, 1.5f) == 2.f * fd_gelu(1.5f), "dL/da");
  CHECK(std::fabs(fd_geglu_grad_g(2.f, -0.5f, 1.5f) - 2.f * -0.5f * fd_gelu_grad(1.5f)) < 1e-7f, "dL/dg");
}

// LayerNorm / RMSNorm of one row in long double, for finite differences.
long double ln_loss(const std::vector<long double>& x, const std::vector<long double>& w,
                    const std::vector<long double>& c, bool rms, long double eps) {
  const size_t d = x.size();
  long double m = 0, v = 0;
  if (!rms) { for (auto t : x) m += t; m /= d; }
  for (auto t : x) v += (t - m) * (t - m);
  v /= d;
  const long double rs = 1 / std::sqrt(v + eps);
  long double loss = 0;
  for (size_t j = 0; j < d; ++j) loss += c[j] * ((x[j] - m) * rs * w[j]);
  return loss;
}

void test_norm() {
  std::mt19937 rng(7);
  std::normal_distribution<float> n01(0.f, 1.f);
  for (int rms = 0; rms < 2; ++rms) {
    for (int d : {1, 7, 64, 321}) {
      std::vector<float> x(d), w(d), c(d);
      for (int j = 0; j < d; ++j) { x[j] = 3.f + 2.f * n01(rng); w[j] = n01(rng); c[j] = n01(rng); }
      const float eps = 1e-5f;
      // Row statistics as the kernels compute them, then the header's per-element gradient.
      double m = 0, v = 0;
      if (!rms) { for (float t : x) m += t; m /= d; }
      for (float t : x) v += (t - m) * (t - m);
      v /= d;
      const float rs = fd_rstd((float)v, eps);
      double sg = 0, sgx = 0;
      for (int j = 0; j < d; ++j) {
        const float g = c[j] * w[j], xh = (x[j] - (float)m) * rs;
        sg += g;
        sgx += g * xh;
      }
      std::vector<long double> xl(x.begin(), x.end()), wl(w.begin(), w.end()), cl(c.begin(), c.end());
      for (int j = 0; j < d; ++j) {
        const float g = c[j] * w[j], xh = (x[j] - (float)m) * rs;
        const float got = rms ? fd_rms_norm_grad_x(g, xh, rs, (float)(sgx / d))
                              : fd_layer_norm_grad_x(g, xh, rs, (float)(sg / d), (float)(sgx / d));
        const long double h = 1e-7L;
        auto xp = xl, xm = xl;
        xp[j] += h;
        xm[j] -= h;
        const long double want = (ln_loss(xp, wl, cl, rms, eps) - ln_loss(xm, wl, cl, rms, eps)) / (2 * h);
        CHECK(std::fabs((long double)got - want) <= 2e-4L * (1 + std::fabs(want)), "%s d=%d j=%d: %g vs %Lg",
              rms ? "rms" : "layer", d, j, got, want);
      }
      // Forward affine.
      CHECK(fd_norm_affine(0.5f, 2.f, -1.f) == 0.f, "affine");
    }
  }
}

void test_modulate_and_timestep() {
  const float vals[] = {-2.5f, -0.3f, 0.f, 0.7f, 3.f};
  for (float x : vals)
    for (float sh : vals)
      for (float sc : vals) {
        const long double want = (long double)x * (1 + (long double)sc) + sh;
        CHECK(std::fabs((long double)fd_modulate(x, sh, sc) - want) <= 1e-6L * (1 + std::fabs(want)), "modulate");
        const long double want_g = (long double)x + (long double)sh * sc;
        CHECK(std::fabs((long double)fd_gate_residual(x, sh, sc) - want_g) <= 1e-6L * (1 + std::fabs(want_g)),
              "gate residual");
      }
  // The argument is rounded exactly as eager fp32 (t * f, then * scale); sin/cos are correctly rounded.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> ut(0.f, 1000.f), uf(1e-4f, 1.f);
  for (int i = 0; i < 100000; ++i) {
    const float t = ut(rng), f = uf(rng), scale = (i % 2) ? 1.f : 3.f;
    volatile float p = t * f;
    volatile float want_arg = scale * p;
    const float arg = fd_timestep_arg(t, f, scale);
    CHECK(bits(arg) == bits(want_arg), "arg t=%g f=%g scale=%g: %.9g vs %.9g", t, f, scale, arg, (float)want_arg);
    const long double s = std::sin((long double)arg), c = std::cos((long double)arg);
    const float ss = fd_sin_f32(arg), cc = fd_cos_f32(arg);
    // Correct rounding of the exact value: within half an ulp of the result (checked as <= 1 ulp of fp32 at 1).
    CHECK(std::fabs((long double)ss - s) <= 6e-8L, "sin(%.9g) = %.9g vs %.12Lg", arg, ss, s);
    CHECK(std::fabs((long double)cc - c) <= 6e-8L, "cos(%.9g) = %.9g vs %.12Lg", arg, cc, c);
    if (g_failures > 20) return;
  }
}

}  // namespace

int main() {
  test_bf16();
  test_sampler_step();
  test_gelu();
  test_norm();
  test_modulate_and_timestep();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
