// Device helpers shared by the W4Ax GEMM kernels (w4ax_kernels.cu: mma.sync paths,
// w4ax_wgmma.cu: the Hopper wgmma path).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "w4ax.h"

namespace comet {
namespace detail {

// 8 packed int4 codes (32 bits, even k in the low nibble of each byte) -> two registers of 4
// int8 holding code * 16: the even-k codes (lo_nibbles) and the odd-k codes (hi_nibbles).
// Placing the nibble in the high half of the byte makes sign extension free; the 16x goes into
// the float rescale, which is exact (a power of two).
__device__ __forceinline__ uint32_t lo_nibbles(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t hi_nibbles(uint32_t w) { return w & 0xF0F0F0F0u; }

// int32 -> float for |v| < 2^22 with two full-rate ops (integer add, float subtract) instead
// of the quarter-rate I2F: 0x4B400000 is the float 1.5 * 2^23, whose ulp is 1. A group's
// accumulator is at most 128 * 127 * 128 (int8 x int4*16) or 128 * 128 * 128 (int4*16 x int4*16)
// in magnitude, below 2^22, so the conversion is exact.
__device__ __forceinline__ float exact_float(int v) {
  return __int_as_float(v + 0x4B400000) - 12582912.f;
}

// An attribute of the current device (host side; the runtime answers from its cache). The
// launches ask for the SM count (grids sized in waves) and the compute capability.
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int* value) {
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  return e == cudaSuccess ? cudaDeviceGetAttribute(value, attr, dev) : e;
}

// Programmatic dependent launch (sm_90): the decode GEMMs and the wgmma GEMM are launched so
// that they may start while the previous kernel in the stream (the activation quantization)
// still runs. They fetch the weights, which no kernel writes, before grid_dependency_wait(), and
// everything the previous kernel produces after it, and they write nothing before it; the
// activation quantization lets them start right away (allow_dependent_launch). Elsewhere both
// are no-ops.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void store_out(void* out, DType dt, size_t i, float v) {
  if (dt == DType::kHalf) static_cast<__half*>(out)[i] = __float2half_rn(v);
  else if (dt == DType::kBFloat16) static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(out)[i] = v;
}

// out[i] and out[i + 1] (i even, out 8-byte aligned) in one store.
__device__ __forceinline__ void store_out2(__half* out, size_t i, float lo, float hi) {
  *reinterpret_cast<__half2*>(out + i) = __floats2half2_rn(lo, hi);
}
__device__ __forceinline__ void store_out2(__nv_bfloat16* out, size_t i, float lo, float hi) {
  *reinterpret_cast<__nv_bfloat162*>(out + i) = __floats2bfloat162_rn(lo, hi);
}
__device__ __forceinline__ void store_out2(float* out, size_t i, float lo, float hi) {
  *reinterpret_cast<float2*>(out + i) = make_float2(lo, hi);
}

}  // namespace detail
}  // namespace comet
