// W4Ax kernels: fused activation quantization and the mixed int8/int4 x int4 GEMM.
// Numerics are defined by comet_quant/primitives.py; comments say why, not what.
#include "w4ax.h"
#include "w4ax_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace comet {
namespace {

using detail::current_device_attribute;
using detail::allow_dependent_launch;
using detail::exact_float;
using detail::grid_dependency_wait;
using detail::hi_nibbles;
using detail::lo_nibbles;
using detail::store_out;
using detail::word;

constexpr float kMinScale = 1e-8f;       // primitives.MIN_SCALE: all-zero groups stay finite
constexpr int kPackedGroupBytes = kGroup / 2;
// Smem row strides padded so the rows one fragment load touches hit distinct banks: int8 rows
// are read 8 bytes per thread (4 rows per half-warp phase: stride = 32 mod 128 bytes), packed
// rows 4 bytes per thread (8 rows per warp: stride = 16 mod 128 bytes).
constexpr int kStrideA8 = kGroup + 32;
constexpr int kStrideP = kPackedGroupBytes + 16;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // zero-fill rows past M or N
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

constexpr int kActThreads = 256;  // 16 half-warps: one group per half-warp at a time
constexpr int kHalfLanes = 16;    // lanes per group: lane l of a half holds channels 8l .. 8l + 7
constexpr int kActGroupsPerBlock = kActThreads / kHalfLanes;
constexpr int kGatherMaxM = 64;   // below this many tokens, activation quantization gathers from L2
#ifndef COMET_ACT_LOADS
#define COMET_ACT_LOADS 4
#endif
constexpr int kActLoads = COMET_ACT_LOADS;
// Rows over 32 KB (K = 28672: 4 blocks per SM by shared memory) get 512 threads: twice the
// groups in flight per row. H100, M = 4096, same run, wide / packed TB/s: 256 threads 1.91 /
// 1.78, 384 2.10 / 1.95, 512 2.12 / 1.96; K = 14336 (28 KB rows) unchanged by it.
#ifndef COMET_ACT_LONG_ROW_THREADS  // experiment switch
#define COMET_ACT_LONG_ROW_THREADS 512
#endif
constexpr int kActLongRowThreads = COMET_ACT_LONG_ROW_THREADS;
constexpr size_t kActLongRowBytes = 32 * 1024;  // "long" rows: more threads, the max-shared L1 split

__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = kHalfLanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// In-place fast Walsh-Hadamard transform of a 128-channel group held 8 per lane (channel
// 8 * l + i in v[i], l = lane within the half-warp), scaled to be orthonormal: the group rotation
// of the QuaRot-like schemes, whose weights were rotated by the same matrix at export. Strides
// 1, 2 and 4 stay in a lane; strides 8..64 pair lane l with lane l ^ (stride / 8).
__device__ __forceinline__ void hadamard128(float (&v)[8], int l) {
#pragma unroll
  for (int h = 1; h < 8; h <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i & h) continue;
      const float a = v[i], b = v[i + h];
      v[i] = a + b;
      v[i + h] = a - b;
    }
  }
#pragma unroll
  for (int m = 1; m < kHalfLanes; m <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, v[i], m);
      v[i] = (l & m) ? o - v[i] : v[i] + o;
    }
  }
  constexpr float kNorm = 0.08838834764831845f;  // 1 / sqrt(128)
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] *= kNorm;
}

// round(v) (ties to even, as torch.round) left in the low bits of a float: adding 1.5 * 2^23,
// whose ulp is 1, rounds v to an integer in the mantissa, two's complement in the low byte for
// |v| < 2^22. One add instead of a round and a quarter-rate float -> int conversion.
__device__ __forceinline__ uint32_t round_bits(float v) { return __float_as_uint(__fadd_rn(v, 12582912.f)); }

// The low bytes of four words, a in byte 0.
__device__ __forceinline__ uint32_t low_bytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// Eight int8 codes (bytes of lo = codes 0..3, hi = codes 4..7) as eight nibbles, code 2j in the
// low nibble of byte j.
__device__ __forceinline__ uint32_t nibbles(uint32_t lo, uint32_t hi) {
  const uint32_t a = (lo & 0x0F0F0F0Fu) | ((lo >> 4) & 0xF0F0F0F0u);  // byte j: code j | code j+1 << 4
  const uint32_t b = (hi & 0x0F0F0F0Fu) | ((hi >> 4) & 0xF0F0F0F0u);
  return __byte_perm(a, b, 0x6420);
}

// Where quantized activations go. Packed (the GEMM input of the mma.sync kernels): q8
// [M, K8] int8, q4 [M, K4 / 2] packed int4, scales [M, G]. Wide (the Hopper wgmma GEMM's
// input): every group as int8 in q8 [M, Kpad], its 128 channels in the wgmma k order
// (w4ax.h, wide_position), and scales transposed, [G, Mpad].
// With int_scales (the scheme's int_group_scales) a 4-bit group's scale is its span's scale
// times an integer m in [1, 16] (primitives.int_token_scales; a span is 16 groups of the row),
// the wide layout stores code * m, and the span scales follow the group scales: rows G ..
// G + spans - 1 of the transposed scales. With a8_spans (the scheme's a8_span_scales) the 8-bit
// groups of each span share one scale, stored as each one's (primitives.shared_span_scales).
struct ActOut {
  int8_t* q8;
  uint8_t* q4;
  float* scales;
  int G, K8, K4;
  int Kpad, Mpad;
  bool int_scales = false;
  bool a8_spans = false;
};
constexpr int kMaxHalves = 32;   // half-warps of the largest block (512 threads)

// A positive float rounded up to 20 significant bits (primitives.round_up_significant).
__device__ __forceinline__ float round_up_20(float v) {
  return __uint_as_float((__float_as_uint(v) + 15u) & ~15u);
}

// Quantizes one permuted group held by a half-warp, 8 channels per lane (channel 8 * l + i of
// group g in v[i]) into the row's codes and scale. Codes are round(x * (1 / s)) with an IEEE
// reciprocal per group, exactly as primitives.quantize_symmetric computes them: one division
// per group instead of per element. The reference's clamp to [-qmax, qmax] is implied: |x| <=
// amax, and s = amax / qmax and 1 / s are each correctly rounded, so |x * (1 / s)| <= qmax *
// (1 + 2^-24)^3 < qmax + 1/2 (s = kMinScale only lowers it). `store` = false (a half-warp past
// the last group) still takes part in the shuffles.
// int_scales or a8_spans: every thread of the block calls this at once (one group per half-warp,
// groups g of a round aligned to spans: the round starts at a multiple of 16 groups), since the
// span's groups exchange their absmax through shared memory.
template <bool WIDE>
__device__ __forceinline__ void quantize_group(float (&v)[8], size_t row, int g, int l, int groups8, bool rotate,
                                               bool store, const ActOut& o) {
  if (rotate) hadamard128(v, l);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = half_warp_max(amax);
  const bool high = g < groups8;
  float s, mult = 1.f;  // int_scales: the 4-bit group's multiplier (the wide layout stores code * mult)
  if (o.int_scales || o.a8_spans) {
    // The span's largest absmax among its 8-bit groups and among its 4-bit groups (the 8-bit
    // groups are the row's first groups8; spans start at multiples of 16 groups, as the rounds do).
    __shared__ float span_amax[kMaxHalves];
    const int half = threadIdx.x / kHalfLanes, first = half & ~(kSpanGroups - 1);
    if (l == 0) span_amax[half] = store ? amax : 0.f;
    __syncthreads();
    float smax4 = 0.f, smax8 = 0.f;
#pragma unroll
    for (int i = 0; i < kSpanGroups; ++i) {
      const float a = span_amax[first + i];
      if (g - half + first + i < groups8) smax8 = fmaxf(smax8, a);
      else smax4 = fmaxf(smax4, a);
    }
    __syncthreads();  // read before the next round writes
    if (!store) return;
    // Each group computes only the scale it keeps: 8-bit groups their own (or, with a8_spans,
    // the span's), 4-bit groups amax / 7 or, with int_scales, span * mult.
    if (high) s = fmaxf(__fdiv_rn(o.a8_spans ? smax8 : amax, 127.f), kMinScale);
    else if (!o.int_scales) s = fmaxf(__fdiv_rn(amax, 7.f), kMinScale);
    if (o.int_scales) {
      // The span scale of the 4-bit groups; its row G + span is written by the span's first
      // group, whichever its precision (a span without 4-bit groups: the all-zero value).
      const float span = round_up_20(fmaxf(__fdiv_rn(smax4, 7.f * 16.f), kMinScale));
      if (WIDE && l == 0 && g % kSpanGroups == 0)
        o.scales[static_cast<size_t>(o.G + g / kSpanGroups) * o.Mpad + row] = span;
      if (!high) {
        mult = fminf(fmaxf(ceilf(__fdiv_rn(amax, span * 7.f)), 1.f), 16.f);
        s = span * mult;
      }
    }
  } else {
    if (!store) return;
    s = fmaxf(__fdiv_rn(amax, high ? 127.f : 7.f), kMinScale);
  }
  const float inv = __fdiv_rn(1.f, s);
  uint32_t c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) c[i] = round_bits(__fmul_rn(v[i], inv));
  if (WIDE) {
    if (l == 0) o.scales[static_cast<size_t>(g) * o.Mpad + row] = s;
    if (o.int_scales && !high) {  // code * mult: |code| <= 7, mult <= 16
      const int m = static_cast<int>(mult);
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = static_cast<uint32_t>(static_cast<int>(c[i] - 0x4B400000u) * m);
    }
    // Channels 8l + i land at wide_position(8l) + i / 2, odd i sixteen bytes further.
    uint32_t* dst = reinterpret_cast<uint32_t*>(o.q8 + row * o.Kpad + g * kGroup + wide_position(8 * l));
    dst[0] = low_bytes(c[0], c[2], c[4], c[6]);
    dst[4] = low_bytes(c[1], c[3], c[5], c[7]);
    return;
  }
  if (l == 0) o.scales[row * o.G + g] = s;
  const int c0 = g * kGroup + 8 * l;
  const uint32_t lo = low_bytes(c[0], c[1], c[2], c[3]), hi = low_bytes(c[4], c[5], c[6], c[7]);
  if (high)
    *reinterpret_cast<uint2*>(o.q8 + row * o.K8 + c0) = make_uint2(lo, hi);
  else
    *reinterpret_cast<uint32_t*>(o.q4 + row * (o.K4 / 2) + (c0 - o.K8) / 2) = nibbles(lo, hi);
}

