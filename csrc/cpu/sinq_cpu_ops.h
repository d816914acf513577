// Torch-facing entry points of the SINQ CPU kernels (registered in binding.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sinq_cpu {

// y[..., N] = SINQ linear of x[..., K] on the resident layout described in sinq_cpu_kernel.h.
// codebook: float32 [2^nbits] code values (NF4/NF3), absent for uniform codes; int8_act:
// quantize the activations to int8 per (row, group) (uniform codes of <= 4 bits only).
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                      const at::Tensor& col_scales, c10::IntArrayRef shard_offsets,
                      const std::optional<at::Tensor>& bias, int64_t nbits, int64_t group_size,
                      const std::optional<at::Tensor>& codebook, bool int8_act, bool exact);

// Row and column stds (unbiased) of (m / mu1) / mu2 per slab, m [S, H, B] fp32, mu1 [S, B],
// mu2 [S, H, 1] (both absent: of m itself); equal to torch.std's fp32 results.
std::tuple<at::Tensor, at::Tensor> sinkhorn_stds(const at::Tensor& m, const std::optional<at::Tensor>& mu1,
                                                 const std::optional<at::Tensor>& mu2);

// Least-squares scale and float zero per group (last dim of x [T, N, g] fp32) for nbits codes:
// range search over `deltas` plus `lloyd_steps` Lloyd steps, or, with scales/zeros [T, N, 1]
// given, `lloyd_steps` Lloyd steps from them. Optional weights [T, g]. Returns (scales, zeros).
std::tuple<at::Tensor, at::Tensor> group_fit(const at::Tensor& x, int64_t nbits, at::ArrayRef<double> deltas,
                                             int64_t lloyd_steps, const std::optional<at::Tensor>& weights,
                                             const std::optional<at::Tensor>& scales,
                                             const std::optional<at::Tensor>& zeros);

// Least-squares column scales [T, g] of x [T, N, g] for the nearest codes of x / t under
// scales/zeros [T, N, 1]; a column without a positive finite optimum keeps t.
at::Tensor column_scale_step(const at::Tensor& x, const at::Tensor& t, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t nbits);

// Instruction set the kernels use in this process ("avx512bf16", "avx2" or "scalar").
std::string isa_name();
// Instruction sets this CPU can run, best first.
std::vector<std::string> supported_isas();
// Force an instruction set (tests, benchmarks); "auto" restores the best one. Returns the
// ISA in use; throws if this CPU cannot run the one asked for.
std::string set_isa(const std::string& name);

}  // namespace sinq_cpu
