// CUDA side of the fused GroupNorm (+ residual, + SiLU), forward and backward. The per-element and per-group
// math is fastdiff/math/group_norm.h, the same header the CPU kernels run (and the CPU tests exercise); the
// pipeline is the CPU's as well: per-(b, c) shifted sums -> per-group statistics (exact merge over channels) ->
// per-(b, c) affine coefficients -> one elementwise pass. Layouts: x is (B, C, n) contiguous (NCHW) or
// (B, n, C) contiguous (channels-last); the reductions have one kernel per layout so loads stay coalesced
// (NCHW: a block walks one channel's contiguous positions; channels-last: 32 neighbouring channels per warp).
// The reductions are split over chunks of positions as well (grid axis y for NCHW, z for channels-last), as the
// CPU's channels-last path does: every chunk shifts by the channel's value at position 0, so the chunks'
// shifted sums add exactly, and the finalize kernels merge them before the group math. Without the split a
// B = 1 VAE decode at 128 channels is 4 channels-last blocks: far from filling a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "fastdiff/math/group_norm.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }

constexpr int kThreads = 256;  // NCHW reductions and elementwise passes
constexpr int kTileC = 32;     // channels-last reductions: 32 channels (one warp, coalesced) x kRows positions
constexpr int kRows = 8;
constexpr int kBlocksPerSm = 4;           // reductions are split until they launch about this many blocks per SM
constexpr int64_t kMaxSplits = 64;        // the finalize threads merge the chunks one by one
constexpr int64_t kMinChunkElems = 4096;  // elements one reduction block covers at least (16 per thread)

// Sum K per-thread values over a block of kThreads threads (1-D); thread 0 gets the totals.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float sh[K][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = 16; o > 0; o /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    if (lane == 0) sh[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) s += sh[k][w];
      v[k] = s;
    }
  }
}

