// Row and column standard deviations of the Sinkhorn iterate, for the quantizer
// (sinq_vllm/quantizer/sinkhorn.py), without materialising the iterate.
//
//   cur[s, h, b] = (m[s, h, b] / mu1[s, b]) / mu2[s, h]          (two fp32 divisions, as torch)
//   std_rows[s, h] = std_b(cur),  std_cols[s, b] = std_h(cur)     (unbiased)
//
// torch.std on fp32 accumulates in double (Welford) and rounds sqrt(var) to fp32; here a
// two-pass mean / squared-deviation sum in double gives the same double up to a few ulps,
// hence the same fp32 result (checked against torch.std in tests/test_quantizer.py), at
// a fraction of the cost: torch's std is the quantizer's hot spot (80% of its time).
// Plain C++ written for the auto-vectoriser; no fast-math (the fp32 divisions must round
// exactly as torch's). target_clones picks AVX-512 or AVX2 code at load time.
#include "sinq_cpu_ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace sinq_cpu {
namespace {

constexpr int kLanes = 8;  // partial sums per row reduction (lets the compiler vectorise)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SINQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SINQ_CLONES
#endif

// One slab: m, cur [H, B]; mu1 [B], mu2 [H] (both null at the first iterate); scratch
// row_mean [H], col_mean [B], col_sq [B].
SINQ_CLONES void slab_stds(const float* m, const float* mu1, const float* mu2, int64_t H, int64_t B, float* cur,
                           double* row_mean, double* col_mean, double* col_sq, float* std_rows, float* std_cols) {
  for (int64_t b = 0; b < B; ++b) col_mean[b] = col_sq[b] = 0.0;
  // pass 1: the iterate (kept in `cur`), its row and column sums
  for (int64_t h = 0; h < H; ++h) {
    const float* mr = m + h * B;
    float* cr = cur + h * B;
    const float d2 = mu2 ? mu2[h] : 1.f;
    double part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t b = 0; b < B; ++b) {
      const float v = mu1 ? (mr[b] / mu1[b]) / d2 : mr[b];
      cr[b] = v;
      part[b % kLanes] += v;
      col_mean[b] += v;
    }
    double sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += part[l];
    row_mean[h] = sum / static_cast<double>(B);
  }
  for (int64_t b = 0; b < B; ++b) col_mean[b] /= static_cast<double>(H);
  // pass 2: squared deviations from the means
  for (int64_t h = 0; h < H; ++h) {
    const float* cr = cur + h * B;
    const double mean = row_mean[h];
    double part[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t b = 0; b < B; ++b) {
      const double v = cr[b];
      const double dr = v - mean, dc = v - col_mean[b];
      part[b % kLanes] += dr * dr;
      col_sq[b] += dc * dc;
    }
    double sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += part[l];
    std_rows[h] = static_cast<float>(std::sqrt(sum / static_cast<double>(B - 1)));
  }
  for (int64_t b = 0; b < B; ++b) std_cols[b] = static_cast<float>(std::sqrt(col_sq[b] / static_cast<double>(H - 1)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sinkhorn_stds(const at::Tensor& m, const std::optional<at::Tensor>& mu1,
                                                 const std::optional<at::Tensor>& mu2) {
  TORCH_CHECK(m.dim() == 3 && m.scalar_type() == at::kFloat, "sinkhorn_stds: m must be a float32 [S, H, B] tensor");
  TORCH_CHECK(mu1.has_value() == mu2.has_value(), "sinkhorn_stds: pass both mu1 and mu2 or neither");
  const int64_t S = m.size(0), H = m.size(1), B = m.size(2);
  const at::Tensor mc = m.contiguous();
  at::Tensor c1, c2;
  if (mu1) {
    TORCH_CHECK(mu1->scalar_type() == at::kFloat && mu1->numel() == S * B, "sinkhorn_stds: mu1 must be float32 [S, B]");
    TORCH_CHECK(mu2->scalar_type() == at::kFloat && mu2->numel() == S * H, "sinkhorn_stds: mu2 must be float32 [S, H, 1]");
    c1 = mu1->contiguous();
    c2 = mu2->contiguous();
  }
  at::Tensor rows = at::empty({S, H}, m.options());
  at::Tensor cols = at::empty({S, B}, m.options());
  const float* pm = mc.data_ptr<float>();
  const float* p1 = mu1 ? c1.data_ptr<float>() : nullptr;
  const float* p2 = mu1 ? c2.data_ptr<float>() : nullptr;
  float* pr = rows.data_ptr<float>();
  float* pc = cols.data_ptr<float>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> cur(H * B);
    std::vector<double> scratch(H + 2 * B);
    for (int64_t s = s0; s < s1; ++s)
      slab_stds(pm + s * H * B, p1 ? p1 + s * B : nullptr, p2 ? p2 + s * H : nullptr, H, B, cur.data(),
                scratch.data(), scratch.data() + H, scratch.data() + H + B, pr + s * H, pc + s * B);
  });
  return {rows, cols};
}

}  // namespace sinq_cpu
