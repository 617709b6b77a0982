// Torch-side helpers shared by the CPU op files of the pointwise/norm ops (checks, dtype switch, threading).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

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

// Parallel loop over rows with a per-thread fp32 accumulator of `width` floats (parameter gradients summed
// over rows: dweight, dbias, dshift, ...). f(lo, hi, acc) gets this thread's zeroed buffer (null when width is 0)
// and adds into it; the result is the sum over threads (an undefined tensor when width is 0). Fixed-size
// per-thread buffers keep the sum deterministic for a given thread count, unlike atomics.
template <class F> inline at::Tensor fd_rows_with_acc(int64_t rows, int64_t grain, int64_t width, F&& f) {
  const int64_t nt = at::get_num_threads();
  at::Tensor acc = width > 0 ? at::zeros({nt, width}, at::TensorOptions().dtype(at::kFloat)) : at::Tensor();
  float* ap = width > 0 ? acc.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    const int64_t t = at::get_thread_num();
    TORCH_CHECK(t < nt, "fastdiff: thread index ", t, " beyond the ", nt, " accumulators");
    f(lo, hi, ap ? ap + t * width : nullptr);
  });
  return width > 0 ? acc.sum(0) : at::Tensor();
}

// Slice [start, start + len) of an accumulator from fd_rows_with_acc as its own tensor (outputs of one op must not
// alias each other); zeros when there were no rows, an empty tensor when the gradient was not asked for.
inline at::Tensor fd_acc_part(const at::Tensor& acc, bool wanted, int64_t start, int64_t len) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!wanted) return at::empty({0}, f32);
  if (!acc.defined()) return at::zeros({len}, f32);
  return acc.narrow(0, start, len).clone();
}

}  // namespace fastdiff::cpu
