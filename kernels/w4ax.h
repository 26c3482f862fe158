// Host API of the W4Ax kernels. Plain pointers and sizes only: no torch types, so the CUDA
// sources compile with nvcc alone (scripts/check_kernels_compile.sh) and the torch binding in
// binding.cpp stays a thin checker.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace comet {

// Channels per quantization group; the GEMM's K tile. The format allows other group sizes,
// the kernels take this one (the Python wrapper falls back to the reference otherwise).
constexpr int kGroup = 128;

// The Hopper GEMM (w4ax_wgmma.cu) takes activations "wide": every group as int8 (4-bit groups
// keep their 4-bit codes, |q| <= 7) with the 128 channels of a group in the order the wgmma
// fragments consume them. Logical channel c of a group sits at position
//   32 * s + 16 * h + 4 * t + b,  where t = c / 32, s = (c / 8) % 4, b = (c / 2) % 4, h = c % 2,
// so that thread t of an mma row reads the 32 weight codes of channels 32t .. 32t + 31 with one
// 16-byte load, and k32 step s takes the low nibbles of word s as fragment bytes 4t..4t+3 and
// the high nibbles as bytes 16 + 4t..: the same positions the activations occupy.
// (comet_quant/ops.py WIDE_ORDER is the inverse table.)
__host__ __device__ constexpr int wide_position(int c) {
  return 32 * ((c >> 3) & 3) + 16 * (c & 1) + 4 * (c >> 5) + ((c >> 1) & 3);
}

// Largest M the decode GEMM kernel takes (four 8-token mma tiles).
constexpr int kDecodeMaxM = 32;
// split_k value selecting the decode GEMM's shared-memory ring kernel (M <= kRingMaxM) whatever
// the matrix size: for tests and benchmarks; the automatic choice takes it for large matrices.
constexpr int kDecodeRing = -1;
constexpr int kRingMaxM = 16;
// split_k value selecting the 32-channel register decode kernel (M <= kRingMaxM; the automatic
// choice takes it at 9-16 tokens on wide grids): for tests and benchmarks.
constexpr int kDecodeRows32 = -2;

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// Opt a kernel into more than 48 KB of dynamic shared memory. Called before every such launch
// (a host-side attribute, cheap, allowed during CUDA-graph capture, and per device, so no cache
// that could go stale on another GPU).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Fused activation quantization (permute + per-token per-group scales + int8/packed int4).
//   x       [M, K] fp16/bf16, row-major, original channel order
//   perm    [Kpad] int32; permuted channel j reads x[:, perm[j]] (perm[j] >= K reads 0)
//   q8      [M, groups8 * kGroup] int8
//   q4      [M, (Kpad - groups8 * kGroup) / 2] uint8, two's complement nibbles, even k low
//   scales  [M, Kpad / kGroup] float32
//   rotate  multiply every permuted group by the orthonormal 128-point Hadamard matrix first
//   int_scales  integer group scales (the scheme's int_group_scales): a 4-bit group's scale is
//           the scale of its span of kSpanGroups groups (the span's largest 4-bit absmax / 112,
//           rounded up to 20 significant bits) times the smallest integer m in [1, 16] that
//           holds the group (primitives.int_token_scales)
//   a8_spans  (the scheme's a8_span_scales) the 8-bit groups of each span share one scale, their
//           largest absmax / 127 (primitives.shared_span_scales), stored as each one's scale
cudaError_t quantize_act_host(const void* x, DType x_dtype, const int32_t* perm, int M, int K,
                              int Kpad, int groups8, bool rotate, bool int_scales, bool a8_spans, int8_t* q8,
                              uint8_t* q4, float* scales, cudaStream_t stream);

// Activation quantization into the wide layout (see wide_position): qa [M, Kpad] int8,
// scales_t [G, Mpad] float32 (Mpad >= M, a multiple of 4; columns past M are not written).
// With int_scales the 4-bit groups hold code * m and scales_t is [G + spans, Mpad]: row G + s
// the scale of span s (spans = ceil(G / kSpanGroups)).
cudaError_t quantize_act_wide_host(const void* x, DType x_dtype, const int32_t* perm, int M, int K,
                                   int Kpad, int groups8, bool rotate, bool int_scales, bool a8_spans, int8_t* qa,
                                   float* scales_t, int Mpad, cudaStream_t stream);
constexpr int kSpanGroups = 16;  // groups per span of integer group scales (primitives.SCALE_SPAN)