// Sum K values over threadIdx.y of a (kTileC, kRows) block; threads with threadIdx.y == 0 get the totals.
template <int K>
__device__ __forceinline__ void column_sum(float (&v)[K]) {
  __shared__ float sh[K][kRows][kTileC];
#pragma unroll
  for (int k = 0; k < K; ++k) sh[k][threadIdx.y][threadIdx.x] = v[k];
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
      for (int r = 0; r < kRows; ++r) s += sh[k][r][threadIdx.x];
      v[k] = s;
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------------------------
// Per-(b, c) shifted sums s1 = sum(v - shift), s2 = sum((v - shift)^2) over the positions [p0, p1) of chunk z,
// shift = v at position 0, v = x (+ r) (+ rc[b, c]). Outputs s1, s2: (S, B, C) fp32 (chunk z at z * B * C);
// shift: (B, C) fp32, stored by chunk 0.

// Positions [p0, p1) of chunk z when n positions are cut into chunks of `chunk`.
__device__ __forceinline__ void chunk_range(int64_t z, int64_t chunk, int64_t n, int64_t& p0, int64_t& p1) {
  p0 = z * chunk;
  p1 = p0 + chunk < n ? p0 + chunk : n;
}

// NCHW: one block per (b, c, chunk), grid (B * C, S).
template <typename T>
__global__ void gn_sums_nchw(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ rc,
                             int64_t n, int64_t chunk, float* __restrict__ s1, float* __restrict__ s2,
                             float* __restrict__ shift) {
  const int64_t bc = blockIdx.x, z = blockIdx.y, BC = gridDim.x;
  int64_t p0, p1;
  chunk_range(z, chunk, n, p0, p1);
  const T* xr = x + bc * n;
  const T* rr = r != nullptr ? r + bc * n : nullptr;
  const float add = rc != nullptr ? rc[bc] : 0.f;
  const float sh = to_f(xr[0]) + (rr != nullptr ? to_f(rr[0]) : 0.f) + add;
  float acc[2] = {0.f, 0.f};
  for (int64_t i = p0 + threadIdx.x; i < p1; i += kThreads) {
    const float v = to_f(xr[i]) + (rr != nullptr ? to_f(rr[i]) : 0.f) + add - sh;
    acc[0] += v;
    acc[1] += v * v;
  }
  block_sum<2>(acc);
  if (threadIdx.x == 0) {
    s1[z * BC + bc] = acc[0];
    s2[z * BC + bc] = acc[1];
    if (z == 0) shift[bc] = sh;
  }
}

// Channels-last: block (kTileC, kRows) per (b, tile of 32 channels, chunk), grid (B, ceil(C / 32), S).
template <typename T>
__global__ void gn_sums_cl(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ rc,
                           int64_t C, int64_t n, int64_t chunk, float* __restrict__ s1, float* __restrict__ s2,
                           float* __restrict__ shift) {
  const int64_t b = blockIdx.x, c = int64_t(blockIdx.y) * kTileC + threadIdx.x, z = blockIdx.z;
  const int64_t BC = int64_t(gridDim.x) * C;
  const bool ok = c < C;
  int64_t p0, p1;
  chunk_range(z, chunk, n, p0, p1);
  float acc[2] = {0.f, 0.f};
  float sh = 0.f, add = 0.f;
  if (ok) {
    add = rc != nullptr ? rc[b * C + c] : 0.f;
    const int64_t o = b * n * C + c;
    sh = to_f(x[o]) + (r != nullptr ? to_f(r[o]) : 0.f) + add;
    for (int64_t q = p0 + threadIdx.y; q < p1; q += kRows) {
      const int64_t i = o + q * C;
      const float v = to_f(x[i]) + (r != nullptr ? to_f(r[i]) : 0.f) + add - sh;
      acc[0] += v;
      acc[1] += v * v;
    }
  }
  column_sum<2>(acc);
  if (ok && threadIdx.y == 0) {
    s1[z * BC + b * C + c] = acc[0];
    s2[z * BC + b * C + c] = acc[1];
    if (z == 0) shift[b * C + c] = sh;
  }
}

// Adds chunks 1..S-1 of `count` consecutive sums into chunk 0 (chunk z at part + z * stride).
__device__ __forceinline__ void merge_chunks(float* part, int64_t count, int64_t S, int64_t stride) {
  for (int64_t j = 0; j < count; ++j) {
    float t = part[j];
    for (int64_t z = 1; z < S; ++z) t += part[z * stride + j];
    part[j] = t;
  }
}

// One thread per (b, g): merge the chunks, group statistics, then the per-channel affine a, k of
// z = (x + r) * a + k.
__global__ void gn_finalize(float* __restrict__ s1, float* __restrict__ s2, const float* __restrict__ shift,
                            const float* __restrict__ w, const float* __restrict__ bias, const float* __restrict__ rc,
                            int64_t B, int64_t C, int64_t G, int64_t n, int64_t S, float eps,
                            float* __restrict__ mean, float* __restrict__ rstd, float* __restrict__ a,
                            float* __restrict__ k) {
  const int64_t bg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bg >= B * G) return;
  const int64_t b = bg / G, cpg = C / G, c0 = (bg % G) * cpg, o = b * C + c0;
  merge_chunks(s1 + o, cpg, S, B * C);
  merge_chunks(s2 + o, cpg, S, B * C);
  float m, rs;
  fd_gn_group_stats(s1 + o, s2 + o, shift + o, cpg, n, eps, &m, &rs);
  mean[bg] = m;
  rstd[bg] = rs;
  for (int64_t j = 0; j < cpg; ++j) {
    const int64_t c = c0 + j;
    fd_gn_channel_affine(m, rs, w != nullptr ? w[c] : 1.f, bias != nullptr ? bias[c] : 0.f,
                         rc != nullptr ? rc[o + j] : 0.f, &a[o + j], &k[o + j]);
  }
}

// Per-(b, c) index of flat element i of x in its layout.
template <bool CL>
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t n) {
  return CL ? (i / (n * C)) * C + i % C : i / n;
}

