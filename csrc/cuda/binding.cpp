// Torch binding of the SINQ CUDA kernels (built only against a CUDA build of torch).
//
//   torch.ops.sinq_vllm.cuda_gemv(x, qweight, scales_zeros, col_scales, blk, counters, codebook, bias,
//                                 nbits, group_size, out_features, split_k) -> Tensor
//   torch.ops.sinq_vllm.cuda_dequant_(out, qweight, scales_zeros, col_scales, codebook,
//                                     nbits, group_size, shard, col0) -> ()
//
// x [M, K] fp16/bf16 with M <= 64; the other tensors are the resident layout of
// sinq_vllm/kernels/gpu_layout.py. split_k = 0 lets the kernel plan it from the shape.
// TORCH_LIBRARY_FRAGMENT: the CPU extension registers ops in the same namespace. The fake
// (meta) implementations are registered from Python (sinq_vllm/kernels/cuda_backend.py).
//
// Only the current stream and the SM count are needed from torch's CUDA side, so only the
// c10/cuda headers are included: ATen/cuda/CUDAContext.h would pull in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a CUDA image need not have (docs/design.md §4.2).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "sinq_cuda.h"

namespace {

int sm_count(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "sinq: cannot read the SM count of CUDA device ", device);
    cache[device] = n;
  }
  return cache[device];
}

int container_bits(int64_t nbits) { return nbits <= 4 ? 4 : 8; }

void check_layout(const char* op, const torch::Tensor& ref, int64_t k, int64_t group_size, int bits,
                  const torch::Tensor& qweight, const torch::Tensor& scales_zeros, const torch::Tensor& col_scales,
                  const std::optional<torch::Tensor>& codebook) {
  const int64_t per = 32 / bits;
  const int64_t rows = ((k + per - 1) / per + 3) / 4 * 4;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.size(0) == rows && qweight.size(1) % 32 == 0,
              op, ": qweight must be contiguous int32 [", rows, ", N_pad] (lane order)");
  const int64_t n_pad = qweight.size(1);
  TORCH_CHECK(group_size > 0 && k % group_size == 0, op, ": group size must divide in_features");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kHalf && scales_zeros.is_contiguous() && scales_zeros.dim() == 3 &&
                  scales_zeros.size(1) == n_pad && scales_zeros.size(2) == 2 && scales_zeros.size(0) * group_size == k,
              op, ": scales_zeros must be contiguous float16 [K / group, N_pad, 2]");
  TORCH_CHECK(col_scales.scalar_type() == at::kHalf && col_scales.is_contiguous() && col_scales.dim() == 2 &&
                  col_scales.size(1) == k,
              op, ": col_scales must be contiguous float16 [S, K]");
  if (codebook.has_value() && codebook->defined()) {
    TORCH_CHECK(codebook->scalar_type() == at::kFloat && codebook->is_contiguous() && codebook->numel() == 16,
                op, ": codebook must be a contiguous float32 table of 16 values");
    TORCH_CHECK(bits == 4, op, ": codebooks need codes of at most 4 bits");
    TORCH_CHECK(codebook->device() == ref.device(), op, ": all tensors must be on ", ref.device());
  }
  for (const torch::Tensor* t : {&qweight, &scales_zeros, &col_scales}) {
    TORCH_CHECK(t->device() == ref.device(), op, ": all tensors must be on ", ref.device());
  }
}

const float* codebook_ptr(const std::optional<torch::Tensor>& codebook) {
  return codebook.has_value() && codebook->defined() ? codebook->data_ptr<float>() : nullptr;
}

torch::Tensor cuda_gemv(const torch::Tensor& x_in, const torch::Tensor& qweight, const torch::Tensor& scales_zeros,
                        const torch::Tensor& col_scales, const torch::Tensor& blk, const torch::Tensor& counters,
                        const std::optional<torch::Tensor>& codebook, const std::optional<torch::Tensor>& bias,
                        int64_t nbits, int64_t group_size, int64_t out_features, int64_t split_k) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "sinq cuda_gemv: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "sinq cuda_gemv: activations must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(nbits >= 1 && nbits <= 8, "sinq cuda_gemv: nbits must be in 1..8");
  const int64_t m = x_in.size(0), k = x_in.size(1);
  TORCH_CHECK(m <= sinq_cuda::kGemvMaxM, "sinq cuda_gemv: M must be at most ", sinq_cuda::kGemvMaxM, ", got ", m);
  const int bits = container_bits(nbits);
  check_layout("sinq cuda_gemv", x_in, k, group_size, bits, qweight, scales_zeros, col_scales, codebook);
  const int64_t n_pad = qweight.size(1);
  TORCH_CHECK(blk.scalar_type() == at::kInt && blk.is_contiguous() && blk.dim() == 2 && blk.size(1) == 3 &&
                  blk.size(0) > 0 && n_pad % blk.size(0) == 0,
              "sinq cuda_gemv: blk must be contiguous int32 [N_pad / align, 3]");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.device() == x_in.device(),
              "sinq cuda_gemv: counters must be a contiguous int32 tensor on ", x_in.device());

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
  a.col_scales = reinterpret_cast<const uint16_t*>(col_scales.data_ptr());
  a.blk = blk.data_ptr<int32_t>();
  a.codebook = codebook_ptr(codebook);
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

  const int device = x.get_device();
  sinq_cuda::plan_split_k(a, static_cast<int>(split_k), sm_count(device), sinq_cuda::gemv_ctas_per_sm(a));
  torch::Tensor workspace, scratch_counters;
  if (a.split_k > 1) {
    workspace = torch::empty({sinq_cuda::gemv_workspace_floats(a)}, x.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
    const int tiles = sinq_cuda::gemv_tiles(a);
    if (counters.numel() >= tiles) {
      a.counters = counters.data_ptr<int32_t>();
    } else {  // a layout from elsewhere with too few counters: a zeroed temporary
      scratch_counters = torch::zeros({tiles}, counters.options());
      a.counters = scratch_counters.data_ptr<int32_t>();
    }
  }
  const cudaError_t err = sinq_cuda::launch_gemv(a, c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == cudaSuccess, "sinq cuda_gemv: launch failed: ", cudaGetErrorString(err));
  return out;
}

