#include "isa.h"

#include <atomic>
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

// -1: the detected ISA. Read on every kernel call (a relaxed load: the value changes only between calls).
std::atomic<int> requested{-1};

std::runtime_error too_high(int level) {
  return std::runtime_error(std::string("cpu_isa=") + isa_name(static_cast<Isa>(level)) +
                            " (FASTDIFF_CPU_ISA) but this CPU supports at most " + isa_name(detected_isa()));
}

}  // namespace

Isa detected_isa() {
  static const Isa best = detect();
  return best;
}

Isa isa() {
  const int want = requested.load(std::memory_order_relaxed);
  if (want < 0) return detected_isa();
  if (want > static_cast<int>(detected_isa())) throw too_high(want);
  return static_cast<Isa>(want);
}

int parse_isa(const char* name) {
  if (name == nullptr || *name == '\0' || std::strcmp(name, "auto") == 0) return -1;
  if (std::strcmp(name, "scalar") == 0) return static_cast<int>(Isa::scalar);
  if (std::strcmp(name, "avx2") == 0) return static_cast<int>(Isa::avx2);
  if (std::strcmp(name, "avx512") == 0) return static_cast<int>(Isa::avx512);
  if (std::strcmp(name, "avx512_bf16") == 0) return static_cast<int>(Isa::avx512_bf16);
  throw std::invalid_argument(std::string("cpu_isa=") + name + " is not one of scalar, avx2, avx512, avx512_bf16");
}

void set_isa(int level) {
  if (level > static_cast<int>(detected_isa())) throw too_high(level);
  requested.store(level < 0 ? -1 : level, std::memory_order_relaxed);
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
