// Kernel bodies of fastdiff's CPU flash attention, compiled once per ISA (see isa_begin.h); attention.cpp holds
// the checks, the threading and the ISA choice, fastdiff/ops/attention.py the autograd.
//
// Every ISA runs the same code on a vector type `Vec` of W fp32 lanes (AVX-512: 16, AVX2: 8, scalar: 1) and a
// register tile of TR rows x TV vectors; only these constants and the handful of vector primitives below differ.
//
// Forward (one task = one (batch, head) and a range of query rows; FlashAttention-2's loop order):
//   The task packs K^T and V of its head into fp32 blocks of NB keys (K^T block: D x NB, V block: NB x Dp with
//   Dp = D rounded up to W; padding is zero), then for each tile of MQ query rows keeps the running row max m,
//   the running sum l and the output accumulator O (MQ x Dp) in fp32, and for each key block
//     S = Q K^T                       (GEMM, MQ x NB x D: S never exceeds one MQ x NB tile, no L x L matrix)
//     t = S * scale * log2(e) + mask * log2(e)
//     m' = max(m, rowmax t), alpha = 2^(m - m'), P = 2^(t - m'), l = l * alpha + rowsum P
//     O = O * alpha + P V            (GEMM, MQ x Dp x NB)
//   and finally out = O / l, lse = m + log2(l) (saved for the backward). Working in base 2 folds log2(e) into the
//   one multiply the scores need anyway. Masked scores are clamped to -1e30 instead of -inf (the kernels are
//   compiled with -ffast-math, which lets the compiler assume no infinities), so a fully masked row has m = -1e30,
//   P = 0, l = 0, and gives out = 0 and lse = +1e30 (P = 0 in the backward as well).
// Tile sizes: MQ x NB scores (AVX2: 48 x 128 fp32 = 24 KB) plus a D x NB block of K^T sit in L1/L2; a head's
// packed K and V (Lk x (D + Dp) floats, 1.3 MB at SD1's 4096 x 40) stream from L2/L3 once per query tile.
//
// Backward (one task = one (batch, head); FlashAttention-2's key-block-outer loop, so dK and dV of a key block
// accumulate in registers/L1 and dQ of the head accumulates in an fp32 buffer of the task):
//   Di = rowsum(dO * O); for each key block j, for each query tile i:
//     P = 2^(S * scale * log2(e) + mask * log2(e) - lse)    (recomputed, S = Q_i K_j^T)
//     dP = dO_i V_j^T, dS = P * (dP - Di)
//     dV_j += P^T dO_i, dK_j += scale * dS^T Q_i, dQ_i += scale * dS K_j
//   All five products run through the one GEMM tile below; a transposed operand is read through its strides
//   (the tile broadcasts one scalar of A at a time, so A may have any row and column stride).
//
// bf16 inputs are widened to fp32 when packed; every product accumulates in fp32. With pair_dot (the AVX512-BF16
// path: vdpbf16ps; elsewhere an exact emulation, for tests) the forward's two products instead take bf16 pairs:
// Q and K^T as pairs along D, P (rounded to bf16 once) and V as pairs along the keys; see the `pair` namespace.
#pragma once

#include <stdlib.h>

#if defined(FD_ISA_IS_AVX512) || defined(FD_ISA_IS_AVX2)
#include <immintrin.h>
#endif
#if defined(FD_ISA_IS_AVX512)
// GCC 12 warns inside its own AVX-512 intrinsics (the `__Y = __Y` of _mm512_undefined_*) once they are inlined
// into these templates: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "attention_args.h"
#include "fastdiff/math/bf16.h"

