// Arguments of the fused GroupNorm CPU kernels (csrc/cpu/group_norm_impl.h), shared with the torch-facing side
// (csrc/cpu/group_norm.cpp). Plain C++: no torch headers, so the per-ISA kernel files can include it.
#pragma once

#include <cstdint>

namespace fastdiff::cpu {

// Element pointers are float* (fp32) or uint16_t* (bf16 bits) as the kernel's element type says; x, r, dy and
// y share one layout: NCHW-contiguous ((B, C, n) rows of n positions) or channels-last ((B, n, C)).
struct FdGnArgs {
  const void* x = nullptr;    // input (B, C, n) / (B, n, C)
  const void* r = nullptr;    // optional full residual, same shape and layout as x (added before the norm)
  const void* dy = nullptr;   // backward: gradient of the output
  void* y = nullptr;          // forward: output; backward: dx (== d residual)
  const float* rc = nullptr;  // optional per-(b, c) residual (B, C), broadcast over the positions
  const float* w = nullptr;   // optional weight (C)
  const float* bias = nullptr;  // optional bias (C)
  float* mean = nullptr;      // (B, G): written by the forward, read by the backward
  float* rstd = nullptr;      // (B, G)
  int64_t B = 0, C = 0, G = 0, n = 0;  // batch, channels, groups, positions per channel
  float eps = 1e-5f;
  bool silu = false;
  bool native_bf16 = false;   // bf16 stores by vcvtneps2bf16 (set when isa() is avx512_bf16; see isa.h)
  // Backward outputs, per (b, c): dw_part = sum over positions of dz * xhat, db_part = sum of dz (the caller
  // sums them over the batch), drc = sum of dx (the gradient of the per-(b, c) residual), each may be null.
  float* dw_part = nullptr;
  float* db_part = nullptr;
  float* drc = nullptr;
  // Channels-last only: the positions are cut into chunks of `chunk` per task (task t = b * nchunk + j).
  int64_t chunk = 0, nchunk = 0;
  float* part = nullptr;        // per-task per-channel partial sums: forward 2 x C (s1, s2), backward 3 x C
  float* shift = nullptr;       // forward: (B, C) shift of each channel's sums (written by the task j == 0)
  const float* ca = nullptr;    // channels-last apply passes: per-(b, c) coefficients (B, C) each
  const float* ka = nullptr;    //   forward affine z = (x + r) * ca + ka
  const float* cb = nullptr;    //   backward dx = cd * dz + cb * (x + r) + cc (cd: rstd * w, ca/ka recompute z)
  const float* cc = nullptr;
  const float* cd = nullptr;
};

}  // namespace fastdiff::cpu
