// 4-bit KV cache: quantize-on-append and split-sequence decode attention that reads the packed
// cache directly (dequantization fused into the dot products). Layout and numerics: kv4.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kv4.h"

namespace comet {
namespace {

constexpr float kKvMinScale = 1e-4f;  // fp16-normal floor of a KV step
constexpr float kZeroLimit = 2048.f;  // fp16 holds every integer zero point up to here
constexpr int kThreads = 128;         // decode-attention block
constexpr int kMaxRep = 8;            // query heads per KV head handled per pass
constexpr int kMaxChunk = 256;        // tokens per split: their K and V codes are staged in smem
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One warp per head vector of one token; each lane owns D/32 consecutive values.
template <typename T, int D>
__global__ void kv4_append_kernel(const T* __restrict__ x, int rows, int T_, int start,
                                  const int* __restrict__ start_dev, int capacity, uint8_t* __restrict__ codes,
                                  __half* __restrict__ scale, __half* __restrict__ zero) {
  constexpr int V = D / 32;
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int bh = row / T_, t = row - bh * T_;
  if (start_dev) {  // graph decode: the position lives on the device; past capacity writes nothing
    start = *start_dev;
    if (start < 0 || start + T_ > capacity) return;
  }
  const T* src = x + static_cast<long>(row) * D + lane * V;
  float v[V];
  float lo = 3.4e38f, hi = -3.4e38f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    v[i] = to_float(src[i]);
    lo = fminf(lo, v[i]);
    hi = fmaxf(hi, v[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  const __half s16 = __float2half_ru(fmaxf(__fdiv_rn(hi - lo, 15.f), kKvMinScale));
  const float s = __half2float(s16);
  const float z = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), -kZeroLimit), kZeroLimit);
  const long dst = static_cast<long>(bh) * capacity + start + t;
  uint8_t packed[V / 2];
#pragma unroll
  for (int i = 0; i < V; i += 2) {
    const float c0 = fminf(fmaxf(rintf(__fdiv_rn(v[i], s)) + z, 0.f), 15.f);
    const float c1 = fminf(fmaxf(rintf(__fdiv_rn(v[i + 1], s)) + z, 0.f), 15.f);
    packed[i / 2] = static_cast<uint8_t>(static_cast<int>(c0) | (static_cast<int>(c1) << 4));
  }
  uint8_t* out = codes + dst * (D / 2) + lane * (V / 2);
#pragma unroll
  for (int i = 0; i < V / 2; ++i) out[i] = packed[i];
  if (lane == 0) {
    scale[dst] = s16;
    zero[dst] = __float2half_rn(z);
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
}

// A nibble (0..15) to float with two full-rate integer/float ops instead of a quarter-rate
// I2F: the bits 0x4B000000 | c are the float 2^23 + c.
__device__ __forceinline__ float nib(uint32_t w, int j) {
  return __uint_as_float(((w >> (4 * j)) & 15u) | 0x4B000000u) - 8388608.f;
}

// Two 4-bit codes of a word, nibbles sh / 4 and sh / 4 + 4 (bits sh..sh+3 and sh+16..sh+19),
// as a pair of exact fp16 / bf16 values: the bits 0x6400 | c are the half 1024 + c (0x4300 | c
// the bfloat16 128 + c), so one mask-or and one packed subtraction convert two codes.
template <typename T> struct CodePair;  // the packed pair type and the bits of 1024 / 128, twice
template <> struct CodePair<__half> { using T2 = __half2; static constexpr uint32_t kMagic = 0x64006400u; };
template <> struct CodePair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;
};
template <typename T>
__device__ __forceinline__ uint32_t code_pair(uint32_t w, int sh) {
  using T2 = typename CodePair<T>::T2;
  const uint32_t bits = ((w >> sh) & 0x000F000Fu) | CodePair<T>::kMagic, magic = CodePair<T>::kMagic;
  const T2 v = __hsub2(*reinterpret_cast<const T2*>(&bits), *reinterpret_cast<const T2*>(&magic));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a (16 x 16, row) * b (16 x 8, col), fp32 accumulation.
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                                                const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                              const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                                     const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The first `length` tokens: the argument, or (CUDA-graph decode) the int32 on the device.
__device__ __forceinline__ int cache_length(int length, const int* length_dev, int capacity) {
  return length_dev ? min(max(*length_dev, 1), capacity) : length;
}

// Split-sequence decode attention. Block (split, b * H + h) handles the tokens
// [split * chunk, min(length, (split + 1) * chunk)) for the n_rep query heads of KV head h and
// writes unnormalized partial outputs with their running max (log2 domain) and sum.
//
// The whole chunk of packed K and V is requested at once with cp.async (one latency round), q
// is staged while it lands, and both products run from shared memory: the scores on tensor
// cores (m16n8k16, codes converted to fp16/bf16 exactly), P V on CUDA cores with every V word
// read once for all heads. The dequantization is folded out of the loops:
//   q.k_t  = s_t * (q.c_t - z_t * sum(q))            (one correction per token and head)
//   sum_t p_t v_t = sum_t (p_t s_t) c_t - sum_t p_t s_t z_t   (one correction per head)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kv4_decode_split_kernel(const T* __restrict__ q, const uint8_t* __restrict__ kc, const __half* __restrict__ ks,
                        const __half* __restrict__ kz, const uint8_t* __restrict__ vc,
                        const __half* __restrict__ vs, const __half* __restrict__ vz, int H, int n_rep,
                        int length, const int* __restrict__ length_dev, int capacity, int chunk, float scale_log2,
                        float* __restrict__ part_o, float* __restrict__ part_ml, int B) {
  constexpr int kRow = D / 2 + 16;  // padded code row: a warp's 16-byte reads hit distinct banks
  constexpr int W = D / 8;          // 32-bit words (8 codes) per row
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* kq = smem_raw;                                                // [chunk][kRow]
  uint8_t* vq = kq + chunk * kRow;                                       // [chunk][kRow]
  const int nht = (n_rep + 7) / 8;                                       // 8-head mma tiles
  T* qh = reinterpret_cast<T*>(vq + chunk * kRow);                       // [nht * 8][D], permuted
  float* sc = reinterpret_cast<float*>(qh + nht * 8 * D);                // [n_rep][chunk]
  float* tok = sc + n_rep * chunk;                                       // [4][chunk]: ks kz vs vz
  float* hs = tok + 4 * chunk;                                           // [n_rep][4]: sum q, m, l, zc
  float* red = hs + 4 * n_rep;                                           // [warps][n_rep][D]
  length = cache_length(length, length_dev, capacity);
  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / H, h = bh - b * H;
  const int t0 = split * chunk;
  const int len = min(chunk, length - t0);
  if (len <= 0) return;  // graph decode: splits past the current length (the combine skips them)
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int Hq = H * n_rep;
  const long base = static_cast<long>(bh) * capacity + t0;

  for (int i = tid; i < len * (D / 32); i += kThreads) {
    const int t = i / (D / 32), c = (i % (D / 32)) * 16;
    cp_async16(kq + t * kRow + c, kc + (base + t) * (D / 2) + c);
    cp_async16(vq + t * kRow + c, vc + (base + t) * (D / 2) + c);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  for (int t = tid; t < len; t += kThreads) {
    tok[t] = __half2float(ks[base + t]);
    tok[chunk + t] = __half2float(kz[base + t]);
    tok[2 * chunk + t] = __half2float(vs[base + t]);
    tok[3 * chunk + t] = __half2float(vz[base + t]);
  }
  // q as the B operand of the score mma, in the order the code unpacking produces: within
  // each 8-dim block, dims 0,4,1,5,2,6,3,7 (see below). Heads past n_rep are zeros.
  for (int i = tid; i < nht * 8 * D; i += kThreads) {
    const int r = i / D, d = i - r * D, o = d & 7;
    const T v = r < n_rep ? q[(static_cast<long>(b) * Hq + h * n_rep + r) * D + d] : from_float<T>(0.f);
    qh[r * D + (d & ~7) + (o < 4 ? 2 * o : 2 * (o - 4) + 1)] = v;
  }
  __syncthreads();
  for (int r = warp; r < n_rep; r += kThreads / 32) {
    float sum = 0.f;
    for (int d = lane; d < D; d += 32) sum += to_float(qh[r * D + d]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) hs[4 * r] = sum;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();

  // Scores on tensor cores: S^T[t, r] = codes[t, :] . q[r, :] with m16n8k16 (16 tokens x 8
  // heads per mma, fp32 accumulation of exact products: codes are small integers). Thread
  // (gid, tig) reads word 4s + tig of its token rows (8 codes: dims 32s + 8tig + 0..7) and turns
  // it into four register pairs (n0,n4) (n1,n5) (n2,n6) (n3,n7): the first two feed k-step 2s,
  // the last two k-step 2s + 1; q is stored in the matching order, so the dot product is over
  // the same dims in the same pairs.
  const int ntiles = (len + 15) / 16;
  for (int tile = warp; tile < ntiles; tile += kThreads / 32) {
    const int tt = tile * 16;
    const uint32_t* r0 = reinterpret_cast<const uint32_t*>(kq + (tt + gid) * kRow);
    const uint32_t* r1 = reinterpret_cast<const uint32_t*>(kq + (tt + gid + 8) * kRow);
    for (int ht = 0; ht < nht; ++ht) {
      const T* qrow = qh + (ht * 8 + gid) * D;
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s2 = 0; s2 < D / 32; ++s2) {
        const uint32_t w0 = r0[4 * s2 + tig], w1 = r1[4 * s2 + tig];
        const uint4 qb = *reinterpret_cast<const uint4*>(qrow + 32 * s2 + 8 * tig);
        const uint32_t a0[4] = {code_pair<T>(w0, 0), code_pair<T>(w1, 0), code_pair<T>(w0, 4), code_pair<T>(w1, 4)};
        const uint32_t b0[2] = {qb.x, qb.y};
        mma_16816<T>(c, a0, b0);
        const uint32_t a1[4] = {code_pair<T>(w0, 8), code_pair<T>(w1, 8), code_pair<T>(w0, 12), code_pair<T>(w1, 12)};
        const uint32_t b1[2] = {qb.z, qb.w};
        mma_16816<T>(c, a1, b1);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = tt + gid + 8 * (e >> 1), r = ht * 8 + 2 * tig + (e & 1);
        if (t < len && r < n_rep) sc[r * chunk + t] = tok[t] * (c[e] - tok[chunk + t] * hs[4 * r]) * scale_log2;
      }
    }
  }
  __syncthreads();

  // Softmax statistics per head (one warp per head); sc becomes p_t * vs_t.
  for (int r = warp; r < n_rep; r += kThreads / 32) {
    float m = -3.4e38f;
    for (int t = lane; t < len; t += 32) m = fmaxf(m, sc[r * chunk + t]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f, zc = 0.f;
    for (int t = lane; t < len; t += 32) {
      const float p = exp2f(sc[r * chunk + t] - m);
      const float w = p * tok[2 * chunk + t];
      sc[r * chunk + t] = w;
      l += p;
      zc = fmaf(w, tok[3 * chunk + t], zc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      l += __shfl_xor_sync(0xffffffffu, l, o);
      zc += __shfl_xor_sync(0xffffffffu, zc, o);
    }
    if (lane == 0) {
      hs[4 * r + 1] = m;
      hs[4 * r + 2] = l;
      hs[4 * r + 3] = zc;
    }
  }
  __syncthreads();

  // P V: thread = (token lane p, word c); every V word is read once for all heads.
  constexpr int P = kThreads / W;  // token lanes (W divides kThreads for D <= 256... see host)
  const int c = tid % W, p = tid / W;
  for (int r0 = 0; r0 < n_rep; r0 += kMaxRep) {
    float acc[kMaxRep][8] = {};
    for (int t = p; t < len; t += P) {
      const uint32_t word = reinterpret_cast<const uint32_t*>(vq + t * kRow)[c];
      float cv[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) cv[j] = nib(word, j);
#pragma unroll
      for (int r = 0; r < kMaxRep; ++r) {
        if (r0 + r >= n_rep) break;
        const float w = sc[(r0 + r) * chunk + t];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r][j] = fmaf(w, cv[j], acc[r][j]);
      }
    }
    // Token lanes of one warp share c when W < 32: fold them with shuffles, then across warps.
#pragma unroll
    for (int o = W; o < 32; o <<= 1)
#pragma unroll
      for (int r = 0; r < kMaxRep; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], o);
    if (lane < W) {
#pragma unroll
      for (int r = 0; r < kMaxRep; ++r) {
        if (r0 + r >= n_rep) break;
#pragma unroll
        for (int j = 0; j < 8; ++j) red[(warp * n_rep + r0 + r) * D + c * 8 + j] = acc[r][j];
      }
    }
    __syncthreads();
    const int rn = min(kMaxRep, n_rep - r0);
    for (int i = tid; i < rn * D; i += kThreads) {
      const int r = r0 + i / D, d = i % D;
      float o = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) o += red[(w * n_rep + r) * D + d];
      const long hq = static_cast<long>(b) * Hq + h * n_rep + r;
      part_o[(static_cast<long>(split) * B * Hq + hq) * D + d] = o - hs[4 * r + 3];
    }
    __syncthreads();
  }
  for (int r = tid; r < n_rep; r += kThreads) {
    const long hq = static_cast<long>(b) * Hq + h * n_rep + r;
    part_ml[(static_cast<long>(split) * B * Hq + hq) * 2] = hs[4 * r + 1];
    part_ml[(static_cast<long>(split) * B * Hq + hq) * 2 + 1] = hs[4 * r + 2];
  }
}

// Merge the splits of one (batch, query head): block of D threads.
template <typename T>
__global__ void kv4_decode_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                          T* __restrict__ out, int rows, int D, int nsplit, int chunk,
                                          const int* __restrict__ length_dev, int capacity) {
  if (length_dev) nsplit = min(nsplit, (cache_length(0, length_dev, capacity) + chunk - 1) / chunk);
  const int row = blockIdx.x, d = threadIdx.x;
  float m = -3.4e38f;
  for (int s = 0; s < nsplit; ++s) m = fmaxf(m, part_ml[(static_cast<long>(s) * rows + row) * 2]);
  float l = 0.f, o = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const long i = static_cast<long>(s) * rows + row;
    const float w = exp2f(part_ml[i * 2] - m);
    l += w * part_ml[i * 2 + 1];
    o += w * part_o[i * D + d];
  }
  out[static_cast<long>(row) * D + d] = from_float<T>(o / l);
}

