// Arguments of the CPU flash-attention kernels (attention_impl.h), filled by attention.cpp.
// Tensors are (B, H, L, D) with any strides in B, H, L and unit stride in D (head_dim); element pointers are
// fp32 (float) or bf16 (raw uint16_t bits) as the dtype says. All math is fp32.
#pragma once

#include <cstdint>

struct FdAttnArgs {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  bool bf16 = false;           // q, k, v, out, grads are bf16 (else fp32)
  bool pair_dot = false;       // forward GEMMs as bf16 pair dot products (vdpbf16ps, or its emulation)
  bool native_bf16_dot = false;  // the CPU has AVX512_BF16: pair dots by vdpbf16ps (else emulated, for tests)
  float scale = 1.f;           // softmax(scale * q k^T + mask)

  const void* q = nullptr;  // (B, H, Lq, D), strides sq[0..2] (elements)
  const void* k = nullptr;  // (B, H, Lk, D)
  const void* v = nullptr;  // (B, H, Lk, D)
  int64_t sq[3] = {0, 0, 0}, sk[3] = {0, 0, 0}, sv[3] = {0, 0, 0};

  // Optional additive fp32 mask broadcast to (B, H, Lq, Lk): strides (0 for a broadcast dim), unit stride in Lk.
  const float* mask = nullptr;
  int64_t smask[3] = {0, 0, 0};

  void* out = nullptr;      // (B, H, Lq, D) contiguous
  float* lse = nullptr;     // (B, H, Lq) contiguous: log2 of the softmax normaliser of each row, in the units of
                            // scale * log2(e) * q k^T (+inf for a row whose keys are all masked)

  // backward
  const void* dout = nullptr;  // (B, H, Lq, D), strides sdo
  const void* o = nullptr;     // forward output (B, H, Lq, D), strides so
  int64_t sdo[3] = {0, 0, 0}, so[3] = {0, 0, 0};
  void* dq = nullptr;  // (B, H, Lq, D) contiguous
  void* dk = nullptr;  // (B, H, Lk, D) contiguous
  void* dv = nullptr;  // (B, H, Lk, D) contiguous
};
