#include "isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastdiff::cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::avx512_bf16 : Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa choose() {
  const Isa best = detect();
  const char* env = std::getenv("FASTDIFF_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
  else if (std::strcmp(env, "avx512_bf16") == 0) want = Isa::avx512_bf16;
  else throw std::runtime_error(std::string("FASTDIFF_CPU_ISA=") + env +
                                " is not one of scalar, avx2, avx512, avx512_bf16");
  if (static_cast<int>(want) > static_cast<int>(best)) {
    throw std::runtime_error(std::string("FASTDIFF_CPU_ISA=") + env + " but this CPU supports at most " +
                             isa_name(best));
  }
  return want;
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace fastdiff::cpu
