// Shared device helpers of the pointwise/norm CUDA kernels: element conversion, launch helpers and block
// reductions. Lean headers only (never ATen/cuda/CUDAContext.h, see PLATFORM.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff::cuda {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }

// Call f(T{}) with T the device element type of an fp32 / bf16 / fp16 tensor.
template <class F> inline void dispatch_float_types(const at::Tensor& t, const char* op, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, op, " (cuda): dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

template <class T> inline T* dptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

inline void check_cuda_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, " (cuda): ", name, " must be contiguous");
}

inline void check_cuda_param(const at::Tensor& t, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, expected ", numel);
}

// Grid for a grid-stride elementwise loop: enough blocks to fill an RTX 4080 (76 SMs) several times over.
inline int elementwise_blocks(int64_t n, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 76 * 16)));
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024). `shm` holds 32 floats. Every
// thread gets the total. Two calls in a row are safe: the trailing barrier protects shm.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? shm[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  __syncthreads();
  return t;
}

}  // namespace fastdiff::cuda
