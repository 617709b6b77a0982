// Run-time choice of the CPU instruction set. Kernels that gain from wide vectors are compiled once per ISA
// (csrc/cpu/isa/*_<isa>.cpp, each under its own `#pragma GCC target`) into one binary; isa() picks the best
// the CPU supports, so the extension is not tied to the machine that built it.
#pragma once

namespace fastdiff::cpu {

// avx512_bf16: AVX-512 plus AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4/5). It runs the avx512 kernel
// files; kernels that store bf16 use the one-instruction round-to-nearest-even conversion (vcvtneps2bf16) in
// functions compiled for it, chosen at run time (e.g. FdGnArgs::native_bf16).
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// Detected once. FASTDIFF_CPU_ISA=scalar|avx2|avx512|avx512_bf16 lowers it (for tests of the other paths); asking for
// more than the CPU has is an error.
Isa isa();
const char* isa_name(Isa isa);

}  // namespace fastdiff::cpu
