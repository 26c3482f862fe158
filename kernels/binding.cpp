// torch binding of the W4Ax kernels: schemas in the `comet` namespace, CUDA implementations
// that check device, dtype, shape and contiguity, then call the pointer-only host API.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "comet: ", what, " failed: ", cudaGetErrorString(e));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, const at::Tensor& perm,
                                                            int64_t groups8, bool rotate) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "comet: x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "comet: x must be float16 or bfloat16");
  check(perm, "perm", at::kInt, 1);
  const int64_t M = x.size(0), K = x.size(1), Kpad = perm.size(0);
  TORCH_CHECK(Kpad % comet::kGroup == 0 && Kpad >= K, "comet: perm length must be a multiple of ",
              comet::kGroup, " and >= K");
  const int64_t G = Kpad / comet::kGroup;
  TORCH_CHECK(groups8 >= 0 && groups8 <= G, "comet: groups8 out of range");
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options();
  at::Tensor q8 = at::empty({M, groups8 * comet::kGroup}, opts.dtype(at::kChar));
  at::Tensor q4 = at::empty({M, (Kpad - groups8 * comet::kGroup) / 2}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({M, G}, opts.dtype(at::kFloat));
  check_cuda(comet::quantize_act_host(x.data_ptr(), to_dtype(x.scalar_type()), perm.data_ptr<int32_t>(),
                                      M, K, Kpad, groups8, rotate, q8.data_ptr<int8_t>(), q4.data_ptr<uint8_t>(),
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
  const int64_t M = ascale.size(0), N = qweight.size(0), Kpad = qweight.size(1) * 2;
  const int64_t G = Kpad / comet::kGroup;
  TORCH_CHECK(Kpad % comet::kGroup == 0, "comet: K must be a multiple of ", comet::kGroup);
  TORCH_CHECK(ascale.size(1) == G && wscale.size(0) == N && wscale.size(1) == G,
              "comet: scale shapes do not match K / ", comet::kGroup, " groups");
  TORCH_CHECK(groups8 >= 0 && groups8 <= G, "comet: groups8 out of range");
  TORCH_CHECK(q8.size(0) == M && q8.size(1) == groups8 * comet::kGroup, "comet: q8 must be [M, groups8*128]");
  TORCH_CHECK(q4.size(0) == M && q4.size(1) * 2 == Kpad - groups8 * comet::kGroup,
              "comet: q4 must be [M, (K - groups8*128)/2]");
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({M, N}, qweight.options().dtype(out_dtype));
  if (split_k <= 0) {
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

}  // namespace

TORCH_LIBRARY(comet, m) {
  m.def("quantize_act(Tensor x, Tensor perm, int groups8, bool rotate=False) -> (Tensor, Tensor, Tensor)");
  m.def("w4ax_gemm(Tensor q8, Tensor q4, Tensor ascale, Tensor qweight, Tensor wscale, int groups8, "
        "int split_k, bool int4_mma, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(comet, CUDA, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("w4ax_gemm", &w4ax_gemm);
}
