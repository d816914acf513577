// Host API of the SINQ CUDA kernels (pure CUDA runtime: no torch headers, so the .cu
// files compile with nvcc alone; the torch binding is csrc/cuda/binding.cpp).
//
// Resident layout: sinq_vllm/kernels/gpu_layout.py (shared with the Triton kernels),
// docs/design.md §4.3.
//   qweight       uint32 [W_pad, N_pad] in lane order: per chunk of 4 word rows and 32
//                 columns, 512 bytes [g 8][j 4][slot 4] (column 32 wt + 8 slot + g, word
//                 row 4 c + j): lane 4 g + j of a warp reads its 4 words in one 16-byte load
//   scales_zeros  half2  [G, N_pad]       (scale, float zero in code units) per group and
//                 column, column 32 wt + 8 slot + g stored at 32 wt + 4 g + slot
//   col_scales    half   [S, K]           column scale t of each merged shard
//   blk           int32  [N_pad / align, 3]  (shard, first output column, valid columns)
//   counters      int32  [>= tiles]       split-K arrival counters, zero between launches
//   codebook      float  [16] or null     NF4/NF3 code values (fp16-rounded), 4-bit codes only
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sinq_cuda {

enum class ActType : int { kFloat16 = 0, kBFloat16 = 1 };

// Output columns of one CTA of the decode kernel (4 warps x 32 columns); the layout's
// `align` must be a multiple of it, so a CTA lies in one merged shard.
constexpr int kGemvCtaColumns = 128;
// Tokens of one CTA (two m16n8k16 token tiles); larger M runs ceil(M / 16) token blocks
// side by side, which read the same weights while they are in L2.
constexpr int kGemvTokenBlock = 16;
// Largest M the decode kernel takes.
constexpr int kGemvMaxM = 64;

struct GemvArgs {
  const void* x = nullptr;            // [M, K] activations (ActType), rows x_row_stride apart
  int64_t x_row_stride = 0;           // in elements; multiple of 8, base 16-byte aligned
  const uint32_t* qweight = nullptr;
  const uint32_t* scales_zeros = nullptr;
  const uint16_t* col_scales = nullptr;  // fp16 bits
  const int32_t* blk = nullptr;
  const float* codebook = nullptr;    // 16 values or nullptr (uniform codes)
  const void* bias = nullptr;         // [N] (ActType) or nullptr
  void* out = nullptr;                // [M, N] (ActType), contiguous
  float* workspace = nullptr;         // gemv_workspace_floats() floats when split_k > 1
  int32_t* counters = nullptr;        // >= gemv_tiles() zeroed ints when split_k > 1
  int m = 0, n = 0, k = 0, n_pad = 0;
  int group_size = 0, align = 0, bits = 4;
  int split_k = 1, k_per_split = 0;   // set by plan_split_k()
  ActType act = ActType::kBFloat16;
};

// Why the decode kernel cannot run these arguments (nullptr: it can).
const char* gemv_unsupported_reason(const GemvArgs& a);

// Output tiles (CTAs per split) and split-K scratch of a planned launch.
int gemv_tiles(const GemvArgs& a);
int64_t gemv_workspace_floats(const GemvArgs& a);

// Resident CTAs per SM of the kernel variant these arguments select (occupancy API; cached).
int gemv_ctas_per_sm(const GemvArgs& a);

// Split-K plan: fills a.split_k and a.k_per_split. requested > 0 forces that many splits
// (rounded to whole groups); 0 plans from the shape so that the grid gives every SM
// ctas_per_sm CTAs (docs/design.md §4.2).
void plan_split_k(GemvArgs& a, int requested, int num_sms, int ctas_per_sm);

// One launch of the decode kernel; with split_k > 1 the last CTA of each tile sums the
// partials in split order and resets its counter. Returns the launch error, if any.
cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream);

// Prefill: the dense weight of one merged shard, (V(Q) - z) * s * t in the activation
// dtype, for torch.matmul (sinq_vllm/kernels/gpu_layout.py prefill_linear).
struct DequantArgs {
  const uint32_t* qweight = nullptr;
  const uint32_t* scales_zeros = nullptr;
  const uint16_t* col_scales = nullptr;
  const float* codebook = nullptr;
  void* out = nullptr;                // [rows, K] (ActType), contiguous
  int k = 0, n_pad = 0, group_size = 0, bits = 4;
  int shard = 0, col0 = 0, rows = 0;  // padded columns [col0, col0 + rows) of shard `shard`
  ActType act = ActType::kBFloat16;
};

const char* dequant_unsupported_reason(const DequantArgs& a);
cudaError_t launch_dequant(const DequantArgs& a, cudaStream_t stream);

}  // namespace sinq_cuda