// The permuted channels perm[g * 128 + 8l .. 8l + 7] of group g, lane l of its half-warp.
__device__ __forceinline__ void permuted_indices(const int32_t* __restrict__ perm, int g, int l, uint32_t (&idx)[8]) {
  const int4* p = reinterpret_cast<const int4*>(perm + g * kGroup + 8 * l);
  const int4 a = __ldg(p), b = __ldg(p + 1);
  const int q[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) idx[i] = static_cast<uint32_t>(q[i]);
}

// Two layouts of the same computation, one half-warp per group at a time.
//
// Rows (large M): one block per token. The row is first copied into shared memory with
// coalesced 16-byte loads (DRAM reads x exactly once); the permutation then gathers from shared
// memory without branches: every channel index is clamped to `last`. With padding channels
// (K < Kpad, perm[j] >= K reads 0) the buffer ends in one zero at [K] and last = K; without, a
// valid perm stays below K, last = K - 1 only keeps a malformed one inside the buffer, and the
// buffer is exactly the row: at K = 28672 (56 KB) that is what lets 4 blocks share an SM's
// 228 KB instead of 3. (Measured on H100: a persistent grid that double-buffers rows with
// cp.async was slower, 1.05-1.5 vs 1.3-1.8 TB/s at M = 4096, as its shared memory halves the
// resident rows.)
__host__ __device__ constexpr bool act_padded(int K, int G) { return K < G * kGroup; }

template <typename T>
constexpr size_t act_row_smem(int K, int G) {
  return sizeof(T) * (act_padded(K, G) ? (static_cast<size_t>(K) + 8) & ~size_t{7} : static_cast<size_t>(K));
}

__device__ __forceinline__ void zero_pad_slot(void* cur, int K, int G) {
  if (threadIdx.x == 0 && act_padded(K, G)) static_cast<uint16_t*>(cur)[K] = 0;  // +0 in fp16 and bf16
}

template <bool WIDE, typename T>
__device__ __forceinline__ void quantize_row(const T* cur, const int32_t* __restrict__ perm, size_t row, int K,
                                             int groups8, bool rotate, const ActOut& o) {
  const int half = threadIdx.x / kHalfLanes, l = threadIdx.x % kHalfLanes;
  const uint32_t last = act_padded(K, o.G) ? K : K - 1;
  const int per_round = blockDim.x / kHalfLanes;
  for (int g0 = 0; g0 < o.G; g0 += per_round) {
    const int g = min(g0 + half, o.G - 1);
    uint32_t idx[8];
    permuted_indices(perm, g, l, idx);
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(cur[min(idx[i], last)]);
    quantize_group<WIDE>(v, row, g, l, groups8, rotate, g0 + half < o.G, o);
  }
}

template <bool WIDE, typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
quantize_act_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm, int K, int groups8,
                         bool rotate, ActOut o) {
  extern __shared__ __align__(16) uint8_t act_smem[];
  allow_dependent_launch();
  T* cur = reinterpret_cast<T*>(act_smem);  // [K (+ 1)]
  const size_t row = blockIdx.x;
  const T* src = x + row * K;
  if (K % 8 == 0) {
    // kActLoads 16-byte loads in flight per thread before the first store.
    const uint4* s16 = reinterpret_cast<const uint4*>(src);
    uint4* d16 = reinterpret_cast<uint4*>(cur);
    const int n16 = K / 8;
    for (int base = threadIdx.x; base < n16; base += THREADS * kActLoads) {
      uint4 v[kActLoads];
#pragma unroll
      for (int u = 0; u < kActLoads; ++u)
        if (base + u * THREADS < n16) v[u] = __ldg(s16 + base + u * THREADS);
#pragma unroll
      for (int u = 0; u < kActLoads; ++u)
        if (base + u * THREADS < n16) d16[base + u * THREADS] = v[u];
    }
  } else {
    for (int i = threadIdx.x; i < K; i += THREADS) cur[i] = src[i];
  }
  zero_pad_slot(cur, K, o.G);
  __syncthreads();
  quantize_row<WIDE>(cur, perm, row, K, groups8, rotate, o);
}

// Streaming rows (large M, K % 8 == 0, K <= 4096): a grid of as many blocks as fit on the GPU
// walks the rows, and each block loads its next row into registers (kStreamLoads 16-byte loads
// per thread) before quantizing the current one from shared memory, so the DRAM reads of one row
// overlap the arithmetic of the previous one inside every block. Measured on H100 at M = 4096
// (same run, wide / packed layout): K = 4096 1.85 -> 2.19 / 1.88 -> 2.02 TB/s over the
// one-row-per-block kernel. For longer rows the held loads cost more than they hide: 8, 16 and
// 32 loads per thread (K = 8192, 14336, 28672) measured 4-10% slower (fewer blocks per SM for
// the registers), so those rows keep the kernel above.
constexpr int kStreamLoads = 2;
template <bool WIDE, typename T>
__global__ void __launch_bounds__(kActThreads)
quantize_act_stream_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm, int M, int K, int groups8,
                           bool rotate, ActOut o) {
  extern __shared__ __align__(16) uint8_t act_smem[];
  allow_dependent_launch();
  T* cur = reinterpret_cast<T*>(act_smem);  // [K (+ 1)]
  uint4* d16 = reinterpret_cast<uint4*>(cur);
  const int n16 = K / 8;
  uint4 next[kStreamLoads];
  auto load = [&](size_t row) {
    const uint4* s16 = reinterpret_cast<const uint4*>(x + row * K);
#pragma unroll
    for (int u = 0; u < kStreamLoads; ++u)
      if (threadIdx.x + u * kActThreads < n16) next[u] = __ldg(s16 + threadIdx.x + u * kActThreads);
  };
  zero_pad_slot(cur, K, o.G);
  size_t row = blockIdx.x;
  if (row < static_cast<size_t>(M)) load(row);
  for (; row < static_cast<size_t>(M); row += gridDim.x) {
    __syncthreads();  // the previous row's groups are done with shared memory
#pragma unroll
    for (int u = 0; u < kStreamLoads; ++u)
      if (threadIdx.x + u * kActThreads < n16) d16[threadIdx.x + u * kActThreads] = next[u];
    __syncthreads();
    if (row + gridDim.x < static_cast<size_t>(M)) load(row + gridDim.x);
    quantize_row<WIDE>(cur, perm, row, K, groups8, rotate, o);
  }
}