// y = act((x + r) * a[b, c] + k[b, c]), grid-stride over all elements.
template <typename T, bool CL>
__global__ void gn_apply(const T* __restrict__ x, const T* __restrict__ r, const float* __restrict__ a,
                         const float* __restrict__ k, int64_t total, int64_t C, int64_t n, bool silu,
                         T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bc = channel_of<CL>(i, C, n);
    float z = (to_f(x[i]) + (r != nullptr ? to_f(r[i]) : 0.f)) * a[bc] + k[bc];
    if (silu) z = fd_silu(z);
    y[i] = from_f<T>(z);
  }
}

// ---- backward ---------------------------------------------------------------------------------------------------
// Per-(b, c) sums sdz = sum dz, sdzv = sum dz (v - mean), sv = sum (v - mean), with u = x + r, z = u a + k,
// dz = dy act'(z), v - mean = u + off, off = rc - mean.

// The forward's per-channel affine from the saved statistics (one thread per (b, c)).
__global__ void gn_affine(const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ w,
                          const float* __restrict__ bias, const float* __restrict__ rc, int64_t B, int64_t C,
                          int64_t G, float* __restrict__ a, float* __restrict__ k, float* __restrict__ off) {
  const int64_t bc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bc >= B * C) return;
  const int64_t b = bc / C, c = bc % C, bg = b * G + c / (C / G);
  const float rcv = rc != nullptr ? rc[bc] : 0.f;
  fd_gn_channel_affine(mean[bg], rstd[bg], w != nullptr ? w[c] : 1.f, bias != nullptr ? bias[c] : 0.f, rcv, &a[bc],
                       &k[bc]);
  off[bc] = rcv - mean[bg];
}

template <typename T>
__device__ __forceinline__ void bwd_acc(const T* x, const T* r, const T* dy, int64_t i, float a, float k, float off,
                                        bool silu, float (&acc)[3]) {
  const float u = to_f(x[i]) + (r != nullptr ? to_f(r[i]) : 0.f);
  const float dz = fd_gn_dz(to_f(dy[i]), u * a + k, silu);
  const float v = u + off;
  acc[0] += dz;
  acc[1] += dz * v;
  acc[2] += v;
}

// Sums of chunk z (positions [p0, p1)) into sums[z * 3BC + 3 * bc + {0, 1, 2}]; grids as the forward's.
template <typename T>
__global__ void gn_bwd_sums_nchw(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ dy,
                                 const float* __restrict__ a, const float* __restrict__ k,
                                 const float* __restrict__ off, int64_t n, int64_t chunk, bool silu,
                                 float* __restrict__ sums) {
  const int64_t bc = blockIdx.x, z = blockIdx.y, BC = gridDim.x;
  int64_t p0, p1;
  chunk_range(z, chunk, n, p0, p1);
  float acc[3] = {0.f, 0.f, 0.f};
  const float av = a[bc], kv = k[bc], ov = off[bc];
  for (int64_t i = p0 + threadIdx.x; i < p1; i += kThreads) bwd_acc(x, r, dy, bc * n + i, av, kv, ov, silu, acc);
  block_sum<3>(acc);
  if (threadIdx.x == 0) {
    float* s = sums + z * 3 * BC + 3 * bc;
    s[0] = acc[0], s[1] = acc[1], s[2] = acc[2];
  }
}

template <typename T>
__global__ void gn_bwd_sums_cl(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ dy,
                               const float* __restrict__ a, const float* __restrict__ k, const float* __restrict__ off,
                               int64_t C, int64_t n, int64_t chunk, bool silu, float* __restrict__ sums) {
  const int64_t b = blockIdx.x, c = int64_t(blockIdx.y) * kTileC + threadIdx.x, z = blockIdx.z;
  const int64_t BC = int64_t(gridDim.x) * C;
  const bool ok = c < C;
  int64_t p0, p1;
  chunk_range(z, chunk, n, p0, p1);
  float acc[3] = {0.f, 0.f, 0.f};
  if (ok) {
    const int64_t bc = b * C + c;
    const float av = a[bc], kv = k[bc], ov = off[bc];
    for (int64_t q = p0 + threadIdx.y; q < p1; q += kRows) {
      bwd_acc(x, r, dy, (b * n + q) * C + c, av, kv, ov, silu, acc);
    }
  }
  column_sum<3>(acc);
  if (ok && threadIdx.y == 0) {
    float* s = sums + z * 3 * BC + 3 * (b * C + c);
    s[0] = acc[0], s[1] = acc[1], s[2] = acc[2];
  }
}

