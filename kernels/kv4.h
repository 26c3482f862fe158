// Host API of the 4-bit KV-cache kernels. Plain pointers only (see w4ax.h).
//
// Cache layout, per layer, for K and for V alike (B batch, H KV heads, C capacity, D head dim):
//   codes  [B, H, C, D/2] uint8  asymmetric 4-bit codes of one token's head vector, even d in
//                                the low nibble
//   scale  [B, H, C]      fp16   step of that vector
//   zero   [B, H, C]      fp16   zero point (an integer): value = (code - zero) * scale
// Quantization per vector: lo/hi = min/max over D; scale = fp16 rounded up of
// max((hi - lo) / 15, 1e-4);
// zero = clamp(rint(-lo / scale), -2048, 2048); code = clamp(rint(x / scale) + zero, 0, 15),
// every division IEEE-rounded, so the PyTorch reference reproduces it bit for bit.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "w4ax.h"

namespace comet {

// Query heads per KV head (GQA ratio) the decode attention kernel takes
// (comet_quant/kvcache.py MAX_HEADS_PER_KV).
constexpr int kMaxHeadsPerKv = 16;

// Quantize x [B, H, T, D] (fp16/bf16, contiguous) into cache rows [start, start + T).
// start_dev (nullable): read the start from this device int32 instead (CUDA-graph decode, where
// the position changes between replays); rows that would pass the capacity are not written.
cudaError_t kv4_append_host(const void* x, DType dtype, int B, int H, int T, int D, int start,
                            const int* start_dev, int capacity, uint8_t* codes, void* scale,
                            void* zero, cudaStream_t stream);

// Decode attention of one query token per sequence over the first `length` cached tokens:
//   q [B, Hq, D] fp16/bf16; out [B, Hq, D] same dtype; Hq a multiple of H (GQA);
//   out = softmax(scaling * q K^T) V with K, V dequantized from the cache on the fly.
// Split over the sequence (flash-decoding); `partial` is float32 scratch of
// kv4_decode_workspace(B, Hq, D, length, H) floats. length_dev (nullable): read the length from
// this device int32 (clamped to [1, capacity]); the launch and `partial` are then sized for
// `capacity`, so pass length = capacity.
cudaError_t kv4_decode_attention_host(const void* q, DType dtype, const uint8_t* k_codes,
                                      const void* k_scale, const void* k_zero,
                                      const uint8_t* v_codes, const void* v_scale,
                                      const void* v_zero, void* out, int B, int Hq, int H, int D,
                                      int length, const int* length_dev, int capacity, float scaling,
                                      float* partial, int num_sms, cudaStream_t stream);

long kv4_decode_workspace(int B, int Hq, int D, int length, int H, int num_sms);

}  // namespace comet