// Gather (small M, decode): blocks of 16 groups x one token read the permuted channels straight
// from global memory (the row was just written and sits in L2): M x G / 16 blocks instead of M,
// so a batch of a few tokens still spreads over the GPU.
template <bool WIDE, typename T>
__global__ void __launch_bounds__(kActThreads)
quantize_act_gather_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm, int K, int groups8,
                           bool rotate, ActOut o) {
  allow_dependent_launch();
  const size_t row = blockIdx.y;  // M < kGatherMaxM: within gridDim.y's limit
  const int half = threadIdx.x / kHalfLanes, l = threadIdx.x % kHalfLanes;
  const int g_want = blockIdx.x * kActGroupsPerBlock + half, g = min(g_want, o.G - 1);
  const T* src = x + row * K;
  uint32_t idx[8];
  permuted_indices(perm, g, l, idx);
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = idx[i] < static_cast<uint32_t>(K) ? to_float(src[idx[i]]) : 0.f;
  quantize_group<WIDE>(v, row, g, l, groups8, rotate, g_want < o.G, o);
}

template <bool WIDE, typename T, int THREADS>
cudaError_t launch_rows(const T* x, const int32_t* perm, int M, int K, int groups8, bool rotate, const ActOut& o,
                        size_t smem, cudaStream_t stream) {
  const auto kernel = quantize_act_rows_kernel<WIDE, T, THREADS>;
  cudaError_t e = allow_dynamic_smem(kernel, smem);
  // Rows over 32 KB: all of the unified L1 as shared memory, so that 4 blocks of 56 KB fit at
  // K = 28672 (their 112 KB perm does not fit L1 anyway). Shorter rows keep the default split:
  // there the perm stays in L1, and the max-shared split measured 5-9% slower (K = 8192 / 14336;
  // K = 28672: 1.77 -> 1.90 TB/s wide, 1.58 -> 1.77 packed, H100, same run).
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             smem > kActLongRowBytes ? cudaSharedmemCarveoutMaxShared : cudaSharedmemCarveoutDefault);
  if (e != cudaSuccess) return e;
  kernel<<<M, THREADS, smem, stream>>>(x, perm, K, groups8, rotate, o);
  return cudaGetLastError();
}

// Streaming kernel launch: as many blocks as are resident at once (at most one per row).
template <bool WIDE, typename T>
cudaError_t launch_stream(const T* x, const int32_t* perm, int M, int K, int groups8, bool rotate, const ActOut& o,
                          size_t smem, cudaStream_t stream) {
  const auto kernel = quantize_act_stream_kernel<WIDE, T>;
  cudaError_t e = allow_dynamic_smem(kernel, smem);
  int sms = 0, per_sm = 0;
  if (e == cudaSuccess) e = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kActThreads, smem);
  if (e != cudaSuccess) return e;
  const int grid = std::max(1, std::min(M, sms * per_sm));
  kernel<<<grid, kActThreads, smem, stream>>>(x, perm, M, K, groups8, rotate, o);
  return cudaGetLastError();
}

template <bool WIDE, typename T>
cudaError_t launch_quantize_act(const T* x, const int32_t* perm, int M, int K, int groups8, bool rotate,
                                const ActOut& o, cudaStream_t stream) {
  if (M < kGatherMaxM) {
    const dim3 grid((o.G + kActGroupsPerBlock - 1) / kActGroupsPerBlock, M);
    quantize_act_gather_kernel<WIDE, T><<<grid, kActThreads, 0, stream>>>(x, perm, K, groups8, rotate, o);
    return cudaGetLastError();
  }
  const size_t smem = act_row_smem<T>(K, o.G);
  if (K % 8 == 0 && K <= 8 * kActThreads * kStreamLoads)
    return launch_stream<WIDE, T>(x, perm, M, K, groups8, rotate, o, smem, stream);
  return smem > kActLongRowBytes
             ? launch_rows<WIDE, T, kActLongRowThreads>(x, perm, M, K, groups8, rotate, o, smem, stream)
             : launch_rows<WIDE, T, kActThreads>(x, perm, M, K, groups8, rotate, o, smem, stream);
}

template <bool WIDE>
cudaError_t dispatch_quantize_act(const void* x, DType x_dtype, const int32_t* perm, int M, int K, int groups8,
                                  bool rotate, const ActOut& o, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (x_dtype == DType::kHalf)
    return launch_quantize_act<WIDE>(static_cast<const __half*>(x), perm, M, K, groups8, rotate, o, stream);
  if (x_dtype == DType::kBFloat16)
    return launch_quantize_act<WIDE>(static_cast<const __nv_bfloat16*>(x), perm, M, K, groups8, rotate, o, stream);
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_s4(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int BM, int BN>
struct Stage {
  // A holds either an int8 group (BM x 128) or a packed int4 group (BM x 64): raw global bytes,
  // so the copy engine fills it asynchronously; expansion happens at fragment load time.
  alignas(16) uint8_t a[BM * kStrideA8];
  alignas(16) uint8_t b[BN * kStrideP];
  // This group's activation scales (rows of the tile) and weight scales (columns of the tile),
  // loaded one group ahead so the rescale reads shared memory, not scattered global memory.
  float sa[BM];
  float sw[BN];
};

template <int BM, int BN, int THREADS>
__device__ __forceinline__ void load_group(Stage<BM, BN>& st, int g, int groups8, int m0, int n0,
                                           int M, int N, int Kpad, const int8_t* q8,
                                           const uint8_t* q4, const uint8_t* qw) {
  const int K8 = groups8 * kGroup, K4 = Kpad - K8;
  if (g < groups8) {
    for (int i = threadIdx.x; i < BM * (kGroup / 16); i += THREADS) {
      const int r = i / (kGroup / 16), c = (i % (kGroup / 16)) * 16;
      const int m = min(m0 + r, M - 1);
      cp_async16(st.a + r * kStrideA8 + c, q8 + static_cast<size_t>(m) * K8 + g * kGroup + c, m0 + r < M);
    }
  } else {
    for (int i = threadIdx.x; i < BM * (kPackedGroupBytes / 16); i += THREADS) {
      const int r = i / (kPackedGroupBytes / 16), c = (i % (kPackedGroupBytes / 16)) * 16;
      const int m = min(m0 + r, M - 1);
      cp_async16(st.a + r * kStrideP + c,
                 q4 + static_cast<size_t>(m) * (K4 / 2) + (g - groups8) * kPackedGroupBytes + c,
                 m0 + r < M);
    }
  }
  for (int i = threadIdx.x; i < BN * (kPackedGroupBytes / 16); i += THREADS) {
    const int r = i / (kPackedGroupBytes / 16), c = (i % (kPackedGroupBytes / 16)) * 16;
    const int n = min(n0 + r, N - 1);
    cp_async16(st.b + r * kStrideP + c, qw + static_cast<size_t>(n) * (Kpad / 2) + g * kPackedGroupBytes + c,
               n0 + r < N);
  }
}

// Block tile BM x BN, WARPS_M x WARPS_N warps; each warp owns MT x NT mma tiles.
// Per K group: int32 accumulation on tensor cores, then one float rescale per tile element by
// ascale[m, g] * wscale[n, g] (the per-group rescale the format's scales require). A ring of
// STAGES groups in dynamic shared memory: groups g + 1 .. g + STAGES - 1 are being copied in
// (cp.async) while group g computes.
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool INT4MMA>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
w4ax_gemm_kernel(const int8_t* __restrict__ q8, const uint8_t* __restrict__ q4,
                 const float* __restrict__ ascale, const uint8_t* __restrict__ qw,
                 const __half* __restrict__ wscale, void* __restrict__ out, DType out_dtype,
                 float* __restrict__ workspace, int M, int N, int Kpad, int groups8, int split_k) {
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(MT >= 1 && NT >= 1, "tile too small for the warp layout");
  extern __shared__ __align__(16) uint8_t gemm_smem[];
  Stage<BM, BN>* stages = reinterpret_cast<Stage<BM, BN>*>(gemm_smem);

  const int G = Kpad / kGroup;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int per = (G + split_k - 1) / split_k;
  const int g_begin = blockIdx.z * per, g_end = min(G, g_begin + per);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
  const int gid = lane >> 2, tig = lane & 3;

  static_assert(BN <= THREADS && BM <= THREADS, "one scale per thread per group");
  const int t = threadIdx.x;
  const bool t_n = t < BN && n0 + t < N, t_m = t < BM && m0 + t < M;
  float acc[MT][NT][4] = {};
  // Prologue: groups g_begin .. g_begin + STAGES - 2 in flight, one cp.async group each (empty
  // groups past the end keep the wait count below uniform).
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (g_begin + i < g_end)
      load_group<BM, BN, THREADS>(stages[i], g_begin + i, groups8, m0, n0, M, N, Kpad, q8, q4, qw);
    cp_async_commit();
  }
  if (g_begin < g_end) {
    if (t < BN) stages[0].sw[t] = t_n ? __half2float(wscale[static_cast<size_t>(n0 + t) * G + g_begin]) : 0.f;
    if (t < BM) stages[0].sa[t] = t_m ? ascale[static_cast<size_t>(m0 + t) * G + g_begin] : 0.f;
  }
  for (int g = g_begin; g < g_end; ++g) {
    const int s = (g - g_begin) % STAGES;
    cp_async_wait<STAGES - 2>();  // group g has landed; later ones may still be in flight
    __syncthreads();
    // Refill the slot computed on in the previous iteration (ordered by the barrier above) with
    // group g + STAGES - 1; scales go one group ahead through registers.
    const int ahead = g + STAGES - 1;
    if (ahead < g_end)
      load_group<BM, BN, THREADS>(stages[(ahead - g_begin) % STAGES], ahead, groups8, m0, n0, M, N, Kpad, q8, q4,
                                  qw);
    cp_async_commit();
    float next_sw = 0.f, next_sa = 0.f;
    if (g + 1 < g_end) {
      if (t_n) next_sw = __half2float(wscale[static_cast<size_t>(n0 + t) * G + g + 1]);
      if (t_m) next_sa = ascale[static_cast<size_t>(m0 + t) * G + g + 1];
    }
    const Stage<BM, BN>& st = stages[s];
    const bool a8 = g < groups8;
    int iacc[MT][NT][4] = {};
    if (INT4MMA && !a8) {
#pragma unroll
      for (int kk = 0; kk < kPackedGroupBytes; kk += 32) {  // k64 steps on packed bytes
        uint32_t bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint8_t* p = st.b + (wn + nt * 8 + gid) * kStrideP + kk + tig * 4;
          bf[nt][0] = *reinterpret_cast<const uint32_t*>(p);
          bf[nt][1] = *reinterpret_cast<const uint32_t*>(p + 16);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint8_t* p = st.a + (wm + mt * 16 + gid) * kStrideP + kk + tig * 4;
          const uint32_t af[4] = {*reinterpret_cast<const uint32_t*>(p),
                                  *reinterpret_cast<const uint32_t*>(p + 8 * kStrideP),
                                  *reinterpret_cast<const uint32_t*>(p + 16),
                                  *reinterpret_cast<const uint32_t*>(p + 8 * kStrideP + 16)};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_s4(iacc[mt][nt], af, bf[nt]);
        }
      }
    } else {
      // Within a k32 step thread tig owns the 8 consecutive k at 8 * tig (both operands agree,
      // so the dot product is unchanged; see the decode kernel): one 32-bit load of 8 packed
      // weight codes gives both B registers (low nibbles: even k, high nibbles: odd k), and
      // int8 activations are split into even/odd k bytes with two byte permutes.
#pragma unroll
      for (int kk = 0; kk < kGroup; kk += 32) {  // k32 steps in int8 elements
        uint32_t bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(st.b + (wn + nt * 8 + gid) * kStrideP + kk / 2 + tig * 4);
          bf[nt][0] = lo_nibbles(w);
          bf[nt][1] = hi_nibbles(w);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t af[4];
          const int r = wm + mt * 16 + gid;
          if (a8) {
            const uint2 x = *reinterpret_cast<const uint2*>(st.a + r * kStrideA8 + kk + tig * 8);
            const uint2 y = *reinterpret_cast<const uint2*>(st.a + (r + 8) * kStrideA8 + kk + tig * 8);
            af[0] = __byte_perm(x.x, x.y, 0x6420);
            af[1] = __byte_perm(y.x, y.y, 0x6420);
            af[2] = __byte_perm(x.x, x.y, 0x7531);
            af[3] = __byte_perm(y.x, y.y, 0x7531);
          } else {
            const uint32_t x = *reinterpret_cast<const uint32_t*>(st.a + r * kStrideP + kk / 2 + tig * 4);
            const uint32_t y = *reinterpret_cast<const uint32_t*>(st.a + (r + 8) * kStrideP + kk / 2 + tig * 4);
            af[0] = lo_nibbles(x);
            af[1] = lo_nibbles(y);
            af[2] = hi_nibbles(x);
            af[3] = hi_nibbles(y);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_s8(iacc[mt][nt], af, bf[nt]);
        }
      }
    }
    // Undo the x16 of each expanded int4 operand (weights always; A only on the int8 path).
    const float unscale = (INT4MMA && !a8) ? 1.f : (a8 ? 1.f / 16.f : 1.f / 256.f);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sa = st.sa[wm + mt * 16 + gid + h * 8] * unscale;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float sw = st.sw[wn + nt * 8 + tig * 2 + j];
            acc[mt][nt][h * 2 + j] = fmaf(exact_float(iacc[mt][nt][h * 2 + j]), sa * sw, acc[mt][nt][h * 2 + j]);
          }
        }
      }
    }
    // The next slot's scales were last read before this iteration's barrier; the next barrier
    // orders these writes before the next group's rescale.
    if (g + 1 < g_end) {
      const int sn = (s + 1) % STAGES;
      if (t < BN) stages[sn].sw[t] = next_sw;
      if (t < BM) stages[sn].sa[t] = next_sa;
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm + mt * 16 + gid + (e >> 1) * 8;
        const int n = n0 + wn + nt * 8 + tig * 2 + (e & 1);
        if (m >= M || n >= N) continue;
        const size_t i = static_cast<size_t>(m) * N + n;
        if (split_k > 1) atomicAdd(workspace + i, acc[mt][nt][e]);
        else store_out(out, out_dtype, i, acc[mt][nt][e]);
      }
}

// ---------------------------------------------------------------------------------------------
// Decode GEMM (M <= 16)
// ---------------------------------------------------------------------------------------------
//
// Decode is bound by the bytes of the int4 weights, so this kernel streams them straight from
// global memory into registers (no shared-memory staging, no split-K workspace) and swaps the
// operands: the weights are the A operand of m16n8k32 (16 output channels per mma) and the
// tokens the B operand (8 per mma), so a batch of one wastes tensor-core lanes, not bytes.
//
// Within a group the dot product does not depend on the order of k, as long as both operands
// use the same order. Thread (gid, tig) therefore owns the 32 consecutive k of a group starting
// at 32 * tig: one 16-byte load per weight row (8 codes per mma step, the low nibbles feed the
// fragment's first k half and the high nibbles its second), and a matching 32-byte (int8) or
// 16-byte (int4) load of its token's activations, reordered with byte permutes (int8) or
// expanded the same way as the weights (int4).
//
// A block is 16 output channels x all of K: its WARPS warps (8, or 4 where that fits the grid in
// one wave: decode_warps) take every WARPS-th group and meet in shared memory at the end. Each
// warp keeps kGemvDepth groups of loads in flight.
constexpr int kGemvWarps = 8;
// Groups of loads in flight per warp: fewer as the token tiles multiply the activation registers
// (8 and 16 tokens stay within 128 registers, two 8-warp or four 4-warp blocks per SM; 32 tokens
// take 162 registers, one 8-warp or two 4-warp blocks).
#ifndef COMET_GEMV_DEPTH2  // groups in flight at 9-16 tokens (an experiment switch)
#define COMET_GEMV_DEPTH2 3
#endif
template <int NT>
constexpr int kGemvDepth = NT == 1 ? 4 : NT == 2 ? COMET_GEMV_DEPTH2 : 2;

// Keeps a per-thread row pointer in a register. Left to itself the compiler recomputes the
// decode kernels' row pointers (row index, clamp to the last row, 64-bit multiply-add) from the
// thread index before every group's loads; an empty asm that "may change" the pointer forbids
// that. Used at M <= 8 (docs/BENCHMARKS.md, "Session 8"): in the ring kernel all its pointers
// (219 -> 190 instructions per loop, 1-3% faster), in the register kernel the weight rows and
// activation-scale rows (8B qkv / o / down M = 1: 3-5% faster; the others, or any pointer at
// 9-32 tokens, were slower: there the fragments fill the registers, and at 16 tokens pinning
// all spills at 3 groups in flight or, at 2, issues 20% fewer instructions but runs 10% slower).
template <typename T>
__device__ __forceinline__ void keep_in_register(T*& p) {
  asm volatile("" : "+l"(p));
}

template <int NT>
struct GemvFrag {
  uint4 w[2];        // weight rows gid, gid + 8: 32 packed codes each
  uint4 a[NT][2];    // per 8-token tile: 32 int8 codes, or 32 packed int4 codes in a[nt][0]
  float ws[2];       // weight scales of rows gid, gid + 8
  float as[NT][2];   // activation scales of tokens 2 * tig, 2 * tig + 1 (+ 8 * nt)
};

template <int NT>
__device__ __forceinline__ void gemv_load_weights(GemvFrag<NT>& f, int g, const uint8_t* const (&wrow)[2],
                                                  const __half* const (&srow)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    f.w[r] = __ldg(reinterpret_cast<const uint4*>(wrow[r] + g * kPackedGroupBytes));
    f.ws[r] = __half2float(srow[r][g]);
  }
}

template <int NT, typename Frag>  // GemvFrag<NT> or GemvFrag32<NT>: their a and as
__device__ __forceinline__ void gemv_load_act(Frag& f, int g, int groups8, const int8_t* const (&a8row)[NT],
                                              const uint8_t* const (&a4row)[NT],
                                              const float* const (&asrow)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (g < groups8) {
      const uint4* p = reinterpret_cast<const uint4*>(a8row[nt] + g * kGroup);
      f.a[nt][0] = __ldg(p);
      f.a[nt][1] = __ldg(p + 1);
    } else {
      f.a[nt][0] = __ldg(reinterpret_cast<const uint4*>(a4row[nt] + (g - groups8) * kPackedGroupBytes));
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) f.as[nt][j] = __ldg(asrow[nt][j] + g);
  }
}

// One group of one warp: 4 mma steps per 8-token tile, then the group's rescale. A8 (the group's
// activations are 8-bit) is a template argument, so the callers branch once per group on it
// (warp-uniform) instead of issuing both expansions under predicates.
template <int NT, bool A8>
__device__ __forceinline__ void gemv_compute(const GemvFrag<NT>& f, float (&acc)[NT][4]) {
  constexpr bool a8 = A8;
  int c[NT][4] = {};
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // 8 codes of k per thread per mma step
    const uint32_t w0 = word(f.w[0], j), w1 = word(f.w[1], j);
    // Nibble into the high half of each byte: int8 = code * 16, sign extension for free.
    const uint32_t a[4] = {lo_nibbles(w0), lo_nibbles(w1), hi_nibbles(w0), hi_nibbles(w1)};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b[2];
      if (a8) {
        const uint32_t x0 = word(f.a[nt][j >> 1], (j & 1) * 2), x1 = word(f.a[nt][j >> 1], (j & 1) * 2 + 1);
        b[0] = __byte_perm(x0, x1, 0x6420);  // even k: pairs with the low weight nibbles
        b[1] = __byte_perm(x0, x1, 0x7531);  // odd k
      } else {
        const uint32_t x = word(f.a[nt][0], j);
        b[0] = lo_nibbles(x);
        b[1] = hi_nibbles(x);
      }
      mma_s8(c[nt], a, b);
    }
  }
  // The x16 of each expanded int4 operand, folded into the weight scale (a power of two: the
  // same products as ws * as * unscale, bit for bit).
  constexpr float unscale = a8 ? 1.f / 16.f : 1.f / 256.f;
  const float ws[2] = {f.ws[0] * unscale, f.ws[1] * unscale};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      acc[nt][e] = fmaf(exact_float(c[nt][e]), ws[e >> 1] * f.as[nt][e & 1], acc[nt][e]);
}

template <int NT>
__device__ __forceinline__ void gemv_compute(const GemvFrag<NT>& f, bool a8, float (&acc)[NT][4]) {
  if (a8)
    gemv_compute<NT, true>(f, acc);
  else
    gemv_compute<NT, false>(f, acc);
}

// The register decode kernels' per-thread weight rows: rows n0 + gid + 8r (r < R) of the packed
// weights (this thread's 16 bytes of each group) and of the weight scales. Rows past N read the
// last valid one; their results are never stored. PIN keeps the weight pointers in registers.
template <int R, bool PIN>
__device__ __forceinline__ void gemv_weight_rows(const uint8_t* qw, const __half* wscale, int n0, int N, int Kpad,
                                                 int G, const uint8_t* (&wrow)[R], const __half* (&srow)[R]) {
  const int gid = (threadIdx.x & 31) >> 2, tig = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = min(n0 + gid + 8 * r, N - 1);
    wrow[r] = qw + static_cast<size_t>(n) * (Kpad / 2) + tig * 16;
    srow[r] = wscale + static_cast<size_t>(n) * G;
    if (PIN) keep_in_register(wrow[r]);
  }
}

// The decode kernels' per-thread activation rows: codes of token 8 * nt + gid (int8 groups, then
// packed int4), scales of tokens 8 * nt + 2 * tig + {0, 1}. Tokens past M read the last valid
// one; their results are never stored. PIN_CODES / PIN_SCALES keep those pointers in registers
// (keep_in_register).
template <int NT, bool PIN_CODES, bool PIN_SCALES>
__device__ __forceinline__ void gemv_act_rows(const int8_t* q8, const uint8_t* q4, const float* ascale, int M,
                                              int K8, int K4, int G, const int8_t* (&a8row)[NT],
                                              const uint8_t* (&a4row)[NT], const float* (&asrow)[NT][2]) {
  const int gid = (threadIdx.x & 31) >> 2, tig = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = min(8 * nt + gid, M - 1);
    a8row[nt] = q8 + static_cast<size_t>(m) * K8 + tig * 32;
    a4row[nt] = q4 + static_cast<size_t>(m) * (K4 / 2) + tig * 16;
    if (PIN_CODES) {
      keep_in_register(a8row[nt]);
      keep_in_register(a4row[nt]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      asrow[nt][j] = ascale + static_cast<size_t>(min(8 * nt + 2 * tig + j, M - 1)) * G;
      if (PIN_SCALES) keep_in_register(asrow[nt][j]);
    }
  }
}

// The end of the register decode kernels: the warps' partial sums of the block's 16 * RT channels
// (RT row tiles of 16) x 8 * NT tokens meet in shared memory `red` and are stored.
template <int NT, int WARPS, int RT>
__device__ __forceinline__ void gemv_reduce_store(float (*red)[16 * RT][8 * NT], const float (&acc)[RT][NT][4],
                                                  int n0, int M, int N, void* out, DType out_dtype) {
  const int warp = threadIdx.x >> 5, gid = (threadIdx.x & 31) >> 2, tig = threadIdx.x & 3;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        red[warp][16 * rt + gid + 8 * (e >> 1)][8 * nt + 2 * tig + (e & 1)] = acc[rt][nt][e];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * RT * 8 * NT; i += WARPS * 32) {
    const int r = i / (8 * NT), m = i % (8 * NT), n = n0 + r;
    if (n >= N || m >= M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w][r][m];
    store_out(out, out_dtype, static_cast<size_t>(m) * N + n, v);
  }
}
template <int NT, int WARPS>
__device__ __forceinline__ void gemv_reduce_store(float (*red)[16][8 * NT], const float (&acc)[NT][4], int n0,
                                                  int M, int N, void* out, DType out_dtype) {
  gemv_reduce_store<NT, WARPS, 1>(red, reinterpret_cast<const float(&)[1][NT][4]>(acc), n0, M, N, out, out_dtype);
}

template <int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, (NT <= 2 ? 2 : 1) * (kGemvWarps / WARPS))
w4ax_gemv_kernel(const int8_t* __restrict__ q8, const uint8_t* __restrict__ q4,
                 const float* __restrict__ ascale, const uint8_t* __restrict__ qw,
                 const __half* __restrict__ wscale, void* __restrict__ out, DType out_dtype, int M, int N,
                 int Kpad, int groups8) {
  __shared__ float red[WARPS][16][8 * NT];
  const int warp = threadIdx.x >> 5;
  const int G = Kpad / kGroup, K8 = groups8 * kGroup, K4 = Kpad - K8;
  const int n0 = blockIdx.x * 16;
  // Rows past N and tokens past M read the last valid one; their results are never stored.
  const uint8_t* wrow[2];
  const __half* srow[2];
  gemv_weight_rows<2, NT == 1>(qw, wscale, n0, N, Kpad, G, wrow, srow);
  const int8_t* a8row[NT];
  const uint8_t* a4row[NT];
  const float* asrow[NT][2];
  gemv_act_rows<NT, false, NT == 1>(q8, q4, ascale, M, K8, K4, G, a8row, a4row, asrow);

  // Warp w takes groups w, w + WARPS, ... (measured on H100: giving each warp a contiguous range
  // instead is no faster overall, +-10% per shape), keeping D of them in flight.
  constexpr int D = kGemvDepth<NT>, kStride = D * WARPS;
  float acc[NT][4] = {};
  GemvFrag<NT> f[D];
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (warp + d * WARPS < G) gemv_load_weights(f[d], warp + d * WARPS, wrow, srow);
  grid_dependency_wait();
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (warp + d * WARPS < G) gemv_load_act(f[d], warp + d * WARPS, groups8, a8row, a4row, asrow);
  for (int base = warp; base < G; base += kStride) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int g = base + d * WARPS;
      if (g < G) {
        gemv_compute(f[d], g < groups8, acc);
        if (g + kStride < G) {
          gemv_load_weights(f[d], g + kStride, wrow, srow);
          gemv_load_act(f[d], g + kStride, groups8, a8row, a4row, asrow);
        }
      }
    }
  }

  gemv_reduce_store<NT, WARPS>(red, acc, n0, M, N, out, out_dtype);
}

// At 9-16 tokens on grids with two or more 32-channel blocks per SM (use_rows32): the register
// kernel's activation loads (L2 hits) outweigh its weight loads there (8B gate+up M = 16: ~66 MB
// of activations read by 1,792 blocks against 58.7 MB of weights), and every warp expands its
// activation fragments for 16 channels only. Here a warp takes 32 channels (two m16 row tiles
// sharing each activation fragment), so a block of 32 channels reads and expands the
// activations once for twice the weights. Two groups in flight (the fragments are twice the
// weights): about the registers of the 16-channel kernel at three (128, no spills).
// Measured on H100 at M = 16 (docs/BENCHMARKS.md, "Session 14"): 8B gate+up 30.6 -> 29.2 us,
// 70B down 51.8 -> 48.9, 70B o 16.9 -> 16.5; slower on grids of fewer blocks, whose SMs then
// hold half the warps (8B down 15.3 -> 19.4, 8B o 6.2 -> 7.1, 8B qkv 8.4 -> 8.7).
template <int NT>
struct GemvFrag32 {
  uint4 w[4];        // weight rows gid, gid + 8, gid + 16, gid + 24: 32 packed codes each
  uint4 a[NT][2];    // as GemvFrag
  float ws[4];
  float as[NT][2];
};

template <int NT, bool A8>
__device__ __forceinline__ void gemv32_compute(const GemvFrag32<NT>& f, float (&acc)[2][NT][4]) {
  int c[2][NT][4] = {};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t b[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (A8) {
        const uint32_t x0 = word(f.a[nt][j >> 1], (j & 1) * 2), x1 = word(f.a[nt][j >> 1], (j & 1) * 2 + 1);
        b[nt][0] = __byte_perm(x0, x1, 0x6420);
        b[nt][1] = __byte_perm(x0, x1, 0x7531);
      } else {
        const uint32_t x = word(f.a[nt][0], j);
        b[nt][0] = lo_nibbles(x);
        b[nt][1] = hi_nibbles(x);
      }
    }
#pragma unroll
    for (int rt = 0; rt < 2; ++rt) {
      const uint32_t w0 = word(f.w[2 * rt], j), w1 = word(f.w[2 * rt + 1], j);
      const uint32_t a[4] = {lo_nibbles(w0), lo_nibbles(w1), hi_nibbles(w0), hi_nibbles(w1)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_s8(c[rt][nt], a, b[nt]);
    }
  }
  constexpr float unscale = A8 ? 1.f / 16.f : 1.f / 256.f;  // as gemv_compute
#pragma unroll
  for (int rt = 0; rt < 2; ++rt) {
    const float ws[2] = {f.ws[2 * rt] * unscale, f.ws[2 * rt + 1] * unscale};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc[rt][nt][e] = fmaf(exact_float(c[rt][nt][e]), ws[e >> 1] * f.as[nt][e & 1], acc[rt][nt][e]);
  }
}

template <int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 2 * (kGemvWarps / WARPS))
w4ax_gemv32_kernel(const int8_t* __restrict__ q8, const uint8_t* __restrict__ q4,
                   const float* __restrict__ ascale, const uint8_t* __restrict__ qw,
                   const __half* __restrict__ wscale, void* __restrict__ out, DType out_dtype, int M, int N,
                   int Kpad, int groups8) {
  __shared__ float red[WARPS][32][8 * NT];
  const int warp = threadIdx.x >> 5;
  const int G = Kpad / kGroup, K8 = groups8 * kGroup, K4 = Kpad - K8;
  const int n0 = blockIdx.x * 32;
  const uint8_t* wrow[4];
  const __half* srow[4];
  gemv_weight_rows<4, false>(qw, wscale, n0, N, Kpad, G, wrow, srow);
  const int8_t* a8row[NT];
  const uint8_t* a4row[NT];
  const float* asrow[NT][2];
  gemv_act_rows<NT, false, false>(q8, q4, ascale, M, K8, K4, G, a8row, a4row, asrow);
  auto load_weights = [&](GemvFrag32<NT>& f, int g) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      f.w[r] = __ldg(reinterpret_cast<const uint4*>(wrow[r] + g * kPackedGroupBytes));
      f.ws[r] = __half2float(srow[r][g]);
    }
  };
  constexpr int D = 2, kStride = D * WARPS;
  float acc[2][NT][4] = {};
  GemvFrag32<NT> f[D];
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (warp + d * WARPS < G) load_weights(f[d], warp + d * WARPS);
  grid_dependency_wait();
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (warp + d * WARPS < G) gemv_load_act<NT>(f[d], warp + d * WARPS, groups8, a8row, a4row, asrow);
  for (int base = warp; base < G; base += kStride) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int g = base + d * WARPS;
      if (g < G) {
        if (g < groups8) gemv32_compute<NT, true>(f[d], acc);
        else gemv32_compute<NT, false>(f[d], acc);
        if (g + kStride < G) {
          load_weights(f[d], g + kStride);
          gemv_load_act<NT>(f[d], g + kStride, groups8, a8row, a4row, asrow);
        }
      }
    }
  }
  gemv_reduce_store<NT, WARPS, 2>(red, acc, n0, M, N, out, out_dtype);
}

// Large matrices at M <= 8, and some at 9-16 tokens (ring kernel, use_ring_kernel): the weights
// stream through a per-warp ring of shared-memory stages filled by cp.async, so the bytes in
// flight are bounded by shared memory instead of registers (64 / 80 registers for 8 / 16 tokens:
// four / three 8-warp blocks per SM, twice that of 4-warp blocks). Every thread copies, and
// later reads back, only its own fragment bytes, so a stage needs no barrier. The block's weight
// scales arrive once, as a tile copied with the first stage: fetched per group, each 2-byte
// scale was a DRAM miss of its own that the warp waited on as long as on the weights (ncu
// source counters of the register kernel, 70B gate+up). Activations and their scales are L2
// hits and run one group ahead in registers (staged in the ring with the weights instead, they
// were far slower at 16 tokens: docs/BENCHMARKS.md, "Session 8").
// Measured on H100 (docs/BENCHMARKS.md): faster than the register kernel where there are many
// blocks per SM to stream, slower on small matrices (use_ring_kernel).
#ifndef COMET_GEMV_STAGES
#define COMET_GEMV_STAGES 4
#endif
#ifndef COMET_GEMV_RING_MIN_BYTES  // smallest weight matrix (bytes) the ring kernel takes
#define COMET_GEMV_RING_MIN_BYTES (32ll << 20)
#endif
constexpr int kRingStages = COMET_GEMV_STAGES;

struct RingStage {
  uint4 w[2][32];  // lane's 16 bytes of weight rows gid and gid + 8
};

__device__ __forceinline__ void ring_copy(RingStage& st, int g, int lane, const uint8_t* const (&wrow)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) cp_async16(&st.w[r][lane], wrow[r] + g * kPackedGroupBytes, true);
}

#ifndef COMET_RING_MIN_BLOCKS  // blocks per SM the single-tile ring kernel is compiled for
#define COMET_RING_MIN_BLOCKS 4
#endif
template <int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, (NT == 1 ? COMET_RING_MIN_BLOCKS : 3) * (kGemvWarps / WARPS))
w4ax_gemv_ring_kernel(const int8_t* __restrict__ q8, const uint8_t* __restrict__ q4,
                      const float* __restrict__ ascale, const uint8_t* __restrict__ qw,
                      const __half* __restrict__ wscale, void* __restrict__ out, DType out_dtype, int M, int N,
                      int Kpad, int groups8) {
  extern __shared__ __align__(16) uint8_t ring_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int G = Kpad / kGroup, K8 = groups8 * kGroup, K4 = Kpad - K8;
  const int n0 = blockIdx.x * 16;
  RingStage* ring = reinterpret_cast<RingStage*>(ring_smem) + warp * kRingStages;
  uint8_t* tile = ring_smem + sizeof(RingStage) * kRingStages * WARPS;  // [16][G] fp16 scales
  float(*red)[16][8 * NT] = reinterpret_cast<float(*)[16][8 * NT]>(ring_smem);  // once the ring is drained

  // The scale rows of the block are contiguous and start 16-byte aligned (32 * G bytes per block).
  const uint8_t* sbase = reinterpret_cast<const uint8_t*>(wscale + static_cast<size_t>(n0) * G);
  const int sbytes = min(16, N - n0) * G * 2;
  for (int i = threadIdx.x * 16; i + 16 <= sbytes; i += WARPS * 32 * 16) cp_async16(tile + i, sbase + i, true);
  if (threadIdx.x == 0)  // the last block's tail, when N * G is not a multiple of 8
    for (int i = sbytes & ~15; i < sbytes; i += 2)
      *reinterpret_cast<__half*>(tile + i) = *reinterpret_cast<const __half*>(sbase + i);

  // Rows past N and tokens past M read the last valid one; their results are never stored.
  const uint8_t* wrow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    wrow[r] = qw + static_cast<size_t>(min(n0 + gid + 8 * r, N - 1)) * (Kpad / 2) + tig * 16;
    if (NT == 1) keep_in_register(wrow[r]);
  }
  const int8_t* a8row[NT];
  const uint8_t* a4row[NT];
  const float* asrow[NT][2];
  // pinned at 8 tokens only: at 16 (80 registers) the pinned pointers would spill
  gemv_act_rows<NT, NT == 1, NT == 1>(q8, q4, ascale, M, K8, K4, G, a8row, a4row, asrow);

  // Warp w takes groups w, w + WARPS, ...; one cp.async group per ring slot (the first also
  // holds the scale tile), committed even when empty, so "slot i has landed" is always
  // wait_group<kRingStages - 1>.
#pragma unroll
  for (int d = 0; d < kRingStages; ++d) {
    const int g = warp + d * WARPS;
    if (g < G) ring_copy(ring[d], g, lane, wrow);
    cp_async_commit();
  }
  GemvFrag<NT> cur, nxt;
  grid_dependency_wait();
  if (warp < G) gemv_load_act(cur, warp, groups8, a8row, a4row, asrow);
  cp_async_wait<kRingStages - 1>();
  __syncthreads();  // the scale tile, copied by every thread, is visible to all
  const __half* sw[2] = {reinterpret_cast<const __half*>(tile) + gid * G,
                         reinterpret_cast<const __half*>(tile) + (gid + 8) * G};
  float acc[NT][4] = {};
  for (int i = 0, g = warp; g < G; ++i, g += WARPS) {
    if (g + WARPS < G) gemv_load_act(nxt, g + WARPS, groups8, a8row, a4row, asrow);
    cp_async_wait<kRingStages - 1>();
    RingStage& st = ring[i % kRingStages];
    cur.w[0] = st.w[0][lane];
    cur.w[1] = st.w[1][lane];
    cur.ws[0] = __half2float(sw[0][g]);
    cur.ws[1] = __half2float(sw[1][g]);
    gemv_compute(cur, g < groups8, acc);
    // This thread's reads of the slot are consumed above, so its copies may overwrite it.
    const int gn = g + kRingStages * WARPS;
    if (gn < G) ring_copy(st, gn, lane, wrow);
    cp_async_commit();
    cur = nxt;
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with its ring: the reduction reuses the space

  gemv_reduce_store<NT, WARPS>(red, acc, n0, M, N, out, out_dtype);
}

// Launches a decode GEMM allowed to overlap the previous kernel in the stream (see
// grid_dependency_wait) on sm_90 and later; a plain launch elsewhere or when built with
// -DCOMET_NO_PDL (the experiment switch that measures what the overlap buys).
template <typename... Args>
cudaError_t launch_decode(void (*kernel)(Args...), int blocks, int warps, size_t smem, cudaStream_t stream,
                          Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(warps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
#ifndef COMET_NO_PDL
  int major = 0;
  const cudaError_t e = current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major);
  if (e != cudaSuccess) return e;
  if (major >= 9) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
#endif
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

size_t ring_smem_bytes(int G, int warps) {  // the ring, then the [16][G] fp16 scale tile
  static_assert(sizeof(RingStage) * kRingStages >= sizeof(float) * 16 * 16,
                "the cross-warp reduction (up to 16 tokens) reuses the ring's shared memory");
  return sizeof(RingStage) * kRingStages * warps + static_cast<size_t>(16) * G * 2;
}

// Warps per decode block. A block is 16 output channels whatever its warps, so the grid is fixed
// by N; 8-warp blocks fit 2 (register kernel) to 4 (ring kernel, M <= 8) per SM, and a grid just
// over one wave of them (70B qkv: 640 blocks on 528 places) left most SMs idle while its last
// blocks ran. With 4-warp blocks twice as many fit, so such a grid runs as one wave, each warp
// streaming twice the groups. Measured on H100 (docs/BENCHMARKS.md, "Session 8"), 8 -> 4 warps:
// 70B qkv M = 1 23.7 -> 19.6 us, 8B qkv 8.4 -> 7.4; at 9-16 tokens also on grids many waves deep
// (8B gate+up 32.7 -> 31.1); but within one wave 8 warps keep more bytes in flight (8B down
// M = 1: 14.1 against 16.6), and so they do on the deep grids of M <= 8 (70B gate+up 87.8 / 90.8).
#ifndef COMET_GEMV_WARPS  // 4 or 8 forces the block size (an experiment switch); 0: automatic
#define COMET_GEMV_WARPS 0
#endif
int decode_warps(int M, int blocks, int blocks_per_sm8, int num_sms) {
  if (COMET_GEMV_WARPS == 4 || COMET_GEMV_WARPS == 8) return COMET_GEMV_WARPS;
  const int slots = blocks_per_sm8 * num_sms;
  return blocks > slots && (blocks <= 2 * slots || M > 8) ? 4 : kGemvWarps;
}

// The automatic choice, measured on H100 (docs/BENCHMARKS.md): up to 8 tokens from 32 MB of
// weights; at 9-16 tokens (3 blocks per SM) for grids many waves deep (N >= 32768: 70B gate+up
// 112.7 -> 103.7 us), as it lost on long K (70B down 57.6 -> 67.5) and short grids; and (session
// 8) where the register kernel's grid, at 4 blocks of 4 warps per SM, spills into a second wave
// that the ring kernel's 6 per SM avoid (70B qkv M = 16: 27.5 -> 23.1 us).
#ifndef COMET_RING_WIDE_MIN_N  // an experiment switch (0: the ring kernel for all of M <= 16 from 32 MB)
#define COMET_RING_WIDE_MIN_N 32768
#endif
constexpr int kRingWideMinN = COMET_RING_WIDE_MIN_N;
bool use_ring_kernel(int M, int N, int Kpad, const void* wscale, int split_k, int num_sms) {
  if (M > kRingMaxM || reinterpret_cast<uintptr_t>(wscale) % 16 != 0) return false;  // tile: 16-byte copies
  if (split_k == kDecodeRing) return true;
  if (static_cast<long long>(N) * Kpad / 2 < COMET_GEMV_RING_MIN_BYTES) return false;
  const int blocks = (N + 15) / 16;
  return M <= 8 || N >= kRingWideMinN || (blocks > 4 * num_sms && blocks <= 6 * num_sms);
}

// The 32-channel register kernel (w4ax_gemv32_kernel) at 9-16 tokens: where its grid gives
// (nearly) every SM two blocks; on smaller grids the SMs hold half the warps of the 16-channel
// kernel's and fewer weight bytes are in flight (measured on H100: docs/BENCHMARKS.md, "Session
// 14"; N = 8192 at 1.94 blocks per SM gained, N = 6144 at 1.45 lost). COMET_GEMV_ROWS32=0 turns
// it off (an experiment switch).
#ifndef COMET_GEMV_ROWS32
#define COMET_GEMV_ROWS32 1
#endif
bool use_rows32(int N, int num_sms) {
  const int blocks32 = (N + 31) / 32;
  return COMET_GEMV_ROWS32 != 0 && 16 * blocks32 >= 15 * 2 * num_sms;
}

__global__ void convert_kernel(const float* __restrict__ src, void* __restrict__ dst, DType dt, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    store_out(dst, dt, i, src[i]);
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
cudaError_t launch(bool int4mma, dim3 grid, const int8_t* q8, const uint8_t* q4, const float* as,
                   const uint8_t* qw, const void* ws, void* out, DType dt, float* work, int M, int N,
                   int Kpad, int groups8, int split_k, cudaStream_t stream) {
  const __half* wsh = static_cast<const __half*>(ws);
  constexpr size_t smem = STAGES * sizeof(Stage<BM, BN>);
  constexpr int threads = 32 * WARPS_M * WARPS_N;
  auto kernel = int4mma ? w4ax_gemm_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, true>
                        : w4ax_gemm_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, false>;
  cudaError_t e = allow_dynamic_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, threads, smem, stream>>>(q8, q4, as, qw, wsh, out, dt, work, M, N, Kpad, groups8, split_k);
  return cudaGetLastError();
}

constexpr int kSmallM = 16;  // explicit split_k at decode sizes: a 16-row tile
constexpr int kBN = 128;
// Ring depth. Measured on H100: 4 stages (85 KB of shared memory at the 64-row tile) was 0-10%
// slower than 2 at every M; the tiled kernel is bound by instruction issue, not copy latency.
constexpr int kStages = 2;

int tile_m(int M) { return M <= kSmallM ? 16 : 64; }

}  // namespace

cudaError_t quantize_act_host(const void* x, DType x_dtype, const int32_t* perm, int M, int K,
                              int Kpad, int groups8, bool rotate, bool int_scales, bool a8_spans, int8_t* q8,
                              uint8_t* q4, float* scales, cudaStream_t stream) {
  const int K8 = groups8 * kGroup;
  const ActOut o{q8, q4, scales, Kpad / kGroup, K8, Kpad - K8, Kpad, 0, int_scales, a8_spans};
  return dispatch_quantize_act<false>(x, x_dtype, perm, M, K, groups8, rotate, o, stream);
}

cudaError_t quantize_act_wide_host(const void* x, DType x_dtype, const int32_t* perm, int M, int K,
                                   int Kpad, int groups8, bool rotate, bool int_scales, bool a8_spans, int8_t* qa,
                                   float* scales_t, int Mpad, cudaStream_t stream) {
  const ActOut o{qa, nullptr, scales_t, Kpad / kGroup, 0, 0, Kpad, Mpad, int_scales, a8_spans};
  return dispatch_quantize_act<true>(x, x_dtype, perm, M, K, groups8, rotate, o, stream);
}

int choose_split_k(int M, int N, int Kpad, int num_sms) {
  // The decode kernel for M <= 16; for 17..32 only where the tiled kernel's grid is small
  // (measured on H100, best tiled split vs decode kernel at M = 17 / 32: the decode kernel wins
  // on 8B qkv, o, down and 70B qkv, o by up to 1.4x, loses on gate+up and 70B down by up to 1.2x).
  if (M <= 16 || (M <= kDecodeMaxM && N <= 10240 && Kpad <= 16384)) return 0;
  const int tiles = ((M + tile_m(M) - 1) / tile_m(M)) * ((N + kBN - 1) / kBN);
  const int G = Kpad / kGroup;
  int split = 1;
  // Split K until the tiles cover the SMs, keeping at least two groups per split so the
  // double buffer has something to overlap.
  while (tiles * split < num_sms && split * 2 <= G / 2) split *= 2;
  return split;
}

cudaError_t w4ax_gemm_host(const int8_t* q8, const uint8_t* q4, const float* ascale,
                           const uint8_t* qweight, const void* wscale, void* out, DType out_dtype,
                           int M, int N, int Kpad, int groups8, int split_k, bool use_int4_mma,
                           float* workspace, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if ((split_k == 0 || split_k == kDecodeRing || split_k == kDecodeRows32) && M <= kDecodeMaxM) {
    const __half* wsh = static_cast<const __half*>(wscale);
    const int blocks = (N + 15) / 16;
    int sms = 0;
    cudaError_t e = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
    if (e != cudaSuccess) return e;
    if (split_k != kDecodeRows32 && use_ring_kernel(M, N, Kpad, wscale, split_k, sms)) {
      const int warps = decode_warps(M, blocks, M <= 8 ? COMET_RING_MIN_BLOCKS : 3, sms);
      const size_t smem = ring_smem_bytes(Kpad / kGroup, warps);
      auto kernel = M <= 8 ? (warps == 4 ? w4ax_gemv_ring_kernel<1, 4> : w4ax_gemv_ring_kernel<1, kGemvWarps>)
                           : (warps == 4 ? w4ax_gemv_ring_kernel<2, 4> : w4ax_gemv_ring_kernel<2, kGemvWarps>);
      e = allow_dynamic_smem(kernel, smem);
      if (e != cudaSuccess) return e;
      return launch_decode(kernel, blocks, warps, smem, stream, q8, q4, ascale, qweight, wsh, out,
                           out_dtype, M, N, Kpad, groups8);
    }
    if (M <= 16 && (split_k == kDecodeRows32 || (M > 8 && split_k == 0 && use_rows32(N, sms)))) {
      const int blocks32 = (N + 31) / 32;
      const int warps32 = decode_warps(M, blocks32, 2, sms);
      return launch_decode(warps32 == 4 ? w4ax_gemv32_kernel<2, 4> : w4ax_gemv32_kernel<2, kGemvWarps>, blocks32,
                           warps32, 0, stream, q8, q4, ascale, qweight, wsh, out, out_dtype, M, N, Kpad, groups8);
    }
    const int warps = decode_warps(M, blocks, M <= 16 ? 2 : 1, sms);
    auto kernel = warps == 4 ? (M <= 8    ? w4ax_gemv_kernel<1, 4>
                                : M <= 16 ? w4ax_gemv_kernel<2, 4>
                                          : w4ax_gemv_kernel<4, 4>)
                             : (M <= 8    ? w4ax_gemv_kernel<1, kGemvWarps>
                                : M <= 16 ? w4ax_gemv_kernel<2, kGemvWarps>
                                          : w4ax_gemv_kernel<4, kGemvWarps>);
    return launch_decode(kernel, blocks, warps, 0, stream, q8, q4, ascale, qweight, wsh, out, out_dtype, M, N,
                         Kpad, groups8);
  }
  const int bm = tile_m(M);
  const int G = Kpad / kGroup;
  split_k = std::max(1, std::min(split_k, G));
  dim3 grid((N + kBN - 1) / kBN, (M + bm - 1) / bm, split_k);
  if (split_k > 1) {
    cudaError_t e = cudaMemsetAsync(workspace, 0, sizeof(float) * static_cast<size_t>(M) * N, stream);
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = bm == 16
      ? launch<16, kBN, 1, 4, kStages>(use_int4_mma, grid, q8, q4, ascale, qweight, wscale, out, out_dtype,
                              workspace, M, N, Kpad, groups8, split_k, stream)
      : launch<64, kBN, 2, 2, kStages>(use_int4_mma, grid, q8, q4, ascale, qweight, wscale, out, out_dtype,
                              workspace, M, N, Kpad, groups8, split_k, stream);
  if (e != cudaSuccess || split_k == 1) return e;
  return store_split_k_result(workspace, out, out_dtype, static_cast<size_t>(M) * N, stream);
}

cudaError_t store_split_k_result(const float* workspace, void* out, DType out_dtype, size_t n,
                                 cudaStream_t stream) {
  const int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, 4096));
  convert_kernel<<<blocks, 256, 0, stream>>>(workspace, out, out_dtype, n);
  return cudaGetLastError();
}

}  // namespace comet
