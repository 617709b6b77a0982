// Helpers for the torch-facing side of the CPU kernels: run-time ISA choice and threading.
#pragma once

#include <ATen/Parallel.h>

#include "isa.h"

// Declare one kernel function in the three ISA namespaces (the definitions come from csrc/cpu/isa/).
#define FD_DECLARE_ISA_KERNEL(ret, name, ...)          \
  namespace fastdiff::cpu::scalar { ret name(__VA_ARGS__); } \
  namespace fastdiff::cpu::avx2 { ret name(__VA_ARGS__); }   \
  namespace fastdiff::cpu::avx512 { ret name(__VA_ARGS__); }

// Call the variant of `name` for the CPU's instruction set.
#define FD_ISA_CALL(name, ...)                                                    \
  do {                                                                            \
    switch (::fastdiff::cpu::isa()) {                                             \
      case ::fastdiff::cpu::Isa::avx512_bf16:                                     \
      case ::fastdiff::cpu::Isa::avx512: ::fastdiff::cpu::avx512::name(__VA_ARGS__); break; \
      case ::fastdiff::cpu::Isa::avx2: ::fastdiff::cpu::avx2::name(__VA_ARGS__); break;     \
      default: ::fastdiff::cpu::scalar::name(__VA_ARGS__); break;                 \
    }                                                                             \
  } while (0)
