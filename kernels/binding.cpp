// torch binding of the W4Ax kernels: schemas in the `comet` namespace, CUDA implementations
// that check device, dtype, shape and contiguity, then call the pointer-only host API.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "kv4.h"
#include "w4ax.h"

namespace {

comet::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return comet::DType::kHalf;
    case at::kBFloat16: return comet::DType::kBFloat16;
    case at::kFloat: return comet::DType::kFloat;
    default: TORCH_CHECK(false, "comet: unsupported dtype ", t, " (use float16, bfloat16 or float32)");
  }
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "comet: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "comet: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "comet: ", name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "comet: ", name, " must be contiguous");
}

// Tensors the kernels read 16 bytes at a time. A contiguous view with an offset (x[1:]) passes
// check() yet would fault on the device with a misaligned address.
void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "comet: ", name,
              " must start at a 16-byte aligned address (it is an offset view: pass ", name, ".clone())");
}

// (The message spells the constants out: formatting comet::kDecodeRing into it crashed the
// process on throw, on the H100 build, torch 2.11 / g++ 13.)
void check_split_k(int64_t split_k, int64_t M) {
  static_assert(comet::kDecodeRing == -1 && comet::kDecodeRows32 == -2 && comet::kRingMaxM == 16,
                "update the message below");
  TORCH_CHECK(split_k >= 0 || ((split_k == comet::kDecodeRing || split_k == comet::kDecodeRows32) &&
                               M <= comet::kRingMaxM),
              "comet: split_k must be >= 0 (0: automatic), or -1 (the decode ring kernel) or -2 (the "
              "32-channel decode kernel) with M <= 16");
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "comet: ", what, " failed: ", cudaGetErrorString(e));
}

