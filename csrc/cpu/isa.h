// Run-time choice of the CPU instruction set. Kernels that gain from wide vectors are compiled once per ISA
// (csrc/cpu/isa/*_<isa>.cpp, each under its own `#pragma GCC target`) into one binary; isa() picks the best
// the CPU supports, so the extension is not tied to the machine that built it.
#pragma once

namespace fastdiff::cpu {

// avx512_bf16: AVX-512 plus AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4/5). It runs the avx512 kernel
// files; kernels that store bf16 use the one-instruction round-to-nearest-even conversion (vcvtneps2bf16) in
// functions compiled for it, chosen at run time (e.g. FdGnArgs::native_bf16).
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The ISA the kernels dispatch to: the best the CPU has (detected once), unless set_isa() lowered it.
// Python sets it from fastdiff.settings (FASTDIFF_CPU_ISA, or settings.override(cpu_isa=...) in tests); a level
// above the CPU's is refused.
Isa isa();
Isa detected_isa();
const char* isa_name(Isa isa);
// Parse "scalar" | "avx2" | "avx512" | "avx512_bf16" ("" or "auto": the detected one; -1). Throws on other names.
int parse_isa(const char* name);
// Set the level (-1: the detected one); throws when the CPU lacks it.
void set_isa(int level);

}  // namespace fastdiff::cpu