// One thread per (b, g): merge the chunks, the group terms, then per channel the dx coefficients and the
// parameter gradients.
__global__ void gn_bwd_finalize(float* __restrict__ sums, const float* __restrict__ mean,
                                const float* __restrict__ rstd, const float* __restrict__ w,
                                const float* __restrict__ rc, int64_t B, int64_t C, int64_t G, int64_t n, int64_t S,
                                float* __restrict__ cd, float* __restrict__ cb, float* __restrict__ cc,
                                float* __restrict__ dw_part, float* __restrict__ db_part, float* __restrict__ drc) {
  const int64_t bg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bg >= B * G) return;
  const int64_t b = bg / G, cpg = C / G, c0 = (bg % G) * cpg;
  merge_chunks(sums + 3 * (b * C + c0), 3 * cpg, S, 3 * B * C);  // the group's (sdz, sdzv, sv) triples are consecutive
  const float m = mean[bg], rs = rstd[bg];
  float g = 0.f, gx = 0.f;
  for (int64_t j = 0; j < cpg; ++j) {  // fd_gn_bwd_group over the interleaved (sdz, sdzv, sv) triples
    const float* s = sums + 3 * (b * C + c0 + j);
    const float wc = w != nullptr ? w[c0 + j] : 1.f;
    g += wc * s[0];
    gx += wc * s[1];
  }
  const float inv_count = 1.0f / (static_cast<float>(n) * static_cast<float>(cpg));
  const float mg = g * inv_count, mgx = rs * gx * inv_count;
  for (int64_t j = 0; j < cpg; ++j) {
    const int64_t c = c0 + j, bc = b * C + c;
    const float* s = sums + 3 * bc;
    fd_gn_bwd_coefs(w != nullptr ? w[c] : 1.f, rc != nullptr ? rc[bc] : 0.f, m, rs, mg, mgx, &cd[bc], &cb[bc], &cc[bc]);
    dw_part[bc] = rs * s[1];
    db_part[bc] = s[0];
    if (drc != nullptr) drc[bc] = cd[bc] * s[0] + cb[bc] * s[2] - static_cast<float>(n) * rs * mg;
  }
}

template <typename T, bool CL>
__global__ void gn_bwd_apply(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ dy,
                             const float* __restrict__ a, const float* __restrict__ k, const float* __restrict__ cd,
                             const float* __restrict__ cb, const float* __restrict__ cc, int64_t total, int64_t C,
                             int64_t n, bool silu, T* __restrict__ dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bc = channel_of<CL>(i, C, n);
    const float u = to_f(x[i]) + (r != nullptr ? to_f(r[i]) : 0.f);
    const float dz = fd_gn_dz(to_f(dy[i]), u * a[bc] + k[bc], silu);
    dx[i] = from_f<T>(cd[bc] * dz + cb[bc] * u + cc[bc]);
  }
}

// ---- torch-facing -----------------------------------------------------------------------------------------------

bool channels_last_like(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}
at::Tensor to_layout(const at::Tensor& t, bool cl) { return cl ? t.movedim(1, -1).contiguous() : t.contiguous(); }
at::Tensor from_layout(const at::Tensor& t, bool cl) { return cl ? t.movedim(-1, 1) : t; }
const float* fptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void check(const char* op, const at::Tensor& x, int64_t G, const std::optional<at::Tensor>& w,
           const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& r,
           const std::optional<at::Tensor>& rc) {
  TORCH_CHECK(x.is_cuda(), op, " (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              " (cuda): dtype must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (B, C, *), got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, op, ": num_channels (", C, ") must be divisible by num_groups (", G, ")");
  for (auto* p : {&w, &b}) {
    if (p->has_value()) {
      TORCH_CHECK((*p)->device() == x.device() && (*p)->scalar_type() == at::kFloat && (*p)->is_contiguous() &&
                      (*p)->numel() == C,
                  op, ": weight and bias must be contiguous float32 tensors of C = ", C, " elements on x's device");
    }
  }
  if (r.has_value()) {
    TORCH_CHECK(r->sizes() == x.sizes() && r->scalar_type() == x.scalar_type() && r->device() == x.device(), op,
                ": residual must be a tensor of x's shape, dtype and device");
  }
  if (rc.has_value()) {
    TORCH_CHECK(rc->device() == x.device() && rc->scalar_type() == at::kFloat && rc->is_contiguous() &&
                    rc->numel() == x.size(0) * C,
                op, ": the per-channel residual must be a contiguous float32 tensor of B * C elements on x's device");
  }
}