namespace fastdiff::cpu::FD_ISA {
namespace attn {

// Only C library calls and code of this file below (see isa_begin.h: no standard-library templates).
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline float fmax1(float a, float b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMasked = -1e30f;   // a masked score (finite: see the header comment)

// ---- vectors of W fp32 lanes -------------------------------------------------------------------------------------
#if defined(FD_ISA_IS_AVX512)
constexpr int W = 16, TR = 8, TV = 3;   // 24 accumulators of 32 zmm registers
constexpr int64_t MQ = 48, NB = 192;
struct Vec { __m512 v; };
static inline Vec vzero() { return {_mm512_setzero_ps()}; }
static inline Vec vset(float x) { return {_mm512_set1_ps(x)}; }
static inline Vec vld(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void vst(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline Vec vsub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline float hmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
static inline float hsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
static inline Vec vround(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// 2^n for integral n in [-126, 127], and x >= lo ? a : 0
static inline Vec vpow2i(Vec n) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}
static inline Vec vkeep_ge(Vec x, float lo, Vec a) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(lo), _CMP_GE_OQ), a.v)};
}
#elif defined(FD_ISA_IS_AVX2)
constexpr int W = 8, TR = 6, TV = 2;    // 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm registers
constexpr int64_t MQ = 48, NB = 128;
struct Vec { __m256 v; };
static inline Vec vzero() { return {_mm256_setzero_ps()}; }
static inline Vec vset(float x) { return {_mm256_set1_ps(x)}; }
static inline Vec vld(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void vst(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline Vec vsub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
static inline float hmax(Vec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
static inline float hsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline Vec vround(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline Vec vpow2i(Vec n) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23))};
}
static inline Vec vkeep_ge(Vec x, float lo, Vec a) {
  return {_mm256_and_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(lo), _CMP_GE_OQ), a.v)};
}
#else
constexpr int W = 1, TR = 4, TV = 4;
constexpr int64_t MQ = 32, NB = 64;
struct Vec { float v; };
static inline Vec vzero() { return {0.f}; }
static inline Vec vset(float x) { return {x}; }
static inline Vec vld(const float* p) { return {*p}; }
static inline void vst(float* p, Vec a) { *p = a.v; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
static inline Vec vadd(Vec a, Vec b) { return {a.v + b.v}; }
static inline Vec vsub(Vec a, Vec b) { return {a.v - b.v}; }
static inline Vec vmul(Vec a, Vec b) { return {a.v * b.v}; }
static inline Vec vmax(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
static inline float hmax(Vec a) { return a.v; }
static inline float hsum(Vec a) { return a.v; }
static inline Vec vround(Vec a) { return {nearbyintf(a.v)}; }
static inline Vec vpow2i(Vec n) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v) + 127) << 23;
  float f;
  memcpy(&f, &bits, sizeof f);
  return {f};
}
static inline Vec vkeep_ge(Vec x, float lo, Vec a) { return {x.v >= lo ? a.v : 0.f}; }
#endif

static_assert(NB % (W * TV) == 0 || W * TV > NB, "a key block is a whole number of tile columns");
static_assert(MQ % TR == 0, "a query tile is a whole number of register tiles");

// 2^x for x <= 127: 2^n * 2^f, n = round(x), f in [-0.5, 0.5], 2^f by its degree-6 Taylor polynomial (relative
// error 1.2e-7, below fp32's half ulp); x < -126 (masked scores, underflow) gives exactly 0.
static inline Vec vexp2(Vec x) {
  const Vec xc = vmax(x, vset(-126.f));
  const Vec n = vround(xc);
  const Vec f = vsub(xc, n);
  Vec p = vset(1.5403530393381609e-4f);
  p = vfma(p, f, vset(1.3333558146428443e-3f));
  p = vfma(p, f, vset(9.6181291076284772e-3f));
  p = vfma(p, f, vset(5.5504108664821580e-2f));
  p = vfma(p, f, vset(2.4022650695910071e-1f));
  p = vfma(p, f, vset(6.9314718055994531e-1f));
  p = vfma(p, f, vset(1.0f));
  return vkeep_ge(x, -126.f, vmul(p, vpow2i(n)));
}

static inline float exp2_1(float x) {
  const Vec r = vexp2(vset(x));
  return hmax(r);   // every lane holds the same value
}

// ---- element access of the bf16 / fp32 inputs and outputs -----------------------------------------------------------
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) { return fd_bf16_to_float(p[i]); }
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = fd_float_to_bf16(v); }

