// Device helpers of the Hopper (sm_90a) wgmma path, shared by kernels/w4ax_wgmma.cu and the
// loop-structure probe (scripts/wgmma_probe.py), so that the probe measures the kernel's own
// instructions. Only code that is reached from sm_90a kernels emits the wgmma instructions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "w4ax_common.cuh"

namespace comet {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared-memory loads by address.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ float2 lds64f(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes, 128-byte swizzled
// (the TMA's CU_TENSOR_MAP_SWIZZLE_128B): 8-row core groups 1024 bytes apart. Adding 2 moves the
// start 32 bytes along k, one k32 step of int8.
__device__ __forceinline__ uint64_t desc_k_major_sw128(uint32_t tile) {
  uint64_t d = (tile & 0x3FFFF) >> 4;
  d |= uint64_t{1} << 16;            // leading byte offset: unused for swizzled K-major tiles
  d |= uint64_t{1024 >> 4} << 32;    // stride byte offset
  d |= uint64_t{1} << 62;            // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Orders the compiler's accesses to an accumulator after the preceding wgmma wait.
__device__ __forceinline__ void fence_operand(int& r) { asm volatile("" : "+r"(r)::"memory"); }

// The four k32 A fragments (m16n8k32 layout) of a warp's 16 weight rows in one group, from the
// 16 packed bytes of row r (w0) and of row r + 8 (w1): int8 values code * 16. Built all before
// the first wgmma: register writes between wgmma instructions make the compiler serialize them.
__device__ __forceinline__ void weight_fragments(const uint4& w0, const uint4& w1, uint32_t (&a)[4][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t x = detail::word(w0, k), y = detail::word(w1, k);
    a[k][0] = detail::lo_nibbles(x);
    a[k][1] = detail::lo_nibbles(y);
    a[k][2] = detail::hi_nibbles(x);
    a[k][3] = detail::hi_nibbles(y);
  }
}

// The same fragments for a group whose scales are integer multiples of the row's
// (int_group_scales): int8 values code * m, m in [1, 16] the row's multiplier in this group, so
// that whole rows of groups add up in the int32 accumulator. Per byte (code + 8) * m + 128 - 8m
// lies in [0, 240], so one 32-bit multiply-add makes four bytes without carries, and the top-bit
// flip takes it back to code * m. m0 / m1: the multipliers of rows r / r + 8.
__device__ __forceinline__ uint32_t times_mult(uint32_t biased, uint32_t m, uint32_t c) {
  return (biased * m + c) ^ 0x80808080u;
}
__device__ __forceinline__ void weight_fragments_int(const uint4& w0, const uint4& w1, uint32_t m0, uint32_t m1,
                                                     uint32_t (&a)[4][4]) {
  const uint32_t c0 = (128u - 8u * m0) * 0x01010101u, c1 = (128u - 8u * m1) * 0x01010101u;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t x = detail::word(w0, k) ^ 0x88888888u, y = detail::word(w1, k) ^ 0x88888888u;
    a[k][0] = times_mult(x & 0x0F0F0F0Fu, m0, c0);
    a[k][1] = times_mult(y & 0x0F0F0F0Fu, m1, c1);
    a[k][2] = times_mult((x >> 4) & 0x0F0F0F0Fu, m0, c0);
    a[k][3] = times_mult((y >> 4) & 0x0F0F0F0Fu, m1, c1);
  }
}

}  // namespace sm90
}  // namespace comet