template <typename F> void by_dtype(const at::Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: f(static_cast<__half*>(nullptr)); break;
  }
}

// (S, chunk): the positions of each reduction cut into S chunks of `chunk`, so that `blocks` blocks per chunk
// give every SM about kBlocksPerSm; each block covers at least kMinChunkElems elements (`per_pos` per position:
// kTileC for a channels-last tile), at most kMaxSplits chunks; the last chunk may be shorter.
std::pair<int64_t, int64_t> position_splits(int64_t blocks, int64_t n, int64_t per_pos) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));  // x's GPU: the caller holds a CUDAGuard
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = (int64_t(sms) * kBlocksPerSm + blocks - 1) / blocks;
  const int64_t by_size = n * per_pos / kMinChunkElems;
  const int64_t S = std::clamp<int64_t>(std::min(want, by_size), 1, kMaxSplits);
  const int64_t chunk = (n + S - 1) / S;
  return {(n + chunk - 1) / chunk, chunk};
}

int elementwise_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(const at::Tensor& x_in, int64_t G,
                                                                const std::optional<at::Tensor>& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& residual,
                                                                const std::optional<at::Tensor>& residual_c,
                                                                double eps, bool silu) {
  check("group_norm", x_in, G, weight, bias, residual, residual_c);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = C && B ? x_in.numel() / (B * C) : 0;
  const bool cl = channels_last_like(x_in);
  at::Tensor x = to_layout(x_in, cl);
  at::Tensor r = residual.has_value() ? to_layout(*residual, cl) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({B, G}, f32), rstd = at::empty({B, G}, f32);
  if (B == 0 || n == 0) return {from_layout(y, cl), mean.fill_(NAN), rstd.fill_(NAN)};
  const auto [S, chunk] = cl ? position_splits(B * ((C + kTileC - 1) / kTileC), n, kTileC) : position_splits(B * C, n, 1);
  at::Tensor s = at::empty({3 + 2 * S, B, C}, f32);  // shift, a, k, then s1 of each chunk, then s2 of each chunk
  float *sh = s[0].data_ptr<float>(), *a = s[1].data_ptr<float>(), *k = s[2].data_ptr<float>();
  float *s1 = s[3].data_ptr<float>(), *s2 = s[3 + S].data_ptr<float>();
  const float* rc = fptr(residual_c);
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(x, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* rp = r.defined() ? reinterpret_cast<const T*>(r.data_ptr()) : nullptr;
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    if (cl) {
      gn_sums_cl<T><<<dim3(B, (C + kTileC - 1) / kTileC, S), dim3(kTileC, kRows), 0, stream>>>(xp, rp, rc, C, n, chunk,
                                                                                               s1, s2, sh);
    } else {
      gn_sums_nchw<T><<<dim3(B * C, S), kThreads, 0, stream>>>(xp, rp, rc, n, chunk, s1, s2, sh);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_finalize<<<(B * G + 127) / 128, 128, 0, stream>>>(s1, s2, sh, fptr(weight), fptr(bias), rc, B, C, G, n, S,
                                                         static_cast<float>(eps), mean.data_ptr<float>(),
                                                         rstd.data_ptr<float>(), a, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = x.numel();
    if (cl) gn_apply<T, true><<<elementwise_blocks(total), kThreads, 0, stream>>>(xp, rp, a, k, total, C, n, silu, yp);
    else gn_apply<T, false><<<elementwise_blocks(total), kThreads, 0, stream>>>(xp, rp, a, k, total, C, n, silu, yp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {from_layout(y, cl), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, int64_t G, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& residual_c, const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  check("group_norm_backward", x_in, G, weight, bias, residual, residual_c);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type() &&
                  dy_in.device() == x_in.device(),
              "group_norm_backward: grad does not match x");
  const int64_t B = x_in.size(0), C = x_in.size(1), n = C && B ? x_in.numel() / (B * C) : 0;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.numel() == B * G && rstd.numel() == B * G &&
                  mean.device() == x_in.device() && rstd.device() == x_in.device(),
              "group_norm_backward: mean and rstd must be the forward's contiguous float32 (B, G) statistics");
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = channels_last_like(x_in);
  at::Tensor x = to_layout(x_in, cl), dy = to_layout(dy_in, cl);
  at::Tensor r = residual.has_value() ? to_layout(*residual, cl) : at::Tensor();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw_part = at::zeros({B, C}, f32), db_part = at::zeros({B, C}, f32);
  at::Tensor drc = residual_c.has_value() ? at::zeros({B, C}, f32) : at::empty({0}, f32);
  if (B == 0 || n == 0) return {from_layout(dx, cl), dw_part.sum(0), db_part.sum(0), drc};
  const auto [S, chunk] = cl ? position_splits(B * ((C + kTileC - 1) / kTileC), n, kTileC) : position_splits(B * C, n, 1);
  at::Tensor s = at::empty({6 + 3 * S, B, C}, f32);  // a, k, off, cd, cb, cc, then per chunk (sdz, sdzv, sv)
  float *a = s[0].data_ptr<float>(), *k = s[1].data_ptr<float>(), *off = s[2].data_ptr<float>();
  float *cd = s[3].data_ptr<float>(), *cb = s[4].data_ptr<float>(), *cc = s[5].data_ptr<float>();
  float* sums = s[6].data_ptr<float>();  // S chunks of 3 * B * C floats, (sdz, sdzv, sv) interleaved
  const float *w = fptr(weight), *rc = fptr(residual_c);
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(x, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* rp = r.defined() ? reinterpret_cast<const T*>(r.data_ptr()) : nullptr;
    const T* dyp = reinterpret_cast<const T*>(dy.data_ptr());
    T* dxp = reinterpret_cast<T*>(dx.data_ptr());
    gn_affine<<<(B * C + 255) / 256, 256, 0, stream>>>(mean.data_ptr<float>(), rstd.data_ptr<float>(), w, fptr(bias),
                                                       rc, B, C, G, a, k, off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (cl) {
      gn_bwd_sums_cl<T><<<dim3(B, (C + kTileC - 1) / kTileC, S), dim3(kTileC, kRows), 0, stream>>>(
          xp, rp, dyp, a, k, off, C, n, chunk, silu, sums);
    } else {
      gn_bwd_sums_nchw<T><<<dim3(B * C, S), kThreads, 0, stream>>>(xp, rp, dyp, a, k, off, n, chunk, silu, sums);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_bwd_finalize<<<(B * G + 127) / 128, 128, 0, stream>>>(
        sums, mean.data_ptr<float>(), rstd.data_ptr<float>(), w, rc, B, C, G, n, S, cd, cb, cc,
        dw_part.data_ptr<float>(), db_part.data_ptr<float>(), residual_c.has_value() ? drc.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = x.numel();
    if (cl) {
      gn_bwd_apply<T, true><<<elementwise_blocks(total), kThreads, 0, stream>>>(xp, rp, dyp, a, k, cd, cb, cc, total,
                                                                               C, n, silu, dxp);
    } else {
      gn_bwd_apply<T, false><<<elementwise_blocks(total), kThreads, 0, stream>>>(xp, rp, dyp, a, k, cd, cb, cc, total,
                                                                                C, n, silu, dxp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {from_layout(dx, cl), dw_part.sum(0), db_part.sum(0), drc};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}