// Heap scratch (malloc/free: plain C calls, see above), freed with the object.
struct Buf {
  float* p = nullptr;
  explicit Buf(int64_t count) : p(static_cast<float*>(malloc(sizeof(float) * (count > 0 ? count : 1)))) {}
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// ---- the one GEMM: C[M x NV*W] (+)= A[M x K] * B[K x NV*W] ---------------------------------------------------------
// A(r, k) = A[r * sar + k * sak] (any strides: it is broadcast one scalar at a time), B rows of ldb floats, C rows
// of ldc floats. The tile keeps R x V accumulators in registers over the whole K loop.
template <int R, int V, bool ACC>
static inline void tile(const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int64_t K) {
  Vec c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = ACC ? vld(C + r * ldc + v * W) : vzero();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const float* ak = A + k * sak;
    Vec b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = vld(bk + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec a = vset(ak[r * sar]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] = vfma(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) vst(C + r * ldc + v * W, c[r][v]);
  }
}

template <int R, bool ACC>
static inline void tile_v(int v, const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb, float* C,
                          int64_t ldc, int64_t K) {
  switch (v) {
    case 1: return tile<R, 1, ACC>(A, sar, sak, B, ldb, C, ldc, K);
    case 2: if constexpr (TV >= 2) return tile<R, 2, ACC>(A, sar, sak, B, ldb, C, ldc, K); break;
    case 3: if constexpr (TV >= 3) return tile<R, 3, ACC>(A, sar, sak, B, ldb, C, ldc, K); break;
    case 4: if constexpr (TV >= 4) return tile<R, 4, ACC>(A, sar, sak, B, ldb, C, ldc, K); break;
    default: break;
  }
}

// M rows, NVt vectors of columns.
template <bool ACC>
static void gemm(int64_t M, int64_t NVt, int64_t K, const float* A, int64_t sar, int64_t sak, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j0 = 0; j0 < NVt; j0 += TV) {
    const int v = static_cast<int>(imin(TV, NVt - j0));
    for (int64_t i0 = 0; i0 < M; i0 += TR) {
      const int r = static_cast<int>(imin(TR, M - i0));
      const float* a = A + i0 * sar;
      const float* b = B + j0 * W;
      float* c = C + i0 * ldc + j0 * W;
      switch (r) {
        case 1: tile_v<1, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 2: if constexpr (TR >= 2) tile_v<2, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 3: if constexpr (TR >= 3) tile_v<3, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 4: if constexpr (TR >= 4) tile_v<4, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 5: if constexpr (TR >= 5) tile_v<5, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 6: if constexpr (TR >= 6) tile_v<6, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 7: if constexpr (TR >= 7) tile_v<7, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        case 8: if constexpr (TR >= 8) tile_v<8, ACC>(v, a, sar, sak, b, ldb, c, ldc, K); break;
        default: break;
      }
    }
  }
}

// ---- packing (fp32 blocks of the task's head) ------------------------------------------------------------------------
// K^T blocks: dst[(blk * D + d) * NB + j] = x[(blk * NB + j) * sl + d], zero past L.
template <class T>
static void pack_t(const T* x, int64_t sl, int64_t L, int64_t D, float* dst) {
  const int64_t nblk = (L + NB - 1) / NB;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    float* o = dst + blk * D * NB;
    const int64_t n = imin(NB, L - blk * NB);
    for (int64_t j = 0; j < n; ++j) {
      const T* row = x + (blk * NB + j) * sl;
      for (int64_t d = 0; d < D; ++d) o[d * NB + j] = ld(row, d);
    }
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = n; j < NB; ++j) o[d * NB + j] = 0.f;
    }
  }
}

// Rows padded to Dp columns: dst[i * Dp + d] = x[i * sl + d]; rows L..Lpad are zero.
template <class T>
static void pack_rows(const T* x, int64_t sl, int64_t L, int64_t Lpad, int64_t D, int64_t Dp, float* dst) {
  for (int64_t i = 0; i < L; ++i) {
    const T* row = x + i * sl;
    float* o = dst + i * Dp;
    for (int64_t d = 0; d < D; ++d) o[d] = ld(row, d);
    for (int64_t d = D; d < Dp; ++d) o[d] = 0.f;
  }
  for (int64_t i = L * Dp; i < Lpad * Dp; ++i) dst[i] = 0.f;
}