void cuda_dequant_(const torch::Tensor& out, const torch::Tensor& qweight, const torch::Tensor& scales_zeros,
                   const torch::Tensor& col_scales, const std::optional<torch::Tensor>& codebook, int64_t nbits,
                   int64_t group_size, int64_t shard, int64_t col0) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.is_contiguous(), "sinq cuda_dequant_: out must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16,
              "sinq cuda_dequant_: out must be float16 or bfloat16, got ", out.scalar_type());
  const int bits = container_bits(nbits);
  const int64_t k = out.size(1);
  check_layout("sinq cuda_dequant_", out, k, group_size, bits, qweight, scales_zeros, col_scales, codebook);
  TORCH_CHECK(shard >= 0 && shard < col_scales.size(0), "sinq cuda_dequant_: shard ", shard, " out of range");
  const c10::cuda::CUDAGuard guard(out.device());
  sinq_cuda::DequantArgs a;
  a.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  a.scales_zeros = reinterpret_cast<const uint32_t*>(scales_zeros.data_ptr());
  a.col_scales = reinterpret_cast<const uint16_t*>(col_scales.data_ptr());
  a.codebook = codebook_ptr(codebook);
  a.out = out.data_ptr();
  a.k = static_cast<int>(k);
  a.n_pad = static_cast<int>(qweight.size(1));
  a.group_size = static_cast<int>(group_size);
  a.bits = bits;
  a.shard = static_cast<int>(shard);
  a.col0 = static_cast<int>(col0);
  a.rows = static_cast<int>(out.size(0));
  a.act = out.scalar_type() == at::kHalf ? sinq_cuda::ActType::kFloat16 : sinq_cuda::ActType::kBFloat16;
  const char* why = sinq_cuda::dequant_unsupported_reason(a);
  TORCH_CHECK(why == nullptr, "sinq cuda_dequant_: ", why ? why : "");
  const cudaError_t err = sinq_cuda::launch_dequant(a, c10::cuda::getCurrentCUDAStream(out.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "sinq cuda_dequant_: launch failed: ", cudaGetErrorString(err));
}

int64_t planned_split_k(int64_t m, int64_t n_pad, int64_t k, int64_t group_size, int64_t nbits, int64_t num_sms,
                        int64_t ctas_per_sm) {
  sinq_cuda::GemvArgs a;
  a.m = static_cast<int>(m);
  a.n_pad = static_cast<int>(n_pad);
  a.k = static_cast<int>(k);
  a.group_size = static_cast<int>(group_size);
  a.bits = container_bits(nbits);
  sinq_cuda::plan_split_k(a, 0, static_cast<int>(num_sms), static_cast<int>(ctas_per_sm));
  return a.split_k;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinq_vllm, m) {
  m.def(
      "cuda_gemv(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor col_scales, Tensor blk, Tensor counters, "
      "Tensor? codebook, Tensor? bias, int nbits, int group_size, int out_features, int split_k=0) -> Tensor");
  m.def(
      "cuda_dequant_(Tensor(a!) out, Tensor qweight, Tensor scales_zeros, Tensor col_scales, Tensor? codebook, "
      "int nbits, int group_size, int shard, int col0) -> ()");
}

TORCH_LIBRARY_IMPL(sinq_vllm, CUDA, m) {
  m.impl("cuda_gemv", &cuda_gemv);
  m.impl("cuda_dequant_", &cuda_dequant_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SINQ CUDA kernels (decode GEMV for M <= 64 and the prefill dequantizer, sm_80+)";
  m.def("max_m", []() { return sinq_cuda::kGemvMaxM; }, "largest M the decode kernel takes");
  m.def("planned_split_k", &planned_split_k, "split-K the decode kernel plans for a shape");
}
