// Helpers shared by the kernels: dtype conversion, packed (vectorised) accesses, reductions, device guard.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace ssl {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(uint8_t x) { return static_cast<float>(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N values of T moved by one load or store of N * sizeof(T) bytes (16 bytes: one LDG.128 / STG.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// A mask entry (bool/uint8 or a float dtype) as a float weight.
__device__ __forceinline__ float load_weight(const void* mask, int code, int64_t offset) {
  switch (code) {
    case SSL_F32: return static_cast<const float*>(mask)[offset];
    case SSL_F16: return __half2float(static_cast<const __half*>(mask)[offset]);
    case SSL_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[offset]);
    default: return static_cast<float>(static_cast<const uint8_t*>(mask)[offset]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum of `v` over the block, in a fixed order (deterministic). Every thread must call it; the result is
// valid in thread 0. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Runs the launcher on `device` and restores the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      restore_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool restore_ = false;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace ssl

// `using T = <float type of code>` in the body, for the three float dtypes.
#define SSL_DISPATCH_FLOAT(code, T, ...)                      \
  switch (code) {                                             \
    case SSL_F32: { using T = float; __VA_ARGS__; } break;    \
    case SSL_F16: { using T = __half; __VA_ARGS__; } break;   \
    case SSL_BF16: { using T = __nv_bfloat16; __VA_ARGS__; } break; \
    default: return static_cast<int>(cudaErrorInvalidValue);  \
  }

#define SSL_GUARD(device)                                                     \
  ssl::DeviceGuard ssl_guard_(device);                                        \
  if (ssl_guard_.status() != cudaSuccess) return static_cast<int>(ssl_guard_.status())

#define SSL_STREAM(stream) reinterpret_cast<cudaStream_t>(stream)