// ---- softmax pieces --------------------------------------------------------------------------------------------------
// One row of a score tile: t = s * c (+ mask * log2e), clamped to >= kMasked; keys n..npad are kMasked. Returns the
// row max of t.
static inline float scores_row(float* s, const float* mk, float c, int64_t n, int64_t npad) {
  const Vec cv = vset(c), lo = vset(kMasked), l2e = vset(kLog2e);
  Vec mx = lo;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec t = vmul(vld(s + j), cv);
    if (mk) t = vfma(vld(mk + j), l2e, t);
    t = vmax(t, lo);
    vst(s + j, t);
    mx = vmax(mx, t);
  }
  float m = hmax(mx);
  for (; j < n; ++j) {
    float t = s[j] * c;
    if (mk) t += mk[j] * kLog2e;
    t = fmax1(t, kMasked);
    s[j] = t;
    m = fmax1(m, t);
  }
  for (; j < npad; ++j) s[j] = kMasked;
  return m;
}

// p = 2^(t - ref) in place over npad (a multiple of W) entries; returns the sum.
static inline float exp_row(float* s, float ref, int64_t npad) {
  const Vec r = vset(ref);
  Vec sum = vzero();
  for (int64_t j = 0; j < npad; j += W) {
    const Vec p = vexp2(vsub(vld(s + j), r));
    vst(s + j, p);
    sum = vadd(sum, p);
  }
  return hsum(sum);
}

static inline void scale_row(float* o, float a, int64_t Dp) {
  const Vec av = vset(a);
  for (int64_t d = 0; d < Dp; d += W) vst(o + d, vmul(vld(o + d), av));
}

