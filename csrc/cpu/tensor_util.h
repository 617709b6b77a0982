// Torch-side helpers shared by the CPU op files of the pointwise/norm ops (checks, dtype switch, threading).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastdiff::cpu {

// Raw element pointer: float for fp32 tensors, uint16_t (the bf16 bits) for bf16 tensors. Dtype is checked first.
template <class T> inline T* fd_data(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <class T> inline T* fd_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? fd_data<T>(*t) : nullptr;
}

// Call f(float{}) for fp32 and f(uint16_t{}) for bf16 (the kernels' element types), else a clear error.
template <class F> inline void fd_float_or_bf16(const at::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == at::kFloat) f(float{});
  else if (t.scalar_type() == at::kBFloat16) f(uint16_t{});
  else TORCH_CHECK(false, op, " (cpu): dtype must be float32 or bfloat16, got ", t.scalar_type());
}

inline void fd_check_cpu_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, " (cpu): ", name, " must be contiguous");
}

// A per-row parameter vector (weight, bias, shift, scale, gate): contiguous fp32 of the given numel. The
// Python wrappers convert these small vectors to fp32 once, so kernels read one type.
inline void fd_check_param(const at::Tensor& t, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, expected ", numel);
}

// Rows per task so that one task touches at least ~32K elements (enough work to amortise a thread wake-up).
inline int64_t fd_row_grain(int64_t row_len) {
  const int64_t g = (int64_t{1} << 15) / (row_len > 0 ? row_len : 1);
  return g > 0 ? g : 1;
}

}  // namespace fastdiff::cpu
