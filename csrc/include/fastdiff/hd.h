// Portability macro for the per-element math headers shared by the CPU and CUDA kernels.
// FD_HD marks a function callable from host C++ and from CUDA device code. On the host it has internal
// linkage (static) and is always inlined: the same header is compiled under several `#pragma GCC target`s
// (csrc/cpu/isa/), and a shared weak symbol would let the linker hand AVX-512 code to a scalar caller.
#pragma once
#if defined(__CUDACC__)
#define FD_HD static __host__ __device__ __forceinline__
#else
#define FD_HD static inline __attribute__((always_inline))
#endif