// ---- bf16 pair dot products (the AVX512-BF16 forward) ------------------------------------------------------------------
// A pair is two bf16 values in one 32-bit lane (the first in the low half). dot2(c, a, b) adds a.lo * b.lo +
// a.hi * b.hi to each fp32 lane of c: vdpbf16ps on AVX512-BF16, two FMAs on the widened halves elsewhere (the
// emulation runs the same packing and loops on CPUs without it, so the tests cover this path's logic).
namespace pair {

#if defined(FD_ISA_IS_AVX512)
struct PVec { __m512i v; };
static inline PVec pld(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
static inline PVec pset(uint32_t x) { return {_mm512_set1_epi32(static_cast<int>(x))}; }
static inline Vec dot2_emul(Vec c, PVec a, PVec b) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512 alo = _mm512_castsi512_ps(_mm512_slli_epi32(a.v, 16)), blo = _mm512_castsi512_ps(_mm512_slli_epi32(b.v, 16));
  const __m512 ahi = _mm512_castsi512_ps(_mm512_and_si512(a.v, hi)), bhi = _mm512_castsi512_ps(_mm512_and_si512(b.v, hi));
  return {_mm512_fmadd_ps(ahi, bhi, _mm512_fmadd_ps(alo, blo, c.v))};
}
#define FD_NBF16 __attribute__((target("avx512bf16")))
FD_NBF16 static inline Vec dot2_native(Vec c, PVec a, PVec b) {
  return {_mm512_dpbf16_ps(c.v, (__m512bh)a.v, (__m512bh)b.v)};
}
#elif defined(FD_ISA_IS_AVX2)
struct PVec { __m256i v; };
static inline PVec pld(const uint32_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
static inline PVec pset(uint32_t x) { return {_mm256_set1_epi32(static_cast<int>(x))}; }
static inline Vec dot2_emul(Vec c, PVec a, PVec b) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256 alo = _mm256_castsi256_ps(_mm256_slli_epi32(a.v, 16)), blo = _mm256_castsi256_ps(_mm256_slli_epi32(b.v, 16));
  const __m256 ahi = _mm256_castsi256_ps(_mm256_and_si256(a.v, hi)), bhi = _mm256_castsi256_ps(_mm256_and_si256(b.v, hi));
  return {_mm256_fmadd_ps(ahi, bhi, _mm256_fmadd_ps(alo, blo, c.v))};
}
#else
struct PVec { uint32_t v; };
static inline PVec pld(const uint32_t* p) { return {*p}; }
static inline PVec pset(uint32_t x) { return {x}; }
static inline Vec dot2_emul(Vec c, PVec a, PVec b) {
  const float alo = fd_bf16_to_float(static_cast<uint16_t>(a.v & 0xffffu)), ahi = fd_bf16_to_float(static_cast<uint16_t>(a.v >> 16));
  const float blo = fd_bf16_to_float(static_cast<uint16_t>(b.v & 0xffffu)), bhi = fd_bf16_to_float(static_cast<uint16_t>(b.v >> 16));
  return {ahi * bhi + (alo * blo + c.v)};
}
#endif

static inline uint32_t make_pair(float lo, float hi) {
  return static_cast<uint32_t>(fd_float_to_bf16(lo)) | (static_cast<uint32_t>(fd_float_to_bf16(hi)) << 16);
}

// C[R x V*W] (=|+=) sum over K2 pairs of A(r, k2) . B[k2][:]; A rows of sar pairs (pairs contiguous along k),
// B rows of ldb pairs.
template <int R, int V, bool ACC, bool NATIVE>
static inline void tile2(const uint32_t* A, int64_t sar, const uint32_t* B, int64_t ldb, float* C, int64_t ldc, int64_t K2) {
  Vec c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = ACC ? vld(C + r * ldc + v * W) : vzero();
  }
  for (int64_t k = 0; k < K2; ++k) {
    PVec b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = pld(B + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const PVec a = pset(A[r * sar + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
#if defined(FD_ISA_IS_AVX512)
        if constexpr (NATIVE) c[r][v] = dot2_native(c[r][v], a, b[v]); else
#endif
        c[r][v] = dot2_emul(c[r][v], a, b[v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) vst(C + r * ldc + v * W, c[r][v]);
  }
}

template <int R, bool ACC, bool NATIVE>
static inline void tile2_v(int v, const uint32_t* A, int64_t sar, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                           int64_t K2) {
  switch (v) {
    case 1: return tile2<R, 1, ACC, NATIVE>(A, sar, B, ldb, C, ldc, K2);
    case 2: if constexpr (TV >= 2) return tile2<R, 2, ACC, NATIVE>(A, sar, B, ldb, C, ldc, K2); break;
    case 3: if constexpr (TV >= 3) return tile2<R, 3, ACC, NATIVE>(A, sar, B, ldb, C, ldc, K2); break;
    case 4: if constexpr (TV >= 4) return tile2<R, 4, ACC, NATIVE>(A, sar, B, ldb, C, ldc, K2); break;
    default: break;
  }
}

template <bool ACC, bool NATIVE>
static void gemm2(int64_t M, int64_t NVt, int64_t K2, const uint32_t* A, int64_t sar, const uint32_t* B, int64_t ldb,
                  float* C, int64_t ldc) {
  for (int64_t j0 = 0; j0 < NVt; j0 += TV) {
    const int v = static_cast<int>(imin(TV, NVt - j0));
    for (int64_t i0 = 0; i0 < M; i0 += TR) {
      const int r = static_cast<int>(imin(TR, M - i0));
      const uint32_t* a = A + i0 * sar;
      const uint32_t* b = B + j0 * W;
      float* c = C + i0 * ldc + j0 * W;
      switch (r) {
        case 1: tile2_v<1, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 2: if constexpr (TR >= 2) tile2_v<2, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 3: if constexpr (TR >= 3) tile2_v<3, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 4: if constexpr (TR >= 4) tile2_v<4, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 5: if constexpr (TR >= 5) tile2_v<5, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 6: if constexpr (TR >= 6) tile2_v<6, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 7: if constexpr (TR >= 7) tile2_v<7, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        case 8: if constexpr (TR >= 8) tile2_v<8, ACC, NATIVE>(v, a, sar, b, ldb, c, ldc, K2); break;
        default: break;
      }
    }
  }
}

// K^T blocks as pairs along D: dst[(blk * D/2 + d2) * NB + j] = (k[j][2 d2], k[j][2 d2 + 1]).
template <class T>
static void pack_t2(const T* x, int64_t sl, int64_t L, int64_t D, uint32_t* dst) {
  const int64_t nblk = (L + NB - 1) / NB, D2 = D / 2;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    uint32_t* o = dst + blk * D2 * NB;
    const int64_t n = imin(NB, L - blk * NB);
    for (int64_t j = 0; j < NB; ++j) {
      const T* row = x + (blk * NB + j) * sl;
      for (int64_t d2 = 0; d2 < D2; ++d2) o[d2 * NB + j] = j < n ? make_pair(ld(row, 2 * d2), ld(row, 2 * d2 + 1)) : 0u;
    }
  }
}

// V rows as pairs along the keys: dst[(n2) * Dp + d] = (v[2 n2][d], v[2 n2 + 1][d]); zero past L and D.
template <class T>
static void pack_rows2(const T* x, int64_t sl, int64_t L, int64_t Lpad, int64_t D, int64_t Dp, uint32_t* dst) {
  for (int64_t n2 = 0; n2 < Lpad / 2; ++n2) {
    for (int64_t d = 0; d < Dp; ++d) {
      const int64_t i0 = 2 * n2, i1 = 2 * n2 + 1;
      const float a = (i0 < L && d < D) ? ld(x + i0 * sl, d) : 0.f;
      const float b = (i1 < L && d < D) ? ld(x + i1 * sl, d) : 0.f;
      dst[n2 * Dp + d] = make_pair(a, b);
    }
  }
}

}  // namespace pair

// ---- forward ---------------------------------------------------------------------------------------------------------
struct FwdScratch {
  int64_t D, Dp, nblk, Lkpad;
  Buf kt, vp, qs, s, o, m, l, alpha, p2;
  // Pair mode stores pairs (uint32) in kt, vp and qs (half the count of the fp32 layout) and P's pairs in p2.
  explicit FwdScratch(const FdAttnArgs& p)
      : D(p.D), Dp(round_up(p.D, W)), nblk((p.Lk + NB - 1) / NB), Lkpad(nblk * NB),
        kt(nblk * NB * p.D), vp(Lkpad * Dp), qs(MQ * p.D), s(MQ * NB), o(MQ * Dp), m(MQ), l(MQ), alpha(MQ),
        p2(p.pair_dot ? MQ * NB / 2 : 0) {}
};

template <class T, bool PAIR, bool NATIVE>
static void fwd_head_rows(const FdAttnArgs& p, int64_t b, int64_t h, int64_t q0, int64_t q1, FwdScratch& w,
                          bool pack) {
  const T* q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* k = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* v = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  T* out = static_cast<T*>(p.out) + (b * p.H + h) * p.Lq * p.D;
  float* lse = p.lse + (b * p.H + h) * p.Lq;
  const float* mask = p.mask ? p.mask + b * p.smask[0] + h * p.smask[1] : nullptr;
  const int64_t D = p.D, Dp = w.Dp, D2 = D / 2;
  const float c = p.scale * kLog2e;
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(w.kt.p);
  uint32_t* vp2 = reinterpret_cast<uint32_t*>(w.vp.p);
  if (pack) {
    if constexpr (PAIR) {
      pair::pack_t2(k, p.sk[2], p.Lk, D, kt2);
      pair::pack_rows2(v, p.sv[2], p.Lk, w.Lkpad, D, Dp, vp2);
    } else {
      pack_t(k, p.sk[2], p.Lk, D, w.kt.p);
      pack_rows(v, p.sv[2], p.Lk, w.Lkpad, D, Dp, w.vp.p);
    }
  }
  float *S = w.s.p, *O = w.o.p, *M = w.m.p, *Lsum = w.l.p, *alpha = w.alpha.p;
  uint32_t* q2 = reinterpret_cast<uint32_t*>(w.qs.p);
  uint32_t* P2 = reinterpret_cast<uint32_t*>(w.p2.p);  // bf16 P pairs (pair mode): MQ x NB/2
  for (int64_t i0 = q0; i0 < q1; i0 += MQ) {
    const int64_t mq = imin(MQ, q1 - i0);
    for (int64_t r = 0; r < mq; ++r) {
      const T* row = q + (i0 + r) * p.sq[2];
      if constexpr (PAIR) {
        for (int64_t d2 = 0; d2 < D2; ++d2) q2[r * D2 + d2] = pair::make_pair(ld(row, 2 * d2), ld(row, 2 * d2 + 1));
      } else {
        for (int64_t d = 0; d < D; ++d) w.qs.p[r * D + d] = ld(row, d);
      }
      M[r] = kMasked, Lsum[r] = 0.f;
      for (int64_t d = 0; d < Dp; ++d) O[r * Dp + d] = 0.f;
    }
    for (int64_t blk = 0; blk < w.nblk; ++blk) {
      const int64_t j0 = blk * NB, n = imin(NB, p.Lk - j0), npad = round_up(n, PAIR ? imax(W, 2) : W);
      // S = Q K^T over the block's npad keys
      if constexpr (PAIR) {
        pair::gemm2<false, NATIVE>(mq, npad / W, D2, q2, D2, kt2 + blk * D2 * NB, NB, S, NB);
      } else {
        gemm<false>(mq, npad / W, D, w.qs.p, D, 1, w.kt.p + blk * D * NB, NB, S, NB);
      }
      for (int64_t r = 0; r < mq; ++r) {
        float* s = S + r * NB;
        const float mrow = scores_row(s, mask ? mask + (i0 + r) * p.smask[2] + j0 : nullptr, c, n, npad);
        const float mnew = fmax1(M[r], mrow);
        const float ref = mnew > 0.5f * kMasked ? mnew : 0.f;   // a row masked so far: P = 0, nothing to rescale
        alpha[r] = exp2_1(M[r] - ref);
        Lsum[r] = Lsum[r] * alpha[r] + exp_row(s, ref, npad);
        M[r] = mnew;
        if (alpha[r] != 1.f) scale_row(O + r * Dp, alpha[r], Dp);
        if constexpr (PAIR) {
          for (int64_t j2 = 0; j2 < npad / 2; ++j2) P2[r * (NB / 2) + j2] = pair::make_pair(s[2 * j2], s[2 * j2 + 1]);
        }
      }
      // O += P V
      if constexpr (PAIR) {
        pair::gemm2<true, NATIVE>(mq, Dp / W, npad / 2, P2, NB / 2, vp2 + j0 / 2 * Dp, Dp, O, Dp);
      } else {
        gemm<true>(mq, Dp / W, npad, S, NB, 1, w.vp.p + j0 * Dp, Dp, O, Dp);
      }
    }
    for (int64_t r = 0; r < mq; ++r) {
      const bool any = Lsum[r] > 0.f;
      const float inv = any ? 1.f / Lsum[r] : 0.f;
      T* orow = out + (i0 + r) * D;
      for (int64_t d = 0; d < D; ++d) st(orow, d, O[r * Dp + d] * inv);
      lse[i0 + r] = any ? M[r] + log2f(Lsum[r]) : -kMasked;
    }
  }
}

// Tasks [lo, hi): task t is (b, h) = divmod(t / nchunk, H) and query rows [chunk * qc, (chunk + 1) * qc).
template <class T>
static void fwd_tasks(const FdAttnArgs& p, int64_t qc, int64_t lo, int64_t hi) {
  FwdScratch w(p);
  const int64_t nchunk = (p.Lq + qc - 1) / qc;
  int64_t packed = -1;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t bh = t / nchunk, chunk = t % nchunk, b = bh / p.H, h = bh % p.H;
    const int64_t q0 = chunk * qc, q1 = imin(p.Lq, q0 + qc);
    const bool pack = bh != packed;
    packed = bh;
    if (p.pair_dot) {
#if defined(FD_ISA_IS_AVX512)
      if (p.native_bf16_dot) {
        fwd_head_rows<T, true, true>(p, b, h, q0, q1, w, pack);
        continue;
      }
#endif
      fwd_head_rows<T, true, false>(p, b, h, q0, q1, w, pack);
    } else {
      fwd_head_rows<T, false, false>(p, b, h, q0, q1, w, pack);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------------------------
template <class T>
static void bwd_head(const FdAttnArgs& p, int64_t b, int64_t h) {
  const int64_t D = p.D, Dp = round_up(D, W), Lq = p.Lq, Lk = p.Lk;
  const int64_t nblk = (Lk + NB - 1) / NB, Lkpad = nblk * NB;
  const T* q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* k = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* v = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1];
  const T* o = static_cast<const T*>(p.o) + b * p.so[0] + h * p.so[1];
  const float* lse = p.lse + (b * p.H + h) * Lq;
  const float* mask = p.mask ? p.mask + b * p.smask[0] + h * p.smask[1] : nullptr;
  T* dq = static_cast<T*>(p.dq) + (b * p.H + h) * Lq * D;
  T* dk = static_cast<T*>(p.dk) + (b * p.H + h) * Lk * D;
  T* dv = static_cast<T*>(p.dv) + (b * p.H + h) * Lk * D;
  const float c = p.scale * kLog2e;

  Buf qp(Lq * Dp), dop(Lq * Dp), dqa(Lq * Dp), di(Lq), kt(Lkpad * D), vt(Lkpad * D), kp(Lkpad * Dp), dka(NB * Dp),
      dva(NB * Dp), S(MQ * NB), dP(MQ * NB);
  pack_rows(q, p.sq[2], Lq, Lq, D, Dp, qp.p);
  pack_rows(dout, p.sdo[2], Lq, Lq, D, Dp, dop.p);
  pack_t(k, p.sk[2], Lk, D, kt.p);
  pack_t(v, p.sv[2], Lk, D, vt.p);
  pack_rows(k, p.sk[2], Lk, Lkpad, D, Dp, kp.p);
  for (int64_t i = 0; i < Lq * Dp; ++i) dqa.p[i] = 0.f;
  for (int64_t i = 0; i < Lq; ++i) {  // Di = dO_i . O_i
    const T* orow = o + i * p.so[2];
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += dop.p[i * Dp + d] * ld(orow, d);
    di.p[i] = acc;
  }
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t j0 = blk * NB, n = imin(NB, Lk - j0), npad = round_up(n, W);
    for (int64_t i = 0; i < NB * Dp; ++i) dka.p[i] = 0.f, dva.p[i] = 0.f;
    for (int64_t i0 = 0; i0 < Lq; i0 += MQ) {
      const int64_t mq = imin(MQ, Lq - i0);
      gemm<false>(mq, npad / W, D, qp.p + i0 * Dp, Dp, 1, kt.p + blk * D * NB, NB, S.p, NB);      // S = Q K^T
      gemm<false>(mq, npad / W, D, dop.p + i0 * Dp, Dp, 1, vt.p + blk * D * NB, NB, dP.p, NB);    // dP = dO V^T
      for (int64_t r = 0; r < mq; ++r) {
        float* s = S.p + r * NB;
        float* dp = dP.p + r * NB;
        scores_row(s, mask ? mask + (i0 + r) * p.smask[2] + j0 : nullptr, c, n, npad);
        exp_row(s, lse[i0 + r], npad);                                                     // P
        const Vec dvec = vset(di.p[i0 + r]);
        for (int64_t j = 0; j < npad; j += W) vst(dp + j, vmul(vld(s + j), vsub(vld(dp + j), dvec)));  // dS
      }
      gemm<true>(n, Dp / W, mq, S.p, 1, NB, dop.p + i0 * Dp, Dp, dva.p, Dp);   // dV += P^T dO
      gemm<true>(n, Dp / W, mq, dP.p, 1, NB, qp.p + i0 * Dp, Dp, dka.p, Dp);   // dK += dS^T Q
      gemm<true>(mq, Dp / W, n, dP.p, NB, 1, kp.p + j0 * Dp, Dp, dqa.p + i0 * Dp, Dp);   // dQ += dS K
    }
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        st(dk, (j0 + j) * D + d, dka.p[j * Dp + d] * p.scale);
        st(dv, (j0 + j) * D + d, dva.p[j * Dp + d]);
      }
    }
  }
  for (int64_t i = 0; i < Lq; ++i) {
    for (int64_t d = 0; d < D; ++d) st(dq, i * D + d, dqa.p[i * Dp + d] * p.scale);
  }
}

}  // namespace attn

// Entry points (declared in attention.cpp).
void attention_fwd(const FdAttnArgs& p, int64_t qc, int64_t lo, int64_t hi) {
  if (p.bf16) attn::fwd_tasks<uint16_t>(p, qc, lo, hi);
  else attn::fwd_tasks<float>(p, qc, lo, hi);
}

void attention_bwd(const FdAttnArgs& p, int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) {
    if (p.bf16) attn::bwd_head<uint16_t>(p, t / p.H, t % p.H);
    else attn::bwd_head<float>(p, t / p.H, t % p.H);
  }
}

}  // namespace fastdiff::cpu::FD_ISA