int decode_chunk(int B, int H, int n_rep, int length, int num_sms) {
  const int want_splits = (4 * num_sms + B * H - 1) / (B * H);
  int chunk = (length + want_splits - 1) / want_splits;
  chunk = (chunk + 15) / 16 * 16;  // whole 16-token mma tiles
  chunk = chunk < 64 ? 64 : chunk;
  return chunk > kMaxChunk ? kMaxChunk : chunk;
}

template <int D>
size_t decode_smem(int n_rep, int chunk) {
  const size_t heads_padded = (n_rep + 7) / 8 * 8;
  return 2 * static_cast<size_t>(chunk) * (D / 2 + 16) + 2 * heads_padded * D +
         sizeof(float) * (n_rep * chunk + 4 * chunk + 4 * n_rep + (kThreads / 32) * n_rep * D);
}

template <typename T, int D>
cudaError_t launch_decode(const void* q, const uint8_t* kc, const void* ks, const void* kz, const uint8_t* vc,
                          const void* vs, const void* vz, void* out, int B, int Hq, int H, int length,
                          const int* length_dev, int capacity, float scaling, float* partial, int num_sms,
                          cudaStream_t stream) {
  const int n_rep = Hq / H;
  // With the length on the device, size the launch for the whole capacity (fixed grid, so a
  // captured graph stays valid as the cache grows); blocks past the length exit at once.
  const int span = length_dev ? capacity : length;
  const int chunk = decode_chunk(B, H, n_rep, span, num_sms);
  const int nsplit = (span + chunk - 1) / chunk;
  float* part_o = partial;
  float* part_ml = partial + static_cast<long>(nsplit) * B * Hq * D;
  const size_t smem = decode_smem<D>(n_rep, chunk);
  auto kernel = kv4_decode_split_kernel<T, D>;
  cudaError_t e = allow_dynamic_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(nsplit, B * H), kThreads, smem, stream>>>(
      static_cast<const T*>(q), kc, static_cast<const __half*>(ks), static_cast<const __half*>(kz), vc,
      static_cast<const __half*>(vs), static_cast<const __half*>(vz), H, n_rep, length, length_dev, capacity,
      chunk, scaling * kLog2e, part_o, part_ml, B);
  kv4_decode_combine_kernel<T><<<B * Hq, D, 0, stream>>>(part_o, part_ml, static_cast<T*>(out), B * Hq, D,
                                                         nsplit, chunk, length_dev, capacity);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_decode(int D, const void* q, const uint8_t* kc, const void* ks, const void* kz,
                            const uint8_t* vc, const void* vs, const void* vz, void* out, int B, int Hq,
                            int H, int length, const int* length_dev, int capacity, float scaling, float* partial,
                            int num_sms, cudaStream_t stream) {
  switch (D) {
    case 64: return launch_decode<T, 64>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, length_dev, capacity,
                                         scaling, partial, num_sms, stream);
    case 128: return launch_decode<T, 128>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, length_dev, capacity,
                                           scaling, partial, num_sms, stream);
    case 256: return launch_decode<T, 256>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, length_dev, capacity,
                                           scaling, partial, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dispatch_append(int D, const void* x, int rows, int T_, int start, const int* start_dev, int capacity,
                            uint8_t* codes, void* scale, void* zero, cudaStream_t stream) {
  const int blocks = (rows * 32 + 255) / 256;
  auto* s = static_cast<__half*>(scale);
  auto* z = static_cast<__half*>(zero);
  switch (D) {
    case 64: kv4_append_kernel<T, 64><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                  start_dev, capacity, codes, s, z); break;
    case 128: kv4_append_kernel<T, 128><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                    start_dev, capacity, codes, s, z); break;
    case 256: kv4_append_kernel<T, 256><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                    start_dev, capacity, codes, s, z); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kv4_append_host(const void* x, DType dtype, int B, int H, int T, int D, int start, const int* start_dev,
                            int capacity, uint8_t* codes, void* scale, void* zero, cudaStream_t stream) {
  if (T <= 0 || (!start_dev && (start < 0 || start + T > capacity))) return cudaErrorInvalidValue;
  const int rows = B * H * T;
  if (dtype == DType::kHalf)
    return dispatch_append<__half>(D, x, rows, T, start, start_dev, capacity, codes, scale, zero, stream);
  if (dtype == DType::kBFloat16)
    return dispatch_append<__nv_bfloat16>(D, x, rows, T, start, start_dev, capacity, codes, scale, zero, stream);
  return cudaErrorInvalidValue;
}

