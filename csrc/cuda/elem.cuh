// Shared device helpers of the pointwise/norm CUDA kernels: element conversion, launch helpers and block
// reductions. Lean headers only (ATen/cuda/CUDAContext.h pulls cusparse.h and compiles ~4.5x slower).
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

// `t` must live on `device` (the GPU the kernel launches on), index included: a kernel on cuda:0 cannot read
// a pointer into cuda:1's memory.
inline void check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, " (cuda): ", name, " is on ", t.device(), ", x on ", device);
}

inline void check_cuda_param(const at::Tensor& t, int64_t numel, const char* op, const char* name,
                             const c10::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a contiguous float32 CUDA tensor");
  check_same_device(t, device, op, name);
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

// Column sums for parameter gradients (dweight/dbias of a norm, dshift/dscale/dgate of adaLN):
//   out0[g, j] += sum_l f(g * rows + l, j).x,   out1[g, j] += sum_l f(g * rows + l, j).y
// over the `rows` rows of group g (grid.z; one group for a norm, one per batch element for adaLN). A block is
// 32 columns x 8 row lanes over one chunk of rows (grid.y); lanes are reduced in shared memory, chunks with one
// fp32 atomicAdd per column, into out0/out1 zeroed by the caller. F: __device__ float2 operator()(row, col).
template <class F>
__global__ void column_sums_kernel(F f, int64_t rows, int64_t cols, int64_t rows_per_chunk, float* __restrict__ out0,
                                   float* __restrict__ out1) {
  __shared__ float s0[8][33], s1[8][33];
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  const int64_t g = blockIdx.z;
  const int64_t l0 = blockIdx.y * rows_per_chunk;
  const int64_t l1 = l0 + rows_per_chunk < rows ? l0 + rows_per_chunk : rows;
  float a = 0.f, b = 0.f;
  if (j < cols) {
    for (int64_t l = l0 + threadIdx.y; l < l1; l += 8) {
      const float2 t = f(g * rows + l, j);
      a += t.x;
      b += t.y;
    }
  }
  s0[threadIdx.y][threadIdx.x] = a;
  s1[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    for (int k = 1; k < 8; ++k) {
      a += s0[k][threadIdx.x];
      b += s1[k][threadIdx.x];
    }
    atomicAdd(out0 + g * cols + j, a);
    if (out1 != nullptr) atomicAdd(out1 + g * cols + j, b);
  }
}

template <class F>
inline void launch_column_sums(const F& f, int64_t groups, int64_t rows, int64_t cols, float* out0, float* out1) {
  if (groups == 0 || rows == 0 || cols == 0) return;
  const int64_t col_blocks = (cols + 31) / 32;
  // Enough chunks to give ~4 blocks per SM in total, each chunk at least 64 rows.
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, (76 * 4) / std::max<int64_t>(1, col_blocks * groups) + 1));
  const int64_t per = (rows + chunks - 1) / chunks;
  chunks = (rows + per - 1) / per;
  dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks), static_cast<unsigned>(groups));
  column_sums_kernel<F><<<grid, dim3(32, 8), 0, c10::cuda::getCurrentCUDAStream()>>>(f, rows, cols, per, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Threads per block for a row kernel over rows of d elements: a multiple of 32 giving each thread ~4 elements.
inline int row_threads(int64_t d) {
  int t = 32;
  while (t < 1024 && t * 4 < d) t *= 2;
  return t;
}

}  // namespace fastdiff::cuda
