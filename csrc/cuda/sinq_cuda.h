// Host API of the SINQ CUDA kernels (pure CUDA runtime: no torch headers, so the .cu
// files compile with nvcc alone; the torch binding is csrc/cuda/binding.cpp).
//
// Resident layout: sinq_vllm/kernels/gpu_layout.py (shared with the Triton kernels).
//   qweight       uint32 [K / P, N_pad]   P = 32 / bits codes per word along K
//   scales_zeros  half2  [G, N_pad]       (scale, float zero in code units) per group, column
//   col_scales    float  [S, K]           column scale t of each merged shard
//   blk           int32  [N_pad / align, 3]  (shard, first output column, valid columns)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sinq_cuda {

enum class ActType : int { kFloat16 = 0, kBFloat16 = 1 };

// Output columns of one CTA of the decode kernel (4 warps x 2 tiles of 16 columns);
// the layout's `align` must be a multiple of it.
constexpr int kGemvCtaColumns = 128;
// Largest M the decode kernel takes (two m16n8k16 token tiles).
constexpr int kGemvMaxM = 16;

struct GemvArgs {
  const void* x = nullptr;          // [M, K] activations (ActType), rows x_row_stride apart
  int64_t x_row_stride = 0;         // in elements; multiple of 8, base 16-byte aligned
  const uint32_t* qweight = nullptr;
  const uint32_t* scales_zeros = nullptr;
  const float* col_scales = nullptr;
  const int32_t* blk = nullptr;
  const void* bias = nullptr;       // [N] (ActType) or nullptr
  void* out = nullptr;              // [M, N] (ActType), contiguous
  float* partials = nullptr;        // [split_k, M, N] fp32 when split_k > 1
  int m = 0, n = 0, k = 0, n_pad = 0;
  int group_size = 0, align = 0, bits = 4;
  int split_k = 1, k_per_split = 0;  // set by plan_split_k()
  ActType act = ActType::kBFloat16;
};

// Why the decode kernel cannot run these arguments (nullptr: it can).
const char* gemv_unsupported_reason(const GemvArgs& a);

// Split-K plan for the decode kernel: fills a.split_k and a.k_per_split. requested > 0
// forces that many splits (rounded to whole groups); 0 chooses from the shape and SM count.
void plan_split_k(GemvArgs& a, int requested, int num_sms);

// Launch the decode kernel (and, when split_k > 1, the fixed-order reduction that adds the
// bias and casts). Returns the launch error, if any.
cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream);

}  // namespace sinq_cuda