long kv4_decode_workspace(int B, int Hq, int D, int length, int H, int num_sms) {
  const int chunk = decode_chunk(B, H, Hq / H, length, num_sms);
  const long nsplit = (length + chunk - 1) / chunk;
  return nsplit * B * Hq * (D + 2);
}

cudaError_t kv4_decode_attention_host(const void* q, DType dtype, const uint8_t* k_codes, const void* k_scale,
                                      const void* k_zero, const uint8_t* v_codes, const void* v_scale,
                                      const void* v_zero, void* out, int B, int Hq, int H, int D, int length,
                                      const int* length_dev, int capacity, float scaling, float* partial,
                                      int num_sms, cudaStream_t stream) {
  if (length <= 0 || length > capacity || H <= 0 || Hq % H != 0 || Hq / H > kMaxHeadsPerKv)
    return cudaErrorInvalidValue;
  if (dtype == DType::kHalf)
    return dispatch_decode<__half>(D, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out, B, Hq, H,
                                   length, length_dev, capacity, scaling, partial, num_sms, stream);
  if (dtype == DType::kBFloat16)
    return dispatch_decode<__nv_bfloat16>(D, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out, B,
                                          Hq, H, length, length_dev, capacity, scaling, partial, num_sms, stream);
  return cudaErrorInvalidValue;
}

}  // namespace comet
