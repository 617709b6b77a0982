// bf16 <-> fp32 conversion by bit manipulation (round to nearest even), written so compilers vectorise it.
// Shared by every CPU kernel.
#pragma once

#include "fastdiff/hd.h"

FD_HD float fd_bf16_to_float(unsigned short h) {
  union { unsigned int u; float f; } v;
  v.u = static_cast<unsigned int>(h) << 16;
  return v.f;
}

FD_HD unsigned short fd_float_to_bf16(float f) {
  union { unsigned int u; float f; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((v.u >> 16) | 0x40u);  // NaN stays NaN
  const unsigned int rounding = 0x7fffu + ((v.u >> 16) & 1u);
  return static_cast<unsigned short>((v.u + rounding) >> 16);
}
