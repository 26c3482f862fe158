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
constexpr int kScoreFloats = 4096;    // shared scores per block: n_rep * chunk <= this
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
__global__ void kv4_append_kernel(const T* __restrict__ x, int rows, int T_, int start, int capacity,
                                  uint8_t* __restrict__ codes, __half* __restrict__ scale,
                                  __half* __restrict__ zero) {
  constexpr int V = D / 32;
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int bh = row / T_, t = row - bh * T_;
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

// Split-sequence decode attention. Block (split, b * H + h) handles the tokens
// [split * chunk, min(length, (split + 1) * chunk)) for the n_rep query heads of KV head h and
// writes unnormalized partial outputs with their running max (log2 domain) and sum.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kv4_decode_split_kernel(const T* __restrict__ q, const uint8_t* __restrict__ kc, const __half* __restrict__ ks,
                        const __half* __restrict__ kz, const uint8_t* __restrict__ vc,
                        const __half* __restrict__ vs, const __half* __restrict__ vz, int H, int n_rep,
                        int length, int capacity, int chunk, float scale_log2, float* __restrict__ part_o,
                        float* __restrict__ part_ml, int B) {
  extern __shared__ float smem[];
  float* qs = smem;                       // [n_rep][D]
  float* qsum = qs + n_rep * D;           // [n_rep]
  float* sc = qsum + n_rep;               // [n_rep][chunk]
  float* ml = sc + n_rep * chunk;         // [n_rep][2]
  float* red = ml + 2 * n_rep;            // [kThreads][8]
  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / H, h = bh - b * H;
  const int t0 = split * chunk;
  const int len = min(chunk, length - t0);
  const int tid = threadIdx.x;
  const int Hq = H * n_rep;

  for (int i = tid; i < n_rep * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    qs[i] = to_float(q[(static_cast<long>(b) * Hq + h * n_rep + r) * D + d]);
  }
  __syncthreads();
  for (int r = tid; r < n_rep; r += kThreads) {
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += qs[r * D + d];
    qsum[r] = s;
  }
  __syncthreads();

  // Scores: one token per thread; K codes unpacked 8 at a time and reused across heads.
  const long base = static_cast<long>(bh) * capacity + t0;
  for (int t = tid; t < len; t += kThreads) {
    const uint4* row = reinterpret_cast<const uint4*>(kc + (base + t) * (D / 2));
    const float s = __half2float(ks[base + t]), z = __half2float(kz[base + t]);
    for (int r0 = 0; r0 < n_rep; r0 += kMaxRep) {
      float acc[kMaxRep];
#pragma unroll
      for (int r = 0; r < kMaxRep; ++r) acc[r] = 0.f;
#pragma unroll
      for (int w16 = 0; w16 < D / 32; ++w16) {
        const uint4 words = row[w16];
        const uint32_t wv[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float c = static_cast<float>((wv[wi] >> (4 * j)) & 15u);
            const int d = w16 * 32 + wi * 8 + j;
#pragma unroll
            for (int r = 0; r < kMaxRep; ++r)
              if (r0 + r < n_rep) acc[r] = fmaf(qs[(r0 + r) * D + d], c, acc[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxRep; ++r)
        if (r0 + r < n_rep) sc[(r0 + r) * chunk + t] = s * (acc[r] - z * qsum[r0 + r]) * scale_log2;
    }
  }
  __syncthreads();

  // Softmax statistics per head: one warp per head.
  const int warp = tid >> 5, lane = tid & 31;
  for (int r = warp; r < n_rep; r += kThreads / 32) {
    float m = -3.4e38f;
    for (int t = lane; t < len; t += 32) m = fmaxf(m, sc[r * chunk + t]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int t = lane; t < len; t += 32) {
      const float p = exp2f(sc[r * chunk + t] - m);
      sc[r * chunk + t] = p;
      l += p;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      ml[2 * r] = m;
      ml[2 * r + 1] = l;
    }
  }
  __syncthreads();

  // P V: a slot is (head r, 8 consecutive dims = one 32-bit word of a V row); P rows of
  // tokens are walked in parallel and reduced through shared memory.
  constexpr int W = D / 8;
  const int slots = n_rep * W;
  const int P = slots <= kThreads ? kThreads / slots : 1;
  for (int sbase = 0; sbase < slots; sbase += kThreads) {
    const int my = slots <= kThreads ? tid % slots : sbase + tid;
    const int roff = slots <= kThreads ? tid / slots : 0;
    const bool active = my < slots && roff < P;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    if (active) {
      const int r = my / W, c = my - r * W;
      const uint32_t* vrow = reinterpret_cast<const uint32_t*>(vc + base * (D / 2)) + c;
      int t = roff;
      // kUnroll independent tokens per iteration: their loads are in flight together (the
      // loop is latency-bound otherwise: one dependent global load per token).
      constexpr int kUnroll = 8;
      for (; t + (kUnroll - 1) * P < len; t += kUnroll * P) {
        uint32_t words[kUnroll];
        float pv[kUnroll], zz[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int tu = t + u * P;
          words[u] = vrow[static_cast<long>(tu) * (D / 8)];
          pv[u] = sc[r * chunk + tu] * __half2float(vs[base + tu]);
          zz[u] = __half2float(vz[base + tu]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            acc[j] = fmaf(pv[u], static_cast<float>((words[u] >> (4 * j)) & 15u) - zz[u], acc[j]);
        }
      }
      for (; t < len; t += P) {
        const uint32_t word = vrow[static_cast<long>(t) * (D / 8)];
        const float pv = sc[r * chunk + t] * __half2float(vs[base + t]);
        const float z = __half2float(vz[base + t]);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(pv, static_cast<float>((word >> (4 * j)) & 15u) - z, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) red[tid * 8 + j] = acc[j];
    __syncthreads();
    if (active && roff == 0) {
      for (int p = 1; p < P; ++p) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += red[(p * slots + my) * 8 + j];
      }
      const int r = my / W, c = my - r * W;
      const long hq = static_cast<long>(b) * Hq + h * n_rep + r;
      float* dst = part_o + (static_cast<long>(split) * B * Hq + hq) * D + c * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = acc[j];
    }
    __syncthreads();
  }
  for (int r = tid; r < n_rep; r += kThreads) {
    const long hq = static_cast<long>(b) * Hq + h * n_rep + r;
    part_ml[(static_cast<long>(split) * B * Hq + hq) * 2] = ml[2 * r];
    part_ml[(static_cast<long>(split) * B * Hq + hq) * 2 + 1] = ml[2 * r + 1];
  }
}

// Merge the splits of one (batch, query head): block of D threads.
template <typename T>
__global__ void kv4_decode_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                          T* __restrict__ out, int rows, int D, int nsplit) {
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
  const int max_chunk = kScoreFloats / n_rep;
  const int want_splits = (4 * num_sms + B * H - 1) / (B * H);
  int chunk = (length + want_splits - 1) / want_splits;
  chunk = chunk < 64 ? 64 : chunk;
  return chunk > max_chunk ? max_chunk : chunk;
}

template <typename T, int D>
cudaError_t launch_decode(const void* q, const uint8_t* kc, const void* ks, const void* kz, const uint8_t* vc,
                          const void* vs, const void* vz, void* out, int B, int Hq, int H, int length,
                          int capacity, float scaling, float* partial, int num_sms, cudaStream_t stream) {
  const int n_rep = Hq / H;
  const int chunk = decode_chunk(B, H, n_rep, length, num_sms);
  const int nsplit = (length + chunk - 1) / chunk;
  float* part_o = partial;
  float* part_ml = partial + static_cast<long>(nsplit) * B * Hq * D;
  const size_t smem = sizeof(float) * (n_rep * D + n_rep + n_rep * chunk + 2 * n_rep + kThreads * 8);
  auto kernel = kv4_decode_split_kernel<T, D>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(nsplit, B * H), kThreads, smem, stream>>>(
      static_cast<const T*>(q), kc, static_cast<const __half*>(ks), static_cast<const __half*>(kz), vc,
      static_cast<const __half*>(vs), static_cast<const __half*>(vz), H, n_rep, length, capacity, chunk,
      scaling * kLog2e, part_o, part_ml, B);
  kv4_decode_combine_kernel<T><<<B * Hq, D, 0, stream>>>(part_o, part_ml, static_cast<T*>(out), B * Hq, D,
                                                         nsplit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_decode(int D, const void* q, const uint8_t* kc, const void* ks, const void* kz,
                            const uint8_t* vc, const void* vs, const void* vz, void* out, int B, int Hq,
                            int H, int length, int capacity, float scaling, float* partial, int num_sms,
                            cudaStream_t stream) {
  switch (D) {
    case 64: return launch_decode<T, 64>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, capacity, scaling,
                                         partial, num_sms, stream);
    case 128: return launch_decode<T, 128>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, capacity,
                                           scaling, partial, num_sms, stream);
    case 256: return launch_decode<T, 256>(q, kc, ks, kz, vc, vs, vz, out, B, Hq, H, length, capacity,
                                           scaling, partial, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dispatch_append(int D, const void* x, int rows, int T_, int start, int capacity, uint8_t* codes,
                            void* scale, void* zero, cudaStream_t stream) {
  const int blocks = (rows * 32 + 255) / 256;
  auto* s = static_cast<__half*>(scale);
  auto* z = static_cast<__half*>(zero);
  switch (D) {
    case 64: kv4_append_kernel<T, 64><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                  capacity, codes, s, z); break;
    case 128: kv4_append_kernel<T, 128><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                    capacity, codes, s, z); break;
    case 256: kv4_append_kernel<T, 256><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x), rows, T_, start,
                                                                    capacity, codes, s, z); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kv4_append_host(const void* x, DType dtype, int B, int H, int T, int D, int start, int capacity,
                            uint8_t* codes, void* scale, void* zero, cudaStream_t stream) {
  if (T <= 0 || start < 0 || start + T > capacity) return cudaErrorInvalidValue;
  const int rows = B * H * T;
  if (dtype == DType::kHalf) return dispatch_append<__half>(D, x, rows, T, start, capacity, codes, scale, zero, stream);
  if (dtype == DType::kBFloat16)
    return dispatch_append<__nv_bfloat16>(D, x, rows, T, start, capacity, codes, scale, zero, stream);
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
                                      int capacity, float scaling, float* partial, int num_sms,
                                      cudaStream_t stream) {
  if (length <= 0 || length > capacity || H <= 0 || Hq % H != 0 || Hq / H > kScoreFloats / 64)
    return cudaErrorInvalidValue;
  if (dtype == DType::kHalf)
    return dispatch_decode<__half>(D, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out, B, Hq, H,
                                   length, capacity, scaling, partial, num_sms, stream);
  if (dtype == DType::kBFloat16)
    return dispatch_decode<__nv_bfloat16>(D, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out, B,
                                          Hq, H, length, capacity, scaling, partial, num_sms, stream);
  return cudaErrorInvalidValue;
}

}  // namespace comet
