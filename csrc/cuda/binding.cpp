// Torch binding of the SINQ CUDA kernels (built only against a CUDA build of torch).
//
//   torch.ops.sinq_vllm.cuda_gemv(x, qweight, scales_zeros, col_scales, blk, bias,
//                                 nbits, group_size, out_features, split_k) -> Tensor
//
// x [M, K] fp16/bf16 with M <= 16; the other tensors are the resident layout of
// sinq_vllm/kernels/gpu_layout.py. split_k = 0 lets the kernel plan it from the shape.
// TORCH_LIBRARY_FRAGMENT: the CPU extension registers ops in the same namespace. The fake
// (meta) implementation is registered from Python (sinq_vllm/kernels/cuda_backend.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "sinq_cuda.h"

namespace {

torch::Tensor cuda_gemv(const torch::Tensor& x_in, const torch::Tensor& qweight, const torch::Tensor& scales_zeros,
                        const torch::Tensor& col_scales, const torch::Tensor& blk,
                        const std::optional<torch::Tensor>& bias, int64_t nbits, int64_t group_size,
                        int64_t out_features, int64_t split_k) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "sinq cuda_gemv: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "sinq cuda_gemv: activations must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(nbits >= 1 && nbits <= 8, "sinq cuda_gemv: nbits must be in 1..8");
  const int64_t m = x_in.size(0), k = x_in.size(1);
  TORCH_CHECK(m <= sinq_cuda::kGemvMaxM, "sinq cuda_gemv: M must be at most ", sinq_cuda::kGemvMaxM, ", got ", m);
  const int bits = nbits <= 4 ? 4 : 8;
  const int64_t per = 32 / bits;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.size(0) * per == k,
              "sinq cuda_gemv: qweight must be contiguous int32 [K / ", per, ", N_pad]");
  const int64_t n_pad = qweight.size(1);
  TORCH_CHECK(scales_zeros.scalar_type() == at::kHalf && scales_zeros.is_contiguous() && scales_zeros.dim() == 3 &&
                  scales_zeros.size(1) == n_pad && scales_zeros.size(2) == 2 &&
                  scales_zeros.size(0) * group_size == k,
              "sinq cuda_gemv: scales_zeros must be contiguous float16 [K / group, N_pad, 2]");
  TORCH_CHECK(col_scales.scalar_type() == at::kFloat && col_scales.is_contiguous() && col_scales.dim() == 2 &&
                  col_scales.size(1) == k,
              "sinq cuda_gemv: col_scales must be contiguous float32 [S, K]");
  TORCH_CHECK(blk.scalar_type() == at::kInt && blk.is_contiguous() && blk.dim() == 2 && blk.size(1) == 3 &&
                  blk.size(0) > 0 && n_pad % blk.size(0) == 0,
              "sinq cuda_gemv: blk must be contiguous int32 [N_pad / align, 3]");
  for (const torch::Tensor* t : {&qweight, &scales_zeros, &col_scales, &blk}) {
    TORCH_CHECK(t->device() == x_in.device(), "sinq cuda_gemv: all tensors must be on ", x_in.device());
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  torch::Tensor x = x_in;
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    x = x.contiguous();
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 || k % 8 != 0) x = x.clone();
  }
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "sinq cuda_gemv: bias must have out_features elements");
    b = bias->to(x.scalar_type()).contiguous();
  }

  auto out = torch::empty({m, out_features}, x.options());
  sinq_cuda::GemvArgs a;
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  a.scales_zeros = reinterpret_cast<const uint32_t*>(scales_zeros.data_ptr());
  a.col_scales = col_scales.data_ptr<float>();
  a.blk = blk.data_ptr<int32_t>();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(out_features);
  a.k = static_cast<int>(k);
  a.n_pad = static_cast<int>(n_pad);
  a.group_size = static_cast<int>(group_size);
  a.align = static_cast<int>(n_pad / blk.size(0));
  a.bits = bits;
  a.act = x.scalar_type() == at::kHalf ? sinq_cuda::ActType::kFloat16 : sinq_cuda::ActType::kBFloat16;
  const char* why = sinq_cuda::gemv_unsupported_reason(a);
  TORCH_CHECK(why == nullptr, "sinq cuda_gemv: ", why ? why : "");
  if (m == 0 || out_features == 0) return out;

  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  sinq_cuda::plan_split_k(a, static_cast<int>(split_k), num_sms);
  torch::Tensor partials;
  if (a.split_k > 1) {
    partials = torch::empty({a.split_k, m, out_features}, x.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
  }
  const cudaError_t err = sinq_cuda::launch_gemv(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sinq cuda_gemv: launch failed: ", cudaGetErrorString(err));
  return out;
}

int64_t planned_split_k(int64_t m, int64_t n_pad, int64_t k, int64_t group_size, int64_t nbits, int64_t num_sms) {
  sinq_cuda::GemvArgs a;
  a.m = static_cast<int>(m);
  a.n_pad = static_cast<int>(n_pad);
  a.k = static_cast<int>(k);
  a.group_size = static_cast<int>(group_size);
  a.bits = nbits <= 4 ? 4 : 8;
  sinq_cuda::plan_split_k(a, 0, static_cast<int>(num_sms));
  return a.split_k;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinq_vllm, m) {
  m.def(
      "cuda_gemv(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor col_scales, Tensor blk, Tensor? bias, "
      "int nbits, int group_size, int out_features, int split_k=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinq_vllm, CUDA, m) { m.impl("cuda_gemv", &cuda_gemv); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SINQ CUDA kernels (decode GEMV with column scale and float zeros fused, sm_80+)";
  m.def("max_m", []() { return sinq_cuda::kGemvMaxM; }, "largest M the decode kernel takes");
  m.def("planned_split_k", &planned_split_k, "split-K the decode kernel plans for a shape");
}