// The activation-quantization inputs: x [M, K] fp16/bf16 and perm [Kpad]; returns {M, K, Kpad}.
std::array<int64_t, 3> check_act_input(const at::Tensor& x, const at::Tensor& perm, int64_t groups8) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "comet: x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "comet: x must be float16 or bfloat16");
  check(perm, "perm", at::kInt, 1);
  check_aligned(x, "x");
  check_aligned(perm, "perm");
  const int64_t M = x.size(0), K = x.size(1), Kpad = perm.size(0);
  TORCH_CHECK(Kpad % comet::kGroup == 0 && Kpad >= K, "comet: perm length must be a multiple of ",
              comet::kGroup, " and >= K");
  TORCH_CHECK(groups8 >= 0 && groups8 <= Kpad / comet::kGroup, "comet: groups8 out of range");
  return {M, K, Kpad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, const at::Tensor& perm,
                                                            int64_t groups8, bool rotate, bool int_scales,
                                                            bool a8_spans) {
  const auto [M, K, Kpad] = check_act_input(x, perm, groups8);
  const int64_t G = Kpad / comet::kGroup;
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options();
  at::Tensor q8 = at::empty({M, groups8 * comet::kGroup}, opts.dtype(at::kChar));
  at::Tensor q4 = at::empty({M, (Kpad - groups8 * comet::kGroup) / 2}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({M, G}, opts.dtype(at::kFloat));
  check_cuda(comet::quantize_act_host(x.data_ptr(), to_dtype(x.scalar_type()), perm.data_ptr<int32_t>(),
                                      M, K, Kpad, groups8, rotate, int_scales, a8_spans, q8.data_ptr<int8_t>(),
                                      q4.data_ptr<uint8_t>(),
                                      scales.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
             "quantize_act");
  return {q8, q4, scales};
}

at::Tensor w4ax_gemm(const at::Tensor& q8, const at::Tensor& q4, const at::Tensor& ascale,
                     const at::Tensor& qweight, const at::Tensor& wscale, int64_t groups8, int64_t split_k,
                     bool int4_mma, at::ScalarType out_dtype) {
  check(q8, "q8", at::kChar, 2);
  check(q4, "q4", at::kByte, 2);
  check(ascale, "ascale", at::kFloat, 2);
  check(qweight, "qweight", at::kByte, 2);
  check(wscale, "wscale", at::kHalf, 2);
  check_aligned(q8, "q8");
  check_aligned(q4, "q4");
  check_aligned(qweight, "qweight");
  const int64_t M = ascale.size(0), N = qweight.size(0), Kpad = qweight.size(1) * 2;
  const int64_t G = Kpad / comet::kGroup;
  TORCH_CHECK(Kpad % comet::kGroup == 0, "comet: K must be a multiple of ", comet::kGroup);
  TORCH_CHECK(ascale.size(1) == G && wscale.size(0) == N && wscale.size(1) == G,
              "comet: scale shapes do not match K / ", comet::kGroup, " groups");
  TORCH_CHECK(groups8 >= 0 && groups8 <= G, "comet: groups8 out of range");
  TORCH_CHECK(q8.size(0) == M && q8.size(1) == groups8 * comet::kGroup, "comet: q8 must be [M, groups8*128]");
  TORCH_CHECK(q4.size(0) == M && q4.size(1) * 2 == Kpad - groups8 * comet::kGroup,
              "comet: q4 must be [M, (K - groups8*128)/2]");
  check_split_k(split_k, M);
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  if (split_k == 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    split_k = comet::choose_split_k(M, N, Kpad, sms);
  }
  at::Tensor work = split_k > 1 ? at::empty({M, N}, qweight.options().dtype(at::kFloat)) : at::Tensor();
  check_cuda(comet::w4ax_gemm_host(q8.data_ptr<int8_t>(), q4.data_ptr<uint8_t>(), ascale.data_ptr<float>(),
                                   qweight.data_ptr<uint8_t>(), wscale.data_ptr(), out.data_ptr(),
                                   to_dtype(out_dtype), M, N, Kpad, groups8, split_k, int4_mma,
                                   split_k > 1 ? work.data_ptr<float>() : nullptr,
                                   at::cuda::getCurrentCUDAStream()),
             "w4ax_gemm");
  return out;
}

// Activation quantization into the Hopper GEMM's wide layout (w4ax.h): qa int8 [M, Kpad],
// scales_t float32 [G (+ spans with int_scales), Mpad] with Mpad = M rounded up to 4 (the TMA's
// 16-byte row alignment), padding zero.
int64_t wide_scale_rows(int64_t G, bool int_scales) {
  return G + (int_scales ? (G + comet::kSpanGroups - 1) / comet::kSpanGroups : 0);
}

std::tuple<at::Tensor, at::Tensor> quantize_act_wide(const at::Tensor& x, const at::Tensor& perm, int64_t groups8,
                                                     bool rotate, bool int_scales, bool a8_spans) {
  const auto [M, K, Kpad] = check_act_input(x, perm, groups8);
  const int64_t G = Kpad / comet::kGroup, Mpad = (M + 3) / 4 * 4, rows = wide_scale_rows(G, int_scales);
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options();
  at::Tensor qa = at::empty({M, Kpad}, opts.dtype(at::kChar));
  at::Tensor scales_t = Mpad == M ? at::empty({rows, Mpad}, opts.dtype(at::kFloat))
                                  : at::zeros({rows, Mpad}, opts.dtype(at::kFloat));
  check_cuda(comet::quantize_act_wide_host(x.data_ptr(), to_dtype(x.scalar_type()), perm.data_ptr<int32_t>(), M, K,
                                           Kpad, groups8, rotate, int_scales, a8_spans, qa.data_ptr<int8_t>(),
                                           scales_t.data_ptr<float>(), Mpad, at::cuda::getCurrentCUDAStream()),
             "quantize_act_wide");
  return {qa, scales_t};
}

at::Tensor w4ax_gemm_wide(const at::Tensor& qa, const at::Tensor& scales_t, const at::Tensor& qweight,
                          const at::Tensor& wscale, int64_t split_k, at::ScalarType out_dtype,
                          const c10::optional<at::Tensor>& wscale_row, int64_t groups8, int64_t expand,
                          bool a8_spans) {
  check(qa, "qa", at::kChar, 2);
  check(scales_t, "scales_t", at::kFloat, 2);
  check(qweight, "qweight", at::kByte, 2);
  check(wscale, "wscale", at::kHalf, 2);
  check_aligned(qa, "qa");  // the TMA copies need 16-byte aligned bases
  check_aligned(scales_t, "scales_t");
  check_aligned(qweight, "qweight");
  const int64_t M = qa.size(0), N = qweight.size(0), Kpad = qweight.size(1) * 2;
  const int64_t G = Kpad / comet::kGroup, Mpad = scales_t.size(1);
  TORCH_CHECK(Kpad % comet::kGroup == 0, "comet: K must be a multiple of ", comet::kGroup);
  TORCH_CHECK(qa.size(1) == Kpad, "comet: qa must be [M, K] with the weights' K");
  const bool ints = wscale_row.has_value();
  TORCH_CHECK(scales_t.size(0) == wide_scale_rows(G, ints) && Mpad >= M && Mpad % 4 == 0 && Mpad < M + 4,
              "comet: scales_t must be [K / ", comet::kGroup, ints ? " + spans" : "", ", M rounded up to 4]",
              ints ? " (integer group scales need quantize_act_wide(..., int_scales=True))" : "");
  TORCH_CHECK(wscale.size(0) == N && wscale.size(1) == G, "comet: wscale must be [N, K / ", comet::kGroup, "]");
  if (ints) {
    check(*wscale_row, "wscale_row", at::kHalf, 1);
    TORCH_CHECK(wscale_row->size(0) == N, "comet: wscale_row must be [N]");
    TORCH_CHECK(groups8 >= 0 && groups8 <= G, "comet: groups8 out of range");
  }
  TORCH_CHECK(!a8_spans || ints, "comet: a8_spans needs integer group scales (wscale_row)");
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major == 9, "comet: w4ax_gemm_wide needs an sm_90 GPU");
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  static_assert(comet::kWideStreamK == -1 && comet::kWidePersistent == -2, "update the message below");
  TORCH_CHECK(split_k >= -2, "comet: split_k must be >= 0 (0: automatic), -1 (stream-K) or -2 (persistent tiles)");
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  TORCH_CHECK(expand >= -1 && expand <= 1, "comet: expand must be 0 (automatic), 1 (always) or -1 (never)");
  const comet::WidePlan plan = comet::wide_plan(M, N, Kpad, split_k, sms, ints, static_cast<int>(expand));
  const size_t work_floats = comet::wide_workspace_floats(plan, M, N);
  at::Tensor work = work_floats ? at::empty({static_cast<int64_t>(work_floats)}, qweight.options().dtype(at::kFloat))
                                : at::Tensor();
  // The expanded weights (plan.expand): int8 [N, Kpad], as large as an int8 copy of the matrix.
  at::Tensor w8 = plan.expand ? at::empty({N, Kpad}, qweight.options().dtype(at::kChar)) : at::Tensor();
  check_cuda(comet::w4ax_gemm_wide_host(qa.data_ptr<int8_t>(), scales_t.data_ptr<float>(), Mpad,
                                        qweight.data_ptr<uint8_t>(), wscale.data_ptr(),
                                        ints ? wscale_row->data_ptr() : nullptr, static_cast<int>(groups8), a8_spans,
                                        out.data_ptr(), to_dtype(out_dtype), M, N, Kpad, split_k,
                                        static_cast<int>(expand), work_floats ? work.data_ptr<float>() : nullptr,
                                        plan.expand ? w8.data_ptr<int8_t>() : nullptr,
                                        at::cuda::getCurrentCUDAStream()),
             "w4ax_gemm_wide");
  return out;
}

// The wgmma GEMM's plan for a shape on the current GPU: (tokens per tile, split_k, blocks, tiles
// that stream-K runs one per block before sharing the rest, whether the weights are expanded to
// int8 first: 0 / 1), as w4ax_gemm_wide with this split_k (0: automatic) and expand would take
// them; split_k -1 is stream-K, -2 persistent tiles. For tests and benchmarks. int_scales: the
// plan of integer group scales (wscale_row given).
std::vector<int64_t> wide_tile(int64_t M, int64_t N, int64_t K, int64_t split_k, bool int_scales, int64_t expand) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t Kpad = (K + comet::kGroup - 1) / comet::kGroup * comet::kGroup;
  const comet::WidePlan p = comet::wide_plan(M, N, Kpad, split_k, sms, int_scales, static_cast<int>(expand));
  return {p.tokens, p.split_k, p.blocks, p.dp_tiles, p.expand ? 1 : 0};
}

void check_cache(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const char* what) {
  check(codes, what, at::kByte, 4);
  check(scale, "cache scale", at::kHalf, 3);
  check(zero, "cache zero", at::kHalf, 3);
  TORCH_CHECK(scale.sizes() == codes.sizes().slice(0, 3) && zero.sizes() == scale.sizes(),
              "comet: cache scale/zero must be [B, H, capacity] matching the codes");
}

// A device-side position (CUDA-graph decode): an int32 scalar tensor on the cache's device.
const int* device_int(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->device() == like.device() && t->scalar_type() == at::kInt && t->numel() == 1,
              "comet: ", name, " must be a one-element int32 tensor on the cache's device");
  return t->data_ptr<int32_t>();
}

void kv4_append(const at::Tensor& x, at::Tensor& codes, at::Tensor& scale, at::Tensor& zero, int64_t start,
                const c10::optional<at::Tensor>& start_tensor) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(), "comet: x must be a contiguous [B, H, T, D] CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "comet: x must be float16 or bfloat16");
  check_cache(codes, scale, zero, "cache codes");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "comet: head_dim must be 64, 128 or 256 for the KV4 kernels");
  TORCH_CHECK(codes.size(0) == B && codes.size(1) == H && codes.size(3) * 2 == D, "comet: cache shape does not match x");
  const int* start_dev = device_int(start_tensor, codes, "start_tensor");
  TORCH_CHECK(start_dev || (start >= 0 && start + T <= codes.size(2)), "comet: cache capacity exceeded");
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(comet::kv4_append_host(x.data_ptr(), to_dtype(x.scalar_type()), B, H, T, D, start, start_dev,
                                    codes.size(2), codes.data_ptr<uint8_t>(), scale.data_ptr(), zero.data_ptr(),
                                    at::cuda::getCurrentCUDAStream()),
             "kv4_append");
}

at::Tensor kv4_decode_attention(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                const at::Tensor& v_zero, int64_t length, double scaling,
                                const c10::optional<at::Tensor>& length_tensor) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "comet: q must be a contiguous [B, Hq, D] CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "comet: q must be float16 or bfloat16");
  check_cache(k_codes, k_scale, k_zero, "k codes");
  check_cache(v_codes, v_scale, v_zero, "v codes");
  TORCH_CHECK(k_codes.sizes() == v_codes.sizes(), "comet: K and V caches differ in shape");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), H = k_codes.size(1), C = k_codes.size(2);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "comet: head_dim must be 64, 128 or 256 for the KV4 kernels");
  TORCH_CHECK(k_codes.size(0) == B && k_codes.size(3) * 2 == D && Hq % H == 0, "comet: cache shape does not match q");
  TORCH_CHECK(length >= 1 && length <= C, "comet: length must be in [1, capacity]");
  TORCH_CHECK(Hq / H <= comet::kMaxHeadsPerKv, "comet: at most ", comet::kMaxHeadsPerKv,
              " query heads per KV head for the KV4 decode kernel");
  const int* length_dev = device_int(length_tensor, k_codes, "length_tensor");
  if (length_dev) length = C;  // sized for the capacity; the kernels read the length
  const c10::cuda::CUDAGuard guard(q.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor work = at::empty({comet::kv4_decode_workspace(B, Hq, D, length, H, sms)}, q.options().dtype(at::kFloat));
  at::Tensor out = at::empty_like(q);
  check_cuda(comet::kv4_decode_attention_host(q.data_ptr(), to_dtype(q.scalar_type()), k_codes.data_ptr<uint8_t>(),
                                              k_scale.data_ptr(), k_zero.data_ptr(), v_codes.data_ptr<uint8_t>(),
                                              v_scale.data_ptr(), v_zero.data_ptr(), out.data_ptr(), B, Hq, H, D,
                                              length, length_dev, C, static_cast<float>(scaling),
                                              work.data_ptr<float>(), sms,
                                              at::cuda::getCurrentCUDAStream()),
             "kv4_decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY(comet, m) {
  m.def("quantize_act(Tensor x, Tensor perm, int groups8, bool rotate=False, bool int_scales=False, "
        "bool a8_spans=False) -> (Tensor, Tensor, Tensor)");
  m.def("w4ax_gemm(Tensor q8, Tensor q4, Tensor ascale, Tensor qweight, Tensor wscale, int groups8, "
        "int split_k, bool int4_mma, ScalarType out_dtype) -> Tensor");
  m.def("quantize_act_wide(Tensor x, Tensor perm, int groups8, bool rotate=False, bool int_scales=False, "
        "bool a8_spans=False) -> (Tensor, Tensor)");
  m.def("w4ax_gemm_wide(Tensor qa, Tensor scales_t, Tensor qweight, Tensor wscale, int split_k, "
        "ScalarType out_dtype, Tensor? wscale_row=None, int groups8=0, int expand=0, bool a8_spans=False) -> Tensor");
  m.def("wide_tile(int M, int N, int K, int split_k=0, bool int_scales=False, int expand=0) -> int[]", &wide_tile);
  m.def("kv4_append(Tensor x, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) zero, int start, "
        "Tensor? start_tensor=None) -> ()");
  m.def("kv4_decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, int length, float scaling, Tensor? length_tensor=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("w4ax_gemm", &w4ax_gemm);
  m.impl("quantize_act_wide", &quantize_act_wide);
  m.impl("w4ax_gemm_wide", &w4ax_gemm_wide);
  m.impl("kv4_append", &kv4_append);
  m.impl("kv4_decode_attention", &kv4_decode_attention);
}
