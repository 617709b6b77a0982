// Opens an ISA-specific kernel translation unit (csrc/cpu/isa/<op>_<isa>.cpp). Usage:
//   #define FD_ISA avx512
//   #include "../isa_begin.h"
//   #include "../<op>_impl.h"      // kernel bodies inside namespace fastdiff::cpu::FD_ISA
// The standard headers every kernel may use are included BEFORE the target pragma, so no inline function of
// the standard library is compiled with AVX-512 and then picked by the linker for another ISA's caller.
// Kernel bodies include only the shared math headers (csrc/include/fastdiff/math, internal linkage, see hd.h),
// never torch headers, and define their functions in a namespace named after the ISA.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fastdiff/hd.h"

#if !defined(FD_ISA)
#error "define FD_ISA (scalar, avx2 or avx512) before including isa_begin.h"
#endif

#define FD_ISA_STR2(x) #x
#define FD_ISA_STR(x) FD_ISA_STR2(x)

#if defined(FD_ISA_IS_AVX512)
// prefer-vector-width=512: GCC's generic tuning would otherwise stay at 256-bit vectors.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512")
#elif defined(FD_ISA_IS_AVX2)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif
