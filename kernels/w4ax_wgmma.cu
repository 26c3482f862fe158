// The W4Ax GEMM on Hopper (sm_90a): wgmma tensor cores, TMA-staged operands, for prefill-sized M.
//
// Roles are swapped as in the decode kernel: the int4 weights are wgmma's A operand, expanded
// to int8 in registers straight from a 16-byte shared-memory load per row and group (no
// expansion pass through shared memory), and the tokens are the B operand, read by the tensor
// cores from shared memory where the tensor memory accelerator (TMA) put them. The activations
// arrive "wide" (w4ax.h): every group as int8, in the k order the weight fragments produce, so
// B needs no expansion at all and the kernel does the same work for 4-bit and 8-bit groups.
//
// A block computes 128 output channels x 64, 96, 128 or 192 tokens: two consumer warpgroups of
// 64 channels each share the token tile, and a third, the producer, keeps a 6-stage ring of TMA
// copies full (tokens 8-24 KB, weights 8 KB, activation scales per group); the stages are
// handed over through mbarriers only, so while one consumer rescales its int32 group result on
// the CUDA cores (the per-group scales of the format), the other's wgmma keep the tensor cores
// busy. Each consumer also overlaps its own rescale: it issues a group as two halves of the
// token tile, a commit each, and rescales the first while the second runs. The producer gives
// its registers to the consumers (setmaxnreg: 24 / 240 per thread). (Measured on H100 against
// the same kernel with thread 0 of a consumer issuing the copies 4 groups ahead: 8B gate+up
// M = 4096 1.60 -> 1.35 ms, 8B down 0.76 -> 0.59, M = 256 8-20% faster.)
#include "w4ax.h"
#include "w4ax_common.cuh"
#include "wgmma_common.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <type_traits>

namespace comet {
namespace {

using detail::current_device_attribute;
using detail::grid_dependency_wait;
using detail::store_out;
using namespace sm90;

constexpr int kWarpgroups = 2;  // consumers, 64 output channels each (3 measured slower on most shapes)
constexpr int kWideN = 64 * kWarpgroups;      // output channels per block
constexpr int kWideStages = 6;
constexpr int kWarps = 4 * kWarpgroups;       // consumer warps: each releases every stage it used
constexpr int kWideThreads = 32 * kWarps + 128;  // + the producer warpgroup
// Registers per thread after the role split (setmaxnreg): the producer needs a handful, the
// consumers hold a 64 x TOKENS int32 accumulator set and its float sums. The two together must
// fit in what the block has at launch (384 threads x 168 registers: __launch_bounds__(384, 1)),
// or the consumers' setmaxnreg.inc would wait forever for registers no one can release.
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
static_assert(128 * kProducerRegs + 32 * kWarps * kConsumerRegs <= kWideThreads * (65536 / kWideThreads / 8 * 8),
              "the registers the block holds at launch");

// Tokens per block is a template parameter (64, 96, 128 or 192: wide_tokens below picks one per
// shape). W8: the weights arrive expanded (expand_weights_kernel below), int8 [channel][128],
// 128-byte swizzled by the TMA like the tokens, and wgmma reads them from shared memory.
template <int TOKENS, bool W8 = false>
struct alignas(1024) WideStage {
  int8_t act[TOKENS * kGroup];               // [token][128], 128-byte swizzled by the TMA
  uint8_t w[kWideN * kGroup / (W8 ? 1 : 2)];  // [channel][64 packed bytes], W8: [channel][128 int8]
  float as[TOKENS];                          // this group's activation scales (integer group: its span's)
};
// Stages of the ring: six, or as many as fit in the 227 KB a block may have (W8 at 192 tokens: 5).
template <int TOKENS, bool W8>
constexpr int kStagesOf = static_cast<int>(
    std::min<size_t>(kWideStages, (227 * 1024 - 1024 - 256) / sizeof(WideStage<TOKENS, W8>)));
template <int TOKENS, bool W8>
constexpr size_t kWideSmem = kStagesOf<TOKENS, W8> * sizeof(WideStage<TOKENS, W8>) + 1024;  // + alignment slack

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

// The spin loop lives inside the asm (labels are local to its braces): as a C++ loop it would be
// a divergent path to the compiler, which then serializes the wgmma in flight around it.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n" ::"r"(
          smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}


__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

// One k32 step of a 64 x N warpgroup tile: d (int32, N / 2 registers per thread) += A
// (int8 weights from registers, the m16n8k32 A-fragment layout per warp) x B (int8 activations
// in shared memory, N tokens x 32 k, described by `desc`). ACCUMULATE = false starts from
// zero. One overload per half-tile width (the register count picks it: 32 tokens for 64-token
// tiles, 48 for 96, 64 for 128, 96 for 192); the instruction string must be a literal, hence four
// near-identical bodies.
template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[24], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %29, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n48k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, "
      "{%24, %25, %26, %27}, %28, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[48], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
      "{%48, %49, %50, %51}, %52, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

// The same with A (the expanded weights, W8) in shared memory too, described by `adesc` (64 rows
// x 32 k, K-major, 128-byte swizzled); again one literal instruction string per tile width.
template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[16], uint64_t adesc, uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "%16, %17, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
      : "l"(adesc), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[24], uint64_t adesc, uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %26, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n48k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, "
      "%24, %25, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23])
      : "l"(adesc), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[32], uint64_t adesc, uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(adesc), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

template <bool ACCUMULATE>
__device__ __forceinline__ void wgmma_s8(int (&d)[48], uint64_t adesc, uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
      "%48, %49, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47])
      : "l"(adesc), "l"(desc), "n"(ACCUMULATE ? 1 : 0));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Stream-K (split_k == kWideStreamK): the grid is P blocks, one per SM. The tiles of the full
// waves but one (dp_tiles, a multiple of P) go one per block as usual, tile c + w * P to block c,
// so that the blocks running at once share their operands in L2. The rest, one to two waves'
// worth, is shared evenly: block c takes the iterations [sk_begin(c), sk_begin(c + 1)) of their
// (tile, K group) space, tiles in order with the channel tile fastest and the groups of a tile
// consecutive. A block so works through segments: the tail of a tile, whole tiles, the head of a
// tile, its ring running on across them. A whole tile is stored directly. A tile cut between
// blocks is finished by the block that holds its first group: it reaches that head last in its
// range, while the blocks holding the rest computed theirs first in theirs, so their partial
// sums (a slot per block in the workspace, published by a flag) are ready by then and it rarely
// waits. The flags hold a per-call nonce and are reset by the block that consumes them, so the
// workspace needs no clearing, and a CUDA graph may replay the launch. No atomics: the sum order
// is fixed. (Sharing every tile this way spreads the running blocks over all tiles: at large M
// their operands no longer fit in L2, measured 25% slower on 8B down at M = 4096.)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ int sk_begin(int c, int total, int blocks) {
  return static_cast<int>(static_cast<long long>(total) * c / blocks);
}

// One block's stretch of a single tile: output channels n0.., tokens m0.., groups [g0, g1).
struct WideSegment {
  int n0, m0, g0, g1;
};

// The segment that starts at iteration `it` (tile * G + group) of a block whose range ends at `end`.
template <int TOKENS>
__device__ __forceinline__ WideSegment wide_segment(int it, int end, int G, int tiles_n) {
  const int tile = it / G, g0 = it - tile * G;
  return {(tile % tiles_n) * kWideN, (tile / tiles_n) * TOKENS, g0, min(G, g0 + (end - it))};
}

// The tile (token row * tiles_n + channel tile) of the tiled grid's block launched l-th. Blocks
// start in launch order. With the channel tiles of a token row one after the other, a wave of
// 132 blocks reads 132 weight tiles and one or two token tiles, so on a weight matrix larger than
// L2 every token row reads all the weights from DRAM again (8B gate+up M = 1024: DRAM 57% busy,
// ncu). From COMET_WIDE_RASTER_MIN_BYTES of packed weights the grid runs in bands of
// kRasterRows token rows instead, channel tile by channel tile, so that a wave reads ~132 / 8
// weight tiles and 8 token tiles. Measured on H100 (docs/BENCHMARKS.md, "Session 14"): 8B
// gate+up M = 1024 / 4096 1.11 / 1.10x faster, 70B gate+up 1.06 / 1.11x, 70B o M = 4096 1.14x,
// 70B qkv / down 1.00-1.04x; on the smaller 8B matrices, whose weights a wave already shares,
// 0.92-1.05x.
// The rescaled groups pipelined by token halves (`rescaled_run1`, below): 1, the default; 0 the
// older one-group-at-a-time loop (`group`), 2 the two-fragment-array form. Measured on H100
// (docs/BENCHMARKS.md, "Session 20"): free scales 6-9% faster at M = 1024 (128-token tiles) and
// 1-8% at M = 256; integer scales, where only the 8-bit groups are rescaled, within 1% (8B down
// M = 1024 4% faster); =2 no faster than =1.
#ifndef COMET_WIDE_PIPELINE
#define COMET_WIDE_PIPELINE 1
#endif
#ifndef COMET_WIDE_RASTER_MIN_BYTES
#define COMET_WIDE_RASTER_MIN_BYTES (32ll << 20)
#endif
constexpr int kRasterRows = 8;
__device__ __forceinline__ int raster_tile(int l, int tiles_n, int tiles_m, int N, int Kpad) {
  if (static_cast<long long>(N) * (Kpad / 2) < COMET_WIDE_RASTER_MIN_BYTES) return l;
  const int band = l / (kRasterRows * tiles_n), rows = min(kRasterRows, tiles_m - band * kRasterRows);
  const int in_band = l - band * kRasterRows * tiles_n;
  return (band * kRasterRows + in_band % rows) * tiles_n + in_band / rows;
}

// The two consumer warpgroups only (named barrier 1; the producer is not waited for).
__device__ __forceinline__ void consumer_barrier() { asm volatile("bar.sync 1, %0;\n" ::"n"(32 * kWarps) : "memory"); }
__device__ __forceinline__ void store_release(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}
#endif

// INTS (int_group_scales, w4ax.h): the 4-bit groups (from groups8 on) of each span of 16 groups
// add up in the int32 accumulators, weights expanded as code * m (m = wscale / wscale_row, an
// integer), activations arriving as code * m; the sum is folded into the float accumulators
// once per span with the span's activation scale (row G + span of scales_t) and the row's
// weight scale. The 8-bit groups keep the per-group rescale.
//
// W8: the weights come expanded to int8 (code * 16, integer groups code * m: expand_weights_kernel)
// and wgmma reads them from shared memory, so that the consumers build no fragments.
template <int TOKENS, bool STREAMK, bool INTS, bool W8>
__global__ void __launch_bounds__(kWideThreads, 1)
w4ax_gemm_wide_kernel(const __grid_constant__ CUtensorMap act_map, const __grid_constant__ CUtensorMap w_map,
                      const float* __restrict__ scales_t, int Mpad, const __half* __restrict__ wscale,
                      const __half* __restrict__ wscale_row, int groups8, bool a8_runs,
                      void* __restrict__ out, DType out_dtype, float* __restrict__ workspace, int M, int N,
                      int Kpad, int split_k, int dp_tiles, unsigned long long nonce) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kWideM = TOKENS;
  constexpr int kAccRegs = kWideM / 2;     // int32 accumulators per thread per set
  constexpr int kTokenTiles = kWideM / 8;  // 8-token column groups of the accumulator
  using WideStage = comet::WideStage<TOKENS, W8>;
  constexpr int kStages = kStagesOf<TOKENS, W8>;
  constexpr int kWCols = W8 ? kGroup : kGroup / 2;  // weight bytes per channel and group
  extern __shared__ uint8_t wide_smem[];
  __shared__ __align__(8) uint64_t full[kWideStages], empty[kWideStages];
  WideStage* st = reinterpret_cast<WideStage*>((reinterpret_cast<uintptr_t>(wide_smem) + 1023) & ~uintptr_t{1023});

  const int G = Kpad / kGroup;
  const int tiles_n = (N + kWideN - 1) / kWideN;
  // This block's work: ranges of iterations (tile * G + group). Split-K or one tile per block:
  // one range, the block's part of its tile. Stream-K: its whole tiles, then its share of the rest.
  int n_ranges = 1, sk_base = 0, sk_total = 0;
  if constexpr (STREAMK) {
    n_ranges = dp_tiles / gridDim.x + 1;
    sk_base = dp_tiles * G;
    sk_total = tiles_n * ((M + kWideM - 1) / kWideM) * G - sk_base;
  }
  // The warp index through a shuffle: provably warp-uniform, so the compiler knows that nothing
  // derived from it splits a warpgroup (it serializes wgmma instructions it cannot prove are
  // issued by whole warpgroups).
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0), lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Tiled grids: the block's tiles are l = blockIdx.x, + gridDim.x, ... (launch order, one per
  // block unless the grid is persistent: WidePlan), its split of K blockIdx.z.
  const int tiles_m = (M + kWideM - 1) / kWideM, tiles = tiles_n * tiles_m;
  auto range = [&](int k, int& begin, int& end) {  // the block's k-th range
    if (STREAMK && k < n_ranges - 1) {  // a whole tile of the full waves
      begin = (blockIdx.x + k * gridDim.x) * G;
      end = begin + G;
    } else if (STREAMK) {
      begin = sk_base + sk_begin(blockIdx.x, sk_total, gridDim.x);
      end = sk_base + sk_begin(blockIdx.x + 1, sk_total, gridDim.x);
    } else {
      const int per = (G + split_k - 1) / split_k;
      const int tile = raster_tile(k, tiles_n, tiles_m, N, Kpad);
      begin = tile * G + min(G, static_cast<int>(blockIdx.z) * per);
      end = tile * G + min(G, static_cast<int>(blockIdx.z + 1) * per);
    }
  };
  // produce: group g of the segment sg into stage j % kStages (the j-th this block fills),
  // once every warp released it. Scales of the tokens the tile holds; past M the stage keeps
  // stale values, which only reach accumulator columns that are never stored. Stream-K fetches
  // the weights, which no kernel writes, of its first stages before the wait for the previous
  // kernel in the stream (the activation quantization, under programmatic dependent launch):
  // produce_weights, then produce_act after the wait.
  auto scale_bytes = [&](const WideSegment& sg) { return 4u * static_cast<uint32_t>(min(kWideM, Mpad - sg.m0)); };
  // The activation scales a stage carries: its group's row of scales_t, or, for an integer
  // group (INTS), its span's row (G + span), which the consumers fold the span's sum with.
  auto scale_src = [&](int g, const WideSegment& sg) {
    const int row = INTS && g >= groups8 ? G + g / kSpanGroups : g;
    return scales_t + static_cast<size_t>(row) * Mpad + sg.m0;
  };
  auto stage_bytes = [&](const WideSegment& sg) {
    return static_cast<uint32_t>(sizeof(st->act) + sizeof(st->w)) + scale_bytes(sg);
  };
  auto produce_weights = [&](int j, int g, const WideSegment& sg) {
    const int s = j % kStages;
    mbar_wait(&empty[s], ((j / kStages) & 1) ^ 1);
    mbar_expect_tx(&full[s], stage_bytes(sg));
    tma_load_2d(st[s].w, &w_map, g * kWCols, sg.n0, &full[s]);
  };
  auto produce_act = [&](int j, int g, const WideSegment& sg) {
    const int s = j % kStages;
    tma_load_2d(st[s].act, &act_map, g * kGroup, sg.m0, &full[s]);
    bulk_load(st[s].as, scale_src(g, sg), scale_bytes(sg), &full[s]);
  };
  auto produce = [&](int j, int g, const WideSegment& sg) {
    const int s = j % kStages;
    mbar_wait(&empty[s], ((j / kStages) & 1) ^ 1);
#ifdef COMET_WIDE_SKIP_LOAD  // experiment switch: after the first ring, compute on stale stages
    if (j >= kStages) {
      mbar_arrive(&full[s]);
      return;
    }
#endif
    mbar_expect_tx(&full[s], stage_bytes(sg));
    tma_load_2d(st[s].act, &act_map, g * kGroup, sg.m0, &full[s]);
    tma_load_2d(st[s].w, &w_map, g * kWCols, sg.n0, &full[s]);
    bulk_load(st[s].as, scale_src(g, sg), scale_bytes(sg), &full[s]);
  };
  if (!STREAMK) {  // a split past the last group has nothing to do
    int begin, end;
    range(blockIdx.x, begin, end);
    if (begin >= end) return;
  }
  if (warp < 4) {
    // The producer warpgroup: one thread keeps the ring full, as far ahead as the consumers
    // release stages (under stream-K through every segment of the block); the other threads have
    // nothing to do.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (!STREAMK && threadIdx.x == 0) {
      // The block's tiles (or splits of them): plain loops, as the consumers'. (Run through
      // stream-K's segment loops, the tiled grids were 3-8% slower at M >= 1024: H100, same run,
      // docs/BENCHMARKS.md "Session 10".) In a persistent grid the ring runs on into the next
      // tile while the consumers fold and store the last.
      grid_dependency_wait();
      for (int l = blockIdx.x, j = 0; l < tiles; l += gridDim.x) {
        int begin, end;
        range(l, begin, end);
        const WideSegment sg = wide_segment<TOKENS>(begin, end, G, tiles_n);
        for (int g = sg.g0; g < sg.g1; ++g, ++j) produce(j, g, sg);
      }
    } else if (STREAMK && threadIdx.x == 0) {
      // The weights of the first stages (those in the block's first segment) before the wait.
      int it, end, early = 0;
      range(0, it, end);
      const WideSegment first = wide_segment<TOKENS>(it, end, G, tiles_n);
      if (!W8 && it < end)  // (expanded weights come from the kernel before: after the wait)
        for (; early < kStages && first.g0 + early < first.g1; ++early)
          produce_weights(early, first.g0 + early, first);
      grid_dependency_wait();
      for (int k = 0, j = 0; k < n_ranges; ++k) {
        range(k, it, end);
        while (it < end) {
          const WideSegment sg = wide_segment<TOKENS>(it, end, G, tiles_n);
          for (int g = sg.g0; g < sg.g1; ++g, ++j) {
            if (j < early) produce_act(j, g, sg);
            else produce(j, g, sg);
          }
          it += sg.g1 - sg.g0;
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    // Consumer warpgroup wg, warp wq of it: accumulator rows (output channels) r and r + 8 of the
    // block, columns (tokens) 8j + 2 * tig + {0, 1}.
    const int wg = (warp >> 2) - 1, wq = warp & 3, gid = lane >> 2, tig = lane & 3;
    // r: the first of the thread's two output channels (accumulator rows r, r + 8) in the block's
    // 128-channel tile, from the warp-uniform warp index.
    const int r = wg * 64 + wq * 16 + gid;
    const __half* ws_row[2] = {wscale, wscale};  // this thread's weight-scale rows in the segment's tile
    const uint32_t stage0 = smem_u32(st);
    const uint32_t w_off = offsetof(WideStage, w) + r * (kGroup / 2) + tig * 16;
    const uint32_t as_off = offsetof(WideStage, as) + 8 * tig;
    const uint64_t desc0 = desc_k_major_sw128(smem_u32(st[0].act));
    // W8: this warpgroup's 64 rows of stage 0's weight tile.
    [[maybe_unused]] const uint64_t adesc0 = desc_k_major_sw128(smem_u32(st[0].w)) + ((wg * 64 * kGroup) >> 4);

    // Issues the four wgmma of group g, in stage i % kStages, into d (int32, from zero) and
    // returns the group's two weight scales, still fp16; the wgmma run on while the caller
    // rescales the previous group.
    // A group's operands in stage s: the descriptors of its token tile's four k32 steps (one k32
    // step is 32 bytes further along the swizzled rows), and the weight fragments of this thread
    // in `a`, built from its two packed weight rows (W8: none, the weights are read from shared
    // memory by the wgmma).
    auto operands = [&](int s, uint32_t (&a)[4][4], uint64_t (&desc)[4], uint32_t m0, uint32_t m1, bool ints) {
#pragma unroll
      for (int k = 0; k < 4; ++k) desc[k] = desc0 + ((s * sizeof(WideStage)) >> 4) + 2 * k;
      if constexpr (!W8) {
        const uint32_t base = stage0 + s * static_cast<uint32_t>(sizeof(WideStage));
        const uint4 w0 = lds128(base + w_off), w1 = lds128(base + w_off + 8 * (kGroup / 2));
        if (ints) weight_fragments_int(w0, w1, m0, m1, a);
        else weight_fragments(w0, w1, a);
      }
    };
    constexpr std::false_type kFresh{};  // mma's `accumulate`: from zero or onto d
    constexpr std::true_type kAdd{};
    // One k32 step of stage s: d (+)= A x the tokens at `desc`; A: the fragments a[k], or (W8)
    // the weight tile in shared memory.
    auto mma = [&](auto accumulate, auto& d, const uint32_t (&a)[4][4], int s, int k, uint64_t desc) {
      if constexpr (W8) wgmma_s8<decltype(accumulate)::value>(d, adesc0 + ((s * sizeof(WideStage)) >> 4) + 2 * k, desc);
      else wgmma_s8<decltype(accumulate)::value>(d, a[k], desc);
    };
    // This warp is done with the stage of the block's i-th group.
    auto release = [&](int i) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[i % kStages]);
    };
    // The same after plain shared-memory loads of the stage (the activation scales): ptxas lets
    // the arrive go before the loads' results are back (it schedules their FMAs after it), and
    // the producer's next TMA copy into the stage, in the async proxy, could then land before a
    // late load read it: one warp's 8 tokens x 16 channels then took another group's scales
    // (H100: 3,298 of 72,186 persistent launches of 70B qkv M = 1024 wrong, 26 stream-K, 0 with
    // one tile per block). The proxy fence orders the loads before the copies that follow the
    // release (ptxas makes it MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S, which waits for them).
    auto release_reads = [&](int i) {
#ifndef COMET_RELEASE_PLAIN  // experiment switch: the unfenced release (wrong results, rarely)
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
      release(i);
    };

    // A group's wgmma run as two halves of the token tile: accumulators [0, kHalf) and
    // [kHalf, kAccRegs), the second half's tokens kHiRows descriptor units (of 16 bytes, TOKENS / 2
    // rows of 128) further.
    constexpr int kHalf = kAccRegs / 2;
    constexpr uint64_t kHiRows = (TOKENS / 2) * kGroup / 16;
    auto issue = [&](int i, int g, int (&d)[kAccRegs], __half2& ws) {
      const int s = i % kStages;
      ws = __halves2half2(ws_row[0][g], ws_row[1][g]);
      mbar_wait(&full[s], (i / kStages) & 1);
      uint64_t desc[4];
      uint32_t a[4][4];
      operands(s, a, desc, 16, 16, false);
      // Tokens [0, TOKENS / 2), then the other half (TOKENS / 2 rows of 128 bytes further), one
      // commit each, so that the caller can rescale the first half while the second runs.
#ifndef COMET_WIDE_SKIP_MMA  // experiment switch: time the pipeline without the tensor cores
      int(&lo)[kHalf] = *reinterpret_cast<int(*)[kHalf]>(d);
      int(&hi)[kHalf] = *reinterpret_cast<int(*)[kHalf]>(d + kHalf);
      wgmma_fence();
      mma(kFresh, lo, a, s, 0, desc[0]);
#pragma unroll
      for (int k = 1; k < 4; ++k) mma(kAdd, lo, a, s, k, desc[k]);
      wgmma_commit();
      mma(kFresh, hi, a, s, 0, desc[0] + kHiRows);
#pragma unroll
      for (int k = 1; k < 4; ++k) mma(kAdd, hi, a, s, k, desc[k] + kHiRows);
      wgmma_commit();
#else
#pragma unroll
      for (int e = 0; e < kAccRegs; ++e) d[e] = static_cast<int>(a[e & 3][(e >> 2) & 3] ^ desc[e & 3]);
      wgmma_commit();
      wgmma_commit();
#endif
    };

    // Folds group i's int32 result d into the float accumulators, then hands its stage back.
    // Per element: t = d * ws exactly rounded, with the int -> float conversion folded into the
    // FMA (0x4B400000 + d is the float 1.5 * 2^23 + d, exact for |d| < 2^22, and 1.5 * 2^23 * ws
    // is exact: ws has 11 significant bits), then acc += t * as. Three instructions.
    float acc[kAccRegs];
    auto rescale = [&](int i, int (&d)[kAccRegs], __half2 ws_h, int j0 = 0, int j1 = TOKENS / 8,
                       bool release_stage = true) {
#pragma unroll
      for (int e = 4 * j0; e < 4 * j1; ++e) fence_operand(d[e]);
      constexpr float kUnscale = 1.f / 16.f;  // the weights enter as code * 16
      const float2 wsf = __half22float2(ws_h);
      const float ws[2] = {wsf.x * kUnscale, wsf.y * kUnscale};
      [[maybe_unused]] const float off[2] = {-12582912.f * ws[0], -12582912.f * ws[1]};
      const uint32_t base = stage0 + (i % kStages) * static_cast<uint32_t>(sizeof(WideStage)) + as_off;
#pragma unroll
      for (int j = j0; j < j1; ++j) {
        const float2 as = lds64f(base + 32 * j);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
#ifndef COMET_WIDE_SKIP_RESCALE
          const float t = fmaf(__int_as_float(d[4 * j + e] + 0x4B400000), ws[e >> 1], off[e >> 1]);
          acc[4 * j + e] = fmaf(t, (e & 1) ? as.y : as.x, acc[4 * j + e]);
#else  // experiment switch: one add per element instead of three instructions (wrong results)
          acc[4 * j + e] += __int_as_float(d[4 * j + e]);
#endif
        }
      }
      if (release_stage) release_reads(i);
    };

    // One accumulator set: the two warpgroups overlap each other's rescale, and each its own in
    // halves: the group's wgmma run as two halves of the token tile with a commit each, and the
    // first half is rescaled while the second is on the tensor cores. (Measured on H100, 128-token
    // tiles: two sets need more than 255 registers and spill; one set was 2-10% faster at M = 256
    // and 1024 on the 8B shapes; the halves another 1-7% there, same run: 8B o M = 1024 66.6 ->
    // 61.7 us, 8B down 197.1 -> 191.6, gate+up 418.9 -> 415.0.)
    int d0[kAccRegs];
    __half2 ws0;
    // INTS: this thread's two rows' weight scales, and their reciprocals, which turn a group
    // scale back into its multiplier.
    [[maybe_unused]] float sw[2] = {0.f, 0.f}, inv_sw[2] = {0.f, 0.f};
    // A tile's (or a segment's) start, group i (the block's i-th, in stage i % kStages) and
    // store.
    auto start = [&](const WideSegment& sg) {
      ws_row[0] = wscale + static_cast<size_t>(min(sg.n0 + r, N - 1)) * G;
      ws_row[1] = wscale + static_cast<size_t>(min(sg.n0 + r + 8, N - 1)) * G;
      if constexpr (INTS) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          sw[k] = __half2float(wscale_row[min(sg.n0 + r + 8 * k, N - 1)]);
          inv_sw[k] = __fdiv_rn(1.f, sw[k]);
          // Kept in a register: in a loop over segments the compiler otherwise recomputes the
          // division per group (MUFU.RCP and its Newton steps: stream-K's integer loop 392 SASS
          // instructions per two groups with, 338 without).
          asm volatile("" : "+f"(inv_sw[k]));
        }
      }
#pragma unroll
      for (int e = 0; e < kAccRegs; ++e) acc[e] = 0.f;
    };
    auto group = [&](int i, int g) {
      issue(i, g, d0, ws0);
      wgmma_wait<1>();
      rescale(i, d0, ws0, 0, kTokenTiles / 2, false);
      wgmma_wait<0>();
      rescale(i, d0, ws0, kTokenTiles / 2, kTokenTiles);
    };
    // INTS: an integer group's eight wgmma (both token halves) added to d0 (a span's first group,
    // `first`, starts it from zero: the wgmma's own zero-fill, as register moves between the
    // wgmma made the compiler insert a fence there, serializing them under stream-K), one commit,
    // their A fragments built in `a`, which must stay untouched until these wgmma completed.
    auto issue_int = [&](auto first, int i, int g, uint32_t (&a)[4][4]) {
      const int s = i % kStages;
      uint32_t m0 = 16, m1 = 16;  // (W8: the expanded weights hold code * m already)
      if constexpr (!W8) {
        m0 = __float2uint_rn(__half2float(ws_row[0][g]) * inv_sw[0]);
        m1 = __float2uint_rn(__half2float(ws_row[1][g]) * inv_sw[1]);
      }
      mbar_wait(&full[s], (i / kStages) & 1);
      uint64_t desc[4];
      operands(s, a, desc, m0, m1, true);
      int(&lo)[kHalf] = *reinterpret_cast<int(*)[kHalf]>(d0);
      int(&hi)[kHalf] = *reinterpret_cast<int(*)[kHalf]>(d0 + kHalf);
#ifndef COMET_WIDE_SKIP_MMA  // experiment switch: the CUDA-core work alone (wrong results)
      wgmma_fence();
      constexpr std::bool_constant<!decltype(first)::value> kAccumulate{};
      mma(kAccumulate, lo, a, s, 0, desc[0]);
#pragma unroll
      for (int k = 1; k < 4; ++k) mma(kAdd, lo, a, s, k, desc[k]);
      mma(kAccumulate, hi, a, s, 0, desc[0] + kHiRows);
#pragma unroll
      for (int k = 1; k < 4; ++k) mma(kAdd, hi, a, s, k, desc[k] + kHiRows);
#else
      (void)lo, (void)hi;
#pragma unroll
      for (int e = 0; e < kAccRegs; ++e) d0[e] ^= static_cast<int>(a[e & 3][(e >> 2) & 3] ^ desc[e & 3]);
#endif
      wgmma_commit();
    };
    // INTS: a span's int32 sum d0 (its wgmma all waited for) into acc, with the span's activation
    // scales from the stage of its last group, the block's i-th (not yet released). (Loaded from
    // global memory here instead, 32 scattered scales per thread, the fold spilled 48 bytes of
    // registers and its loads were the loop's longest stalls: ncu, H100, docs/BENCHMARKS.md
    // "Session 14".)
    auto fold = [&](int i) {
#pragma unroll
      for (int e = 0; e < kAccRegs; ++e) fence_operand(d0[e]);
      const uint32_t base = stage0 + (i % kStages) * static_cast<uint32_t>(sizeof(WideStage)) + as_off;
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j) {
        const float2 as = lds64f(base + 32 * j);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc[4 * j + e] = fmaf(static_cast<float>(d0[4 * j + e]), ((e & 1) ? as.y : as.x) * sw[e >> 1], acc[4 * j + e]);
      }
    };
    // A segment's groups from the block's i-th on: the 8-bit ones (all, without INTS) rescaled one
    // by one; then (INTS) each span's 4-bit ones summed in d0 with two groups in flight per
    // warpgroup, and the span folded. Returns the next i. Structured loops only: the compiler
    // serializes wgmma it cannot prove warpgroup-uniform.
    //
    // The two groups in flight read their A fragments from registers until they complete, so
    // they alternate between two fragment arrays, fa and fb, and the loop is unrolled by two so
    // that each array is its own set of registers: a group's fragments are built only after the
    // wait that completed the last group to use the same array. (Built into one array while the
    // previous group still ran, they overwrote its fragments: wrong results, H100, session 11.)
    [[maybe_unused]] uint32_t fa[4][4], fb[4][4];
    [[maybe_unused]] constexpr std::true_type kFirst{};
    [[maybe_unused]] constexpr std::false_type kNext{};
    // COMET_WIDE_PIPELINE=1 (default) or 2: the rescaled groups [g, end) pipelined by token
    // halves instead of group() one by one, which waits for both halves of a group before it
    // issues the next, so that the tensor cores idle through the second half's rescale and the
    // next group's operands (group() stays for the 192-token free-scale kernel and
    // COMET_WIDE_PIPELINE=0). Pipelined, a group's first half is
    // rescaled while its second half runs, and its second half while the next group's first half
    // runs. 1: one fragment array (the next group's built after its last user is waited for: the
    // registers of group()); 2: two, fa and fb alternating as in the integer loop, the next
    // group's built while the second half runs (free scales only: the integer kernels spill with
    // it, 340 bytes at 128 tokens, and run 1).
    auto prep = [&](int i, int g, uint32_t (&a)[4][4], __half2& ws) {
      const int s = i % kStages;
      ws = __halves2half2(ws_row[0][g], ws_row[1][g]);
      mbar_wait(&full[s], (i / kStages) & 1);
      uint64_t desc[4];
      operands(s, a, desc, 16, 16, false);
    };
    auto issue_half = [&](auto hi, int i, const uint32_t (&a)[4][4]) {
      const int s = i % kStages;
      int(&dh)[kHalf] = *reinterpret_cast<int(*)[kHalf]>(d0 + (decltype(hi)::value ? kHalf : 0));
      const uint64_t desc = desc0 + ((s * sizeof(WideStage)) >> 4) + (decltype(hi)::value ? kHiRows : 0);
      wgmma_fence();
      mma(kFresh, dh, a, s, 0, desc);
#pragma unroll
      for (int k = 1; k < 4; ++k) mma(kAdd, dh, a, s, k, desc + 2 * k);
      wgmma_commit();
    };
    [[maybe_unused]] constexpr std::false_type kLo{};
    [[maybe_unused]] constexpr std::true_type kHi{};
    auto launch = [&](int i, int g, uint32_t (&a)[4][4], __half2& ws) {  // a run's first group, both halves
      prep(i, g, a, ws);
      issue_half(kLo, i, a);
      issue_half(kHi, i, a);
    };
    // 1: one array.
    // Group i (fragments a, scales ws) has both halves in flight: rescale its first half while
    // its second half runs, then build group i + 1's fragments in a (group i's last use of them
    // is waited for first) and rescale group i's second half while i + 1's first half runs.
    // (ptxas is particular about this loop's shape. Written as a for loop with the wait at its
    // top, or with the last-group test at the top and `drain` below for the last group, it
    // serialized every wgmma of the kernel, C7514. This form compiles clean.)
    auto rescaled_run1 = [&](int& i, int& g, int end) {
      if (g >= end) return;
      __half2 ws, wn;
      launch(i, g, fa, ws);
      while (true) {
        wgmma_wait<1>();
        rescale(i, d0, ws, 0, kTokenTiles / 2, false);
        wgmma_wait<0>();
        if (g + 1 >= end) {
          rescale(i, d0, ws, kTokenTiles / 2, kTokenTiles);
          break;
        }
        prep(i + 1, g + 1, fa, wn);
        issue_half(kLo, i + 1, fa);
        rescale(i, d0, ws, kTokenTiles / 2, kTokenTiles);
        issue_half(kHi, i + 1, fa);
        ws = wn;
        ++i, ++g;
      }
      ++i, ++g;
    };
    // 2: two arrays.
    // Group i (fragments cur, scales wc) has both halves in flight: rescale it while group i + 1
    // (into nxt, scales wn) is issued half by half.
    auto hop = [&](int i, int g, uint32_t (&cur)[4][4], __half2 wc, uint32_t (&nxt)[4][4], __half2& wn) {
      wgmma_wait<1>();
      rescale(i, d0, wc, 0, kTokenTiles / 2, false);
      prep(i + 1, g + 1, nxt, wn);
      issue_half(kLo, i + 1, nxt);
      wgmma_wait<1>();
      rescale(i, d0, wc, kTokenTiles / 2, kTokenTiles);
      issue_half(kHi, i + 1, nxt);
    };
    auto drain = [&](int i, __half2 wc) {
      wgmma_wait<1>();
      rescale(i, d0, wc, 0, kTokenTiles / 2, false);
      wgmma_wait<0>();
      rescale(i, d0, wc, kTokenTiles / 2, kTokenTiles);
    };
    auto rescaled_run2 = [&](int& i, int& g, int end) {
      if (g >= end) return;
      __half2 wsa, wsb;
      launch(i, g, fa, wsa);
      while (true) {  // group i in flight on fa
        if (g + 1 >= end) {
          drain(i, wsa);
          break;
        }
        hop(i, g, fa, wsa, fb, wsb);
        ++i, ++g;
        if (g + 1 >= end) {  // group i in flight on fb
          drain(i, wsb);
          break;
        }
        hop(i, g, fb, wsb, fa, wsa);
        ++i, ++g;
      }
      ++i, ++g;
    };
    auto run = [&](int i, const WideSegment& sg) {
      int g = sg.g0;
      // (a8_runs: none; the 8-bit groups are integer runs of their own, below.)
      const int rescaled_end = !INTS ? sg.g1 : a8_runs ? sg.g0 : min(sg.g1, max(sg.g0, groups8));
      // (192-token free scales stay on group(): pipelined they spill 52 bytes.)
      constexpr int kPipe = !COMET_WIDE_PIPELINE || (!INTS && TOKENS > 128) ? 0 : COMET_WIDE_PIPELINE == 2 && !INTS ? 2 : 1;
      if constexpr (kPipe == 2) rescaled_run2(i, g, rescaled_end);
      else if constexpr (kPipe == 1) rescaled_run1(i, g, rescaled_end);
      else for (; g < rescaled_end; ++g, ++i) group(i, g);
      if constexpr (INTS) {
        while (g < sg.g1) {
          const int span = g / kSpanGroups;
          // a8_runs: a span's 8-bit groups (the row's first) are a run of their own, folded with
          // their shared scale (the stage of the run's last group carries it: row g of scales_t).
          const int span_end = min(min(sg.g1, (span + 1) * kSpanGroups), g < groups8 ? groups8 : sg.g1);
          issue_int(kFirst, i++, g++, fa);  // in flight: one group, on fa
#ifdef COMET_INTS_ONE_IN_FLIGHT  // experiment switch: session 11's loop, each group waited for alone
          for (; g < span_end; ++g, ++i) {
            wgmma_wait<0>();
            release(i - 1);
            issue_int(kNext, i, g, fa);
          }
#endif
          for (; g + 1 < span_end; g += 2, i += 2) {
            issue_int(kNext, i, g, fb);
            wgmma_wait<1>();  // group i - 1 (fa) done
            release(i - 1);
            issue_int(kNext, i + 1, g + 1, fa);
            wgmma_wait<1>();  // group i (fb) done
            release(i);
          }
          if (g < span_end) {
            issue_int(kNext, i, g, fb);
            wgmma_wait<1>();
            release(i - 1);
            ++i, ++g;
          }
          wgmma_wait<0>();
          fold(i - 1);
          release_reads(i - 1);
        }
      }
      return i;
    };
    // A whole tile into out, two adjacent channels per store: a thread holds channels r and
    // r + 8 of tokens 2 * tig + {0, 1} (+ 8j), and trades one of each pair with its neighbour
    // row (lane ^ 4: channel r ^ 1), so that an even row keeps token 2 * tig, an odd one token
    // 2 * tig + 1, both with channels (r & ~1, r | 1). With the dtype and the bounds checks out of
    // the loop this is ~5x fewer instructions than a store per element (SASS).
    auto store_pairs = [&](const WideSegment& sg, auto* o) {
      const int odd = gid & 1;
      const size_t base = static_cast<size_t>(sg.m0 + 2 * tig + odd) * N + (sg.n0 + r - odd);
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float v0 = acc[4 * j + 2 * c], v1 = acc[4 * j + 2 * c + 1];
          const float got = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
          detail::store_out2(o, base + static_cast<size_t>(8 * j) * N + 8 * c, odd ? got : v0, odd ? v1 : got);
        }
      }
    };
    auto store = [&](const WideSegment& sg) {
#ifndef COMET_WIDE_SIMPLE_STORE  // experiment switch: every tile stored element by element
      if ((STREAMK || split_k == 1) && sg.m0 + kWideM <= M && sg.n0 + kWideN <= N && N % 2 == 0) {
        if (out_dtype == DType::kHalf) store_pairs(sg, static_cast<__half*>(out));
        else if (out_dtype == DType::kBFloat16) store_pairs(sg, static_cast<__nv_bfloat16*>(out));
        else store_pairs(sg, static_cast<float*>(out));
        return;
      }
#endif
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = sg.m0 + 8 * j + 2 * tig + (e & 1), n = sg.n0 + r + 8 * (e >> 1);
          if (m >= M || n >= N) continue;
          const size_t idx = static_cast<size_t>(m) * N + n;
          if (!STREAMK && split_k > 1) atomicAdd(workspace + idx, acc[4 * j + e]);
          else store_out(out, out_dtype, idx, acc[4 * j + e]);
        }
      }
    };
    if constexpr (!STREAMK) {  // the block's tiles, or splits of them: plain loops, as the producer's
      for (int l = blockIdx.x, i = 0; l < tiles; l += gridDim.x) {
        int begin, end;
        range(l, begin, end);
        const WideSegment sg = wide_segment<TOKENS>(begin, end, G, tiles_n);
        start(sg);
        i = run(i, sg);
        store(sg);
      }
    } else {  // stream-K: segments of whole tiles and parts of tiles
      for (int k = 0, i = 0, it = 0, end = 0; k < n_ranges || it < end;) {
        if (it >= end) {  // the block's next range
          range(k++, it, end);
          continue;
        }
        const WideSegment sg = wide_segment<TOKENS>(it, end, G, tiles_n);
        start(sg);
        i = run(i, sg);
        it += sg.g1 - sg.g0;
#ifndef COMET_SK_NO_FIXUP  // experiment switch: cut tiles store their partial sums (wrong results)
        if constexpr (STREAMK) {
#else
        if constexpr (false) {
#endif
          if (sg.g0 > 0 || sg.g1 < G) {  // a tile cut between blocks
            const int ct = threadIdx.x - 128;  // consumer thread 0 .. 255
            float* slots = workspace;        // [blocks][kAccRegs][256] partial sums
            auto* flags =
                reinterpret_cast<unsigned long long*>(workspace + static_cast<size_t>(gridDim.x) * kAccRegs * 256);
            if (sg.g0 > 0) {  // not the tile's head: publish the partial sums to its owner, go on
              float* slot = slots + static_cast<size_t>(blockIdx.x) * kAccRegs * 256 + ct;
#pragma unroll
              for (int e = 0; e < kAccRegs; ++e) __stcg(slot + 256 * e, acc[e]);
              consumer_barrier();  // every thread's stores, then one release (cumulative over them)
              if (ct == 0) store_release(flags + blockIdx.x, nonce);
              __syncwarp();
              continue;
            }
            // The head: add the partial sums of the next blocks whose first segment is this tile's rest.
            const int tile_end = it - sg.g1 + G - sk_base;  // in the shared iterations
            for (int c = blockIdx.x + 1;
                 c < static_cast<int>(gridDim.x) && sk_begin(c, sk_total, gridDim.x) < tile_end; ++c) {
              // The first consumer warp waits, all its lanes on one load, so that it stays converged:
              // bar.sync counts a warp as arrived when its first threads reach it, so one lane
              // spinning alone while the rest of its warp went on would break the barrier.
              if (ct < 32) {
                while (load_acquire(flags + c) != nonce) __nanosleep(20);
                __syncwarp();
                if (ct == 0) flags[c] = 0;  // consumed: the next launch on this workspace starts clear
                __syncwarp();
              }
              consumer_barrier();
              const float* slot = slots + static_cast<size_t>(c) * kAccRegs * 256 + ct;
#pragma unroll
              for (int e = 0; e < kAccRegs; ++e) acc[e] += __ldcg(slot + 256 * e);
            }
          }
        }
        store(sg);
      }
    }
  }  // consumers
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// The weights expanded for the W8 kernels: w8[n, 128 g + kk] (int8, [N, Kpad]) is the value the
// weight fragments of the packed kernel give k position kk of group g (weight_fragments: code *
// 16; weight_fragments_int for the integer groups, INTS and g >= groups8: code * m), in the k
// order those fragments produce (and the wide activations use): fragment register j of k32 step
// k of thread tig covers positions 32k + 16 * (j >= 2) + 4 tig + 0..3, from packed bytes 16 tig +
// 4k + 0..3 (low nibbles, then high). One thread per (row, group, k32 step): four 4-byte loads, two
// 16-byte stores.
__global__ void expand_weights_kernel(const uint8_t* __restrict__ qweight, const __half* __restrict__ wscale,
                                      const __half* __restrict__ wscale_row, int groups8, int8_t* __restrict__ w8,
                                      int N, int G) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(N) * G * 4) return;
  const int k = static_cast<int>(idx & 3);
  const long long ng = idx >> 2;  // n * G + g
  const int n = static_cast<int>(ng / G), g = static_cast<int>(ng - static_cast<long long>(n) * G);
  uint32_t m = 16;
  if (wscale_row && g >= groups8)  // as the packed kernel computes it (inv_sw, then the rounding)
    m = __float2uint_rn(__half2float(wscale[ng]) * __fdiv_rn(1.f, __half2float(wscale_row[n])));
  const uint32_t c = (128u - 8u * m) * 0x01010101u;
  const uint8_t* src = qweight + ng * (kGroup / 2) + 4 * k;
  uint32_t lo[4], hi[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t x = *reinterpret_cast<const uint32_t*>(src + 16 * t) ^ 0x88888888u;
    lo[t] = sm90::times_mult(x & 0x0F0F0F0Fu, m, c);
    hi[t] = sm90::times_mult((x >> 4) & 0x0F0F0F0Fu, m, c);
  }
  uint4* dst = reinterpret_cast<uint4*>(w8 + ng * kGroup + 32 * k);
  dst[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  dst[1] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

// cuTensorMapEncodeTiled from the driver, found through the runtime (no -lcuda at link time).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A 2-D uint8 tensor map: rows x cols bytes (row stride = cols), box box_rows x box_cols.
bool make_map(CUtensorMap* map, const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows,
              uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  const auto encode = encode_tiled();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

namespace {

int wide_split_for(int tokens, int M, int N, int Kpad, int num_sms) {
  const int tiles = ((M + tokens - 1) / tokens) * ((N + kWideN - 1) / kWideN);
  const int G = Kpad / kGroup;
  int split = 1;
  // Split only while the grid stays within half a wave and each split keeps 8+ groups for the
  // ring: the float32 workspace (memset, atomics, conversion) costs more than a partly idle
  // GPU otherwise (measured on H100 at M = 256: 8B qkv, 96 tiles, 0.050 ms split in two vs
  // 0.034 unsplit; 8B down, 64 tiles and 112 groups, 0.071 split vs 0.107).
  while (tiles * split * 2 <= num_sms && G / (split * 2) >= 8) split *= 2;
  return split;
}

// Time per token of a tile, relative to 128 tokens: what does not depend on the token count
// (weight fragments, scales, ring bookkeeping: ~120 of a consumer warp's 311 instructions per
// group at 128 tokens) weighs more on small tiles and less on large. 192: its per-group rescale
// is issued against 1.5x the tensor-core work (H100 sweep of all 8 shapes at M = 256-4096 under
// forced tiles: 0.9 picks a tile within 3% of the faster one in 38 of 40 cases, 4.8% at worst;
// 70B gate+up M = 4096 5.53 -> 5.07 ms). 96: the margin it has needed to win (session 6). 64:
// 195 instructions per group against 96's 247 (SASS), and measured per token 1.11-1.21x 96's on
// the 8 shapes at M = 4096 under forced tiles (H100, session 10), i.e. 1.17-1.28 of 128's, mean
// 1.23. At M <= 64 it does a third less work than a 96-token tile (14-20% faster there).
double tile_time_per_token(int tokens) {
  return tokens == 192 ? 0.9 : tokens == 96 ? 1.0 / 0.95 : tokens == 64 ? 1.23 : 1.0;
}

// Relative time of a token tile size: waves of tiles x tokens per tile x groups per split x the
// tile's time per token (above), plus the split-K reduction at ~11 us per million outputs in the
// same units (fitted to H100 sweeps of every split at M = 128 / 256 / 512, all LLaMA-3-8B / 70B
// shapes: one unit ~ 7.7 ns there).
double wide_cost(int tokens, int M, int N, int Kpad, int num_sms) {
  const double per_token = tile_time_per_token(tokens);
  const int split = wide_split_for(tokens, M, N, Kpad, num_sms);
  const long long tiles = static_cast<long long>((M + tokens - 1) / tokens) * ((N + kWideN - 1) / kWideN) * split;
  const long long waves = (tiles + num_sms - 1) / num_sms;
  const int groups = (Kpad / kGroup + split - 1) / split;
  return static_cast<double>(waves) * tokens * groups * per_token +
         (split > 1 ? 0.0015 * M * static_cast<double>(N) : 0.0);
}

struct StreamKSplit {
  long long dp_tiles;
  int blocks;
};

// Stream-K's split of a grid of `tiles` tiles over `num_sms` blocks: the tiles that go one per
// block (all full waves but one) and the blocks. A small grid takes at most one block per
// kMinShare groups of a tile: the head block of a tile reads the partial sums of every other
// piece one after the other (LLaMA-3-8B's k / v at 64 tokens, 8 tiles of 32 groups on 132
// blocks, cut each tile into 16 pieces and lost 2% of the batch-64 decode step to it).
constexpr int kMinShare = 8;
StreamKSplit stream_k_split(long long tiles, int G, int num_sms) {
  if (tiles <= num_sms)
    return {0, static_cast<int>(std::min<long long>(num_sms, tiles * ((G + kMinShare - 1) / kMinShare)))};
  return {(tiles / num_sms - 1) * num_sms, num_sms};
}

// Relative time of a stream-K launch (same units as wide_cost): the full waves, then the busiest
// block's share of the rest, x tokens x the tile's time per token, plus the fix-up of the tiles
// cut between blocks (their partial sums written and read back through L2), which grows with
// the pieces a tile is cut into. The fix-up constants are fitted to H100 sweeps (builds with
// -DCOMET_SK_NO_FIXUP, docs/BENCHMARKS.md "Session 9").
#ifndef COMET_SK_FIXUP  // fix-up cost per launch with cut tiles and per piece of a cut tile
#define COMET_SK_FIXUP 250
#endif
#ifndef COMET_SK_FIXUP_PIECE
#define COMET_SK_FIXUP_PIECE 100
#endif
double stream_k_cost(int tokens, int M, int N, int Kpad, int num_sms) {
  const double per_token = tile_time_per_token(tokens);
  const int G = Kpad / kGroup;
  const long long tiles = static_cast<long long>((M + tokens - 1) / tokens) * ((N + kWideN - 1) / kWideN);
  const StreamKSplit sp = stream_k_split(tiles, G, num_sms);
  const long long rest = tiles - sp.dp_tiles;
  const long long share = (rest * G + sp.blocks - 1) / sp.blocks;
  const double waves = static_cast<double>(sp.dp_tiles / sp.blocks);
  double cost = (waves * G + static_cast<double>(share)) * tokens * per_token;
  if (rest % sp.blocks) cost += COMET_SK_FIXUP + COMET_SK_FIXUP_PIECE * static_cast<double>((sp.blocks + rest - 1) / rest + 1);
  return cost;
}

// Tokens per block under stream-K: 64, 96 or 128 (192-token tiles use up to R230 of their 240
// registers already; stream-K is for grids whose last wave is far from full, where smaller tiles
// lose little).
int stream_k_tokens(int M, int N, int Kpad, int num_sms) {
#ifdef COMET_WIDE_TOKENS
  if (COMET_WIDE_TOKENS != 192) return COMET_WIDE_TOKENS;
#endif
  int best = 128;
  double best_cost = stream_k_cost(128, M, N, Kpad, num_sms);
  for (int tokens : {96, 64}) {
    const double c = stream_k_cost(tokens, M, N, Kpad, num_sms);
    if (c < best_cost) best = tokens, best_cost = c;
  }
  return best;
}

// Tokens per block: the cheapest of 64, 96, 128 and 192 by the cost model above. Big tiles win where
// the waves are many (large M x N); 96 where it fills the last wave much better and the
// 128-token grid would not split (70B qkv M = 256 in session 6).
int wide_tokens(int M, int N, int Kpad, int num_sms, bool ints) {
#ifdef COMET_WIDE_TOKENS  // experiment switch: one token tile for every M (64, 96, 128 or 192)
  if (!ints || COMET_WIDE_TOKENS <= 128) return COMET_WIDE_TOKENS;
#endif
  int best = 128;
  double best_cost = wide_cost(128, M, N, Kpad, num_sms);
  for (int tokens : {96, 192, 64}) {
    if (ints && tokens > 128) continue;  // see WidePlan (w4ax.h)
    const double c = wide_cost(tokens, M, N, Kpad, num_sms);
    if (c < best_cost) best = tokens, best_cost = c;
  }
  return best;
}

// A 64-bit value no earlier launch in this process used (splitmix64 of a counter), never 0.
unsigned long long next_nonce() {
  static std::atomic<unsigned long long> counter{0};
  unsigned long long z = (counter.fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z ? z : 1;
}

}  // namespace

// Whether the automatic plan runs an unsplit tiled grid persistent (kWidePersistent): on at
// most one block per SM, each walking its tiles l = block, + blocks, ..., the next tile's stages
// filling while the consumers fold and store the last. Measured on H100 against one block per
// tile (docs/BENCHMARKS.md, "Session 15"): integer group scales 1.02-1.08x faster on 13 of the
// 24 LLaMA-3 shapes x M = 256 / 1024 / 4096, free scales 1.02-1.08x on 11; no worse than 2-3%
// elsewhere except the grids of under two waves of long tiles (8B down M = 1024: 256 tiles of 112
// groups, 0.96x), where the hardware's dynamic assignment of the second wave to the SMs that
// finish first beats the static one. -DCOMET_WIDE_PERSISTENT=0: never.
#ifndef COMET_WIDE_PERSISTENT
#define COMET_WIDE_PERSISTENT 1
#endif
bool wide_persistent(long long tiles, int G, int num_sms) {
  return COMET_WIDE_PERSISTENT && tiles > num_sms && (tiles >= 2ll * num_sms || G <= 64);
}

// Whether the automatic plan expands the weights to int8 first (WidePlan::expand): from
// COMET_WIDE_EXPAND_MIN_M tokens on, where the expansion pass (1.5 bytes of traffic per weight)
// was to cost less than the fragment arithmetic it saves, which every token tile repeats. It
// does not: on an H100 the expanded GEMM runs at the packed one's speed, so the pass is pure cost
// (1.22-1.30x slower at M = 1024, 1.02-1.12x at 4096: docs/BENCHMARKS.md, "Sessions 17-18").
// Hence opt-in: the automatic plan never expands unless built with e.g.
// -DCOMET_WIDE_EXPAND_MIN_M=1024; expand = 1 forces it.
#ifndef COMET_WIDE_EXPAND_MIN_M
#define COMET_WIDE_EXPAND_MIN_M 2147483647
#endif

WidePlan wide_plan(int M, int N, int Kpad, int split_k, int num_sms, bool ints, int expand) {
  const int G = Kpad / kGroup;
  const bool w8 = expand > 0 || (expand == 0 && M >= COMET_WIDE_EXPAND_MIN_M);
  const auto stream_k = [&] {
    const int tokens = stream_k_tokens(M, N, Kpad, num_sms);
    const long long tiles = static_cast<long long>((M + tokens - 1) / tokens) * ((N + kWideN - 1) / kWideN);
    const StreamKSplit sp = stream_k_split(tiles, G, num_sms);
    return WidePlan{tokens, kWideStreamK, sp.blocks, static_cast<int>(sp.dp_tiles), w8};
  };
  if (split_k == kWideStreamK) return stream_k();
  const int tokens = wide_tokens(M, N, Kpad, num_sms, ints && !w8);
  const int tiles = ((M + tokens - 1) / tokens) * ((N + kWideN - 1) / kWideN);
  const auto tiled = [&](int split, bool persistent = false) {
    split = std::max(1, std::min(split, G));
    return WidePlan{tokens, split, (persistent ? std::min(tiles, num_sms) : tiles) * split, 0, w8};
  };
  if (split_k == kWidePersistent) return tiled(1, true);
  if (split_k >= 1) return tiled(split_k);
  const int split = wide_split_for(tokens, M, N, Kpad, num_sms);
#ifndef COMET_NO_STREAM_K  // experiment switch: the automatic choice never takes stream-K
  // Stream-K where the tiled grid would split K (it measured as fast or faster in all 10 such
  // H100 cases of the sweep), and where the cost model expects it 5% faster: within that margin
  // it lost on the shapes of large K at M >= 256 (70B down M = 256: 152 -> 165 us), where two
  // token tiles of the tiled grid read the same weights at the same time and stream-K's do not.
  const int sk_tokens = stream_k_tokens(M, N, Kpad, num_sms);
  if (split > 1 || stream_k_cost(sk_tokens, M, N, Kpad, num_sms) < 0.95 * wide_cost(tokens, M, N, Kpad, num_sms))
    return stream_k();
#endif
  return tiled(split, split == 1 && wide_persistent(tiles, G, num_sms));
}

size_t wide_workspace_floats(const WidePlan& plan, int M, int N) {
  if (plan.split_k == kWideStreamK)  // a slot of partial sums per block, then a 64-bit flag per block
    return static_cast<size_t>(plan.blocks) * (kWideN * plan.tokens + 2);
  return plan.split_k > 1 ? static_cast<size_t>(M) * N : 0;
}

namespace {

// W8: qweight is the expanded int8 [N, Kpad] (expand_weights_kernel).
template <int TOKENS, bool STREAMK, bool INTS, bool W8>
cudaError_t launch_wide_as(const int8_t* qa, const float* scales_t, int Mpad, const uint8_t* qweight,
                           const void* wscale, const void* wscale_row, int groups8, bool a8_runs, void* out,
                           DType out_dtype, int M, int N, int Kpad, const WidePlan& plan, float* workspace,
                           cudaStream_t stream) {
  CUtensorMap act_map, w_map;
  const bool mapped =
      make_map(&act_map, qa, M, Kpad, TOKENS, kGroup, CU_TENSOR_MAP_SWIZZLE_128B) &&
      (W8 ? make_map(&w_map, qweight, N, Kpad, kWideN, kGroup, CU_TENSOR_MAP_SWIZZLE_128B)
          : make_map(&w_map, qweight, N, Kpad / 2, kWideN, kGroup / 2, CU_TENSOR_MAP_SWIZZLE_NONE));
  if (!mapped) return cudaErrorInvalidValue;
  const auto kernel = w4ax_gemm_wide_kernel<TOKENS, STREAMK, INTS, W8>;
  constexpr size_t kSmem = kWideSmem<TOKENS, W8>;
  cudaError_t e = allow_dynamic_smem(kernel, kSmem);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = STREAMK ? dim3(plan.blocks) : dim3(plan.blocks / plan.split_k, 1, plan.split_k);
  cfg.blockDim = dim3(kWideThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  // Programmatic dependent launch: the blocks may start while the previous kernel in the stream
  // finishes (the kernel waits for it before it reads activations; -DCOMET_NO_PDL: plain launch).
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
#ifndef COMET_NO_PDL
  cfg.attrs = attr;
  cfg.numAttrs = 1;
#endif
  return cudaLaunchKernelEx(&cfg, kernel, act_map, w_map, scales_t, Mpad, static_cast<const __half*>(wscale),
                            static_cast<const __half*>(wscale_row), groups8, a8_runs, out, out_dtype, workspace, M, N,
                            Kpad,
                            plan.split_k, plan.dp_tiles, STREAMK ? next_nonce() : 0ull);
}

// The kernel with integer group scales where wscale_row is given (INTS), the plain one elsewhere;
// on the expanded weights where w8 is given.
template <int TOKENS, bool STREAMK, bool W8>
cudaError_t launch_wide_w(const int8_t* qa, const float* scales_t, int Mpad, const uint8_t* qweight,
                          const void* wscale, const void* wscale_row, int groups8, bool a8_runs, void* out,
                          DType out_dtype, int M, int N, int Kpad, const WidePlan& plan, float* workspace,
                          cudaStream_t stream) {
  if constexpr (TOKENS > 128 && !W8) {  // wide_plan gives integer group scales at most 128-token tiles
    if (wscale_row) return cudaErrorInvalidValue;
  } else if (wscale_row) {
    return launch_wide_as<TOKENS, STREAMK, true, W8>(qa, scales_t, Mpad, qweight, wscale, wscale_row, groups8,
                                                     a8_runs, out, out_dtype, M, N, Kpad, plan, workspace, stream);
  }
  return launch_wide_as<TOKENS, STREAMK, false, W8>(qa, scales_t, Mpad, qweight, wscale, nullptr, 0, false, out,
                                                    out_dtype, M, N, Kpad, plan, workspace, stream);
}
template <int TOKENS, bool STREAMK>
cudaError_t launch_wide(const int8_t* qa, const float* scales_t, int Mpad, const uint8_t* qweight,
                        const void* wscale, const void* wscale_row, int groups8, bool a8_runs, void* out,
                        DType out_dtype, int M, int N, int Kpad, const WidePlan& plan, float* workspace, int8_t* w8,
                        cudaStream_t stream) {
  if (w8)
    return launch_wide_w<TOKENS, STREAMK, true>(qa, scales_t, Mpad, reinterpret_cast<const uint8_t*>(w8), wscale,
                                                wscale_row, groups8, a8_runs, out, out_dtype, M, N, Kpad, plan,
                                                workspace, stream);
  return launch_wide_w<TOKENS, STREAMK, false>(qa, scales_t, Mpad, qweight, wscale, wscale_row, groups8, a8_runs,
                                               out, out_dtype, M, N, Kpad, plan, workspace, stream);
}

}  // namespace

cudaError_t w4ax_gemm_wide_host(const int8_t* qa, const float* scales_t, int Mpad, const uint8_t* qweight,
                                const void* wscale, const void* wscale_row, int groups8, bool a8_spans, void* out,
                                DType out_dtype, int M, int N, int Kpad, int split_k, int expand,
                                float* workspace, int8_t* w8, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool a8_runs = a8_spans && wscale_row != nullptr && groups8 > 0;
  int major = 0, sms = 0;
  cudaError_t e = current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major);
  if (e != cudaSuccess) return e;
  if (major != 9) return cudaErrorNotSupported;
  e = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (e != cudaSuccess) return e;
  const WidePlan plan = wide_plan(M, N, Kpad, split_k, sms, wscale_row != nullptr, expand);
  if (plan.expand) {
    if (!w8) return cudaErrorInvalidValue;
    const int G = Kpad / kGroup;
    const long long threads = static_cast<long long>(N) * G * 4;
    expand_weights_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
        qweight, static_cast<const __half*>(wscale), static_cast<const __half*>(wscale_row), a8_runs ? 0 : groups8, w8,
        N, G);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  } else {
    w8 = nullptr;
  }
  if (plan.split_k > 1) {
    e = cudaMemsetAsync(workspace, 0, sizeof(float) * static_cast<size_t>(M) * N, stream);
    if (e != cudaSuccess) return e;
  }
  auto go = [&](auto tokens, auto streamk) {
    return launch_wide<decltype(tokens)::value, decltype(streamk)::value>(
        qa, scales_t, Mpad, qweight, wscale, wscale_row, groups8, a8_runs, out, out_dtype, M, N, Kpad, plan, workspace,
        w8, stream);
  };
  using std::integral_constant;
  if (plan.split_k == kWideStreamK) {
    constexpr std::true_type kSK{};
    switch (plan.tokens) {
      case 64: return go(integral_constant<int, 64>{}, kSK);
      case 96: return go(integral_constant<int, 96>{}, kSK);
      default: return go(integral_constant<int, 128>{}, kSK);
    }
  }
  constexpr std::false_type kTiled{};
  switch (plan.tokens) {
    case 64: e = go(integral_constant<int, 64>{}, kTiled); break;
    case 96: e = go(integral_constant<int, 96>{}, kTiled); break;
    case 192: e = go(integral_constant<int, 192>{}, kTiled); break;
    default: e = go(integral_constant<int, 128>{}, kTiled);
  }
  if (e != cudaSuccess || plan.split_k == 1) return e;
  return store_split_k_result(workspace, out, out_dtype, static_cast<size_t>(M) * N, stream);
}

}  // namespace comet
