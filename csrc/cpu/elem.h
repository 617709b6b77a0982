// Element load/store for the CPU kernel bodies (*_impl.h): fp32 passes through, bf16 (raw uint16_t bits) is
// widened to fp32 for the math and rounded back once on store (fastdiff/math/bf16.h). Overloads on the pointer
// type let one templated kernel body serve both dtypes; every function inlines, so loops still vectorise.
#pragma once

#include <cstdint>

#include "fastdiff/math/bf16.h"

FD_HD float fd_ld(const float* p, int64_t i) { return p[i]; }
FD_HD float fd_ld(const uint16_t* p, int64_t i) { return fd_bf16_to_float(p[i]); }
FD_HD void fd_st(float* p, int64_t i, float v) { p[i] = v; }
FD_HD void fd_st(uint16_t* p, int64_t i, float v) { p[i] = fd_float_to_bf16(v); }