// Mixed-precision GEMM: out[M, N] = sum_g ascale[m, g] * wscale[n, g] * <a[m, g], w[n, g]>,
// where a is int8 (g < groups8) or int4 (g >= groups8) and w is int4 (checkpoint layout:
// qweight [N, Kpad / 2] uint8, even k in the low nibble; wscale [N, Kpad / kGroup] fp16).
// split_k == 0 (M <= kDecodeMaxM only) runs a decode kernel: whole K per block, no workspace,
// weights streamed from global memory into registers, or, for M <= 8 and large matrices,
// through a shared-memory ring (split_k == kDecodeRing forces that one), or at 9-16 tokens with
// 32 channels per block (split_k == kDecodeRows32 forces that one). split_k >= 1 runs the
// tiled kernel; split_k > 1 splits the K groups over blocks and reduces through `workspace`
// (float32 [M, N], zeroed by the callee) for shapes whose tiles do not fill the GPU.
// use_int4_mma selects int4 tensor cores for A4 groups (sm_80/86/89; emulated on sm_90).
cudaError_t w4ax_gemm_host(const int8_t* q8, const uint8_t* q4, const float* ascale,
                           const uint8_t* qweight, const void* wscale, void* out, DType out_dtype,
                           int M, int N, int Kpad, int groups8, int split_k, bool use_int4_mma,
                           float* workspace, cudaStream_t stream);

// The kernel choice for split_k = "auto": 0 (decode kernel) for M <= 16, and for M <= kDecodeMaxM
// on shapes where it measured faster; else a split_k that fills `num_sms` multiprocessors with
// the tiled kernel (1 when its tiles already do).
int choose_split_k(int M, int N, int Kpad, int num_sms);

// The Hopper (sm_90a) GEMM on wide activations: out[M, N] = sum_g scales_t[g, m] * wscale[n, g]
// * <qa[m, g], w[n, g]>, with 128-channel x 64-, 96-, 128- or 192-token tiles on wgmma (by a wave cost
// model: wide_plan), operands staged by the tensor memory accelerator. split_k: 0 picks (wide_plan);
// 1 one block per tile; > 1 splits the K groups over blocks and reduces through `workspace`
// (float32 [M, N]); kWideStreamK runs stream-K: one block per SM, each an equal share of the
// tiles x K groups, tiles cut between blocks finished through `workspace`; kWidePersistent
// runs whole tiles on at most one block per SM. The workspace holds wide_workspace_floats(plan)
// floats (none needs clearing). Returns cudaErrorNotSupported off sm_90.
// Integer group scales (wscale_row non-null: fp16 [N], every wscale[n, g] = wscale_row[n] * an
// integer in [1, 16]; activations from quantize_act_wide with int_scales): the 4-bit groups (from
// groups8 on) of each span are summed in int32 and scaled once per span. a8_spans (with
// wscale_row; activations from quantize_act_wide with a8_spans): the 8-bit groups of each span
// share one activation scale per token, and are summed in int32 and scaled once too.
// expand: 0 automatic (wide_plan), 1 always, -1 never: the weights are first expanded to int8
// into w8 (int8 [N, Kpad], needed where wide_plan(...).expand), and wgmma reads them from
// shared memory instead of every token tile building them in registers.
cudaError_t w4ax_gemm_wide_host(const int8_t* qa, const float* scales_t, int Mpad, const uint8_t* qweight,
                                const void* wscale, const void* wscale_row, int groups8, bool a8_spans, void* out,
                                DType out_dtype, int M, int N, int Kpad, int split_k, int expand,
                                float* workspace, int8_t* w8, cudaStream_t stream);

constexpr int kWideStreamK = -1;
// split_k value selecting the tiled grid without split, persistent: min(tiles, num_sms) blocks,
// each walking the tiles l = block, block + blocks, ... with its TMA ring running on from one
// tile into the next while the consumers fold and store the last.
constexpr int kWidePersistent = -2;
// What the wide GEMM runs for a shape on `num_sms` multiprocessors: tokens per tile (64, 96, 128 or
// 192), split_k (1, > 1, or kWideStreamK), the number of blocks (a persistent grid: fewer than
// the tiles) and, for stream-K, the tiles that go one per block before the rest is shared.
// split_k as requested (0: the cheapest by the cost model: stream-K where the tiles leave much
// of the last wave idle). Integer group scales
// (`ints`) take 192-token tiles only on expanded weights: two groups in flight need 32 fragment
// registers more, and the 192-token kernel then spills. expand: whether the weights are expanded
// to int8 first (the request as w4ax_gemm_wide_host's `expand`).
struct WidePlan {
  int tokens, split_k, blocks, dp_tiles;
  bool expand;
};
WidePlan wide_plan(int M, int N, int Kpad, int split_k, int num_sms, bool ints = false, int expand = 0);
// float32 elements of workspace that plan needs (0 for none).
size_t wide_workspace_floats(const WidePlan& plan, int M, int N);

// The last step of a split-K GEMM: the float32 workspace [n] -> out (fp16 / bf16 / fp32).
cudaError_t store_split_k_result(const float* workspace, void* out, DType out_dtype, size_t n,
                                 cudaStream_t stream);

}  // namespace comet
