// SINQ linear op on CPU: argument checks, code-value tables, activation preparation,
// work split and threading, run-time ISA dispatch. The kernels live in sinq_cpu_avx512.cpp
// (AVX-512 + AVX512_BF16/VNNI), sinq_cpu_avx2.cpp (AVX2 + FMA) and sinq_cpu_scalar.cpp
// (portable, plus the work-item driver they share); this file is compiled for the
// baseline target only.
#include "sinq_cpu_kernel.h"
#include "sinq_cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace sinq_cpu {

// ---------------------------------------------------------------------------------------
// ISA dispatch
// ---------------------------------------------------------------------------------------
namespace {

bool cpu_has(int isa) {
#ifdef SINQ_CPU_X86
  if (isa == kAvx512Bf16)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == kScalar;
}

int best_isa() {
  for (int isa : {kAvx512Bf16, kAvx2})
    if (cpu_has(isa)) return isa;
  return kScalar;
}

const char* name_of(int isa) {
  switch (isa) {
    case kAvx512Bf16: return "avx512bf16";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

int parse_isa(const std::string& name) {
  if (name == "avx512bf16" || name == "avx512") return kAvx512Bf16;
  if (name == "avx2") return kAvx2;
  if (name == "scalar") return kScalar;
  TORCH_CHECK(false, "sinq_vllm cpu kernel: unknown ISA '", name, "' (valid: auto, avx512bf16, avx2, scalar)");
}

int initial_isa() {
  const char* env = std::getenv("SINQ_VLLM_CPU_ISA");
  if (env && *env && std::string(env) != "auto") {
    const int isa = parse_isa(env);
    TORCH_CHECK(cpu_has(isa), "SINQ_VLLM_CPU_ISA=", env, ": this CPU cannot run it");
    return isa;
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> isa{initial_isa()};
  return isa;
}

}  // namespace

std::string isa_name() { return name_of(isa_slot().load()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int isa : {kAvx512Bf16, kAvx2, kScalar})
    if (cpu_has(isa)) out.emplace_back(name_of(isa));
  return out;
}

std::string set_isa(const std::string& name) {
  const int isa = name == "auto" ? best_isa() : parse_isa(name);
  TORCH_CHECK(cpu_has(isa), "sinq_vllm cpu kernel: this CPU cannot run ISA '", name, "'");
  isa_slot().store(isa);
  return name_of(isa);
}

// ---------------------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------------------
namespace {

int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "sinq_vllm::cpu_linear: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

constexpr size_t kKeepScratchBytes = size_t(4) << 20;

// growable, uninitialised buffer
template <typename T>
struct Buf {
  std::unique_ptr<T[]> data;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) {
      data.reset(new T[n]);
      cap = n;
    }
    return data.get();
  }
};

struct Scratch {
  Buf<uint8_t> xa;
  Buf<float> xsum, xd;
  std::vector<TileInfo> tiles;
};

const Kernels& kernels_for(int isa) {
#ifdef SINQ_CPU_X86
  if (isa == kAvx512Bf16) return avx512bf16_kernels();
  if (isa == kAvx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

// bf16 tables of the code values (sinq_cpu_kernel.h): uniform codes 128 + q, or the
// codebook's values split exactly into hi + lo.
struct CodeTables {
  uint16_t hi[kLutSize], lo[kLutSize];
  uint16_t value[kLutSize];  // decoded-weight mode: V(q) itself (hi + lo of NF codes as above)
  float off;
  bool uniform;
};

CodeTables code_tables(const std::optional<at::Tensor>& codebook, int64_t nbits) {
  CodeTables ct{};
  ct.uniform = !(codebook.has_value() && codebook->defined());
  if (ct.uniform) {
    for (int i = 0; i < kLutSize; ++i) {
      ct.hi[i] = (uint16_t)(0x4300 | (i & 15));
      ct.value[i] = float_to_bf16((float)(i & 15));
    }
    ct.off = 128.f;
    return ct;
  }
  const at::Tensor& cb = *codebook;
  TORCH_CHECK(nbits <= 4, "sinq_vllm::cpu_linear: a codebook needs codes of at most 4 bits, got ", nbits);
  TORCH_CHECK(cb.scalar_type() == at::kFloat && cb.dim() == 1 && cb.is_contiguous() && cb.numel() == (int64_t(1) << nbits),
              "sinq_vllm::cpu_linear: codebook must be a contiguous float32 tensor of ", int64_t(1) << nbits,
              " values for ", nbits, "-bit codes");
  const float* v = cb.data_ptr<float>();
  for (int i = 0; i < kLutSize; ++i) {
    const int q = i & 15;
    const float value = q < cb.numel() ? v[q] : 0.f;
    ct.hi[i] = float_to_bf16(value);
    ct.lo[i] = float_to_bf16(value - bf16_to_float(ct.hi[i]));
    TORCH_CHECK(bf16_to_float(ct.hi[i]) + bf16_to_float(ct.lo[i]) == value, "sinq_vllm::cpu_linear: codebook value ",
                value, " has more than 16 significant bits (fp16 values always fit)");
  }
  std::memcpy(ct.value, ct.hi, sizeof ct.hi);
  ct.off = 0.f;
  return ct;
}

}  // namespace

at::Tensor cpu_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                      const at::Tensor& col_scales, c10::IntArrayRef shard_offsets,
                      const std::optional<at::Tensor>& bias_in, int64_t nbits, int64_t group_size,
                      const std::optional<at::Tensor>& codebook, bool int8_act, bool exact) {
  TORCH_CHECK(x_in.device().is_cpu(), "sinq_vllm::cpu_linear: x must be a CPU tensor");
  TORCH_CHECK(nbits >= 2 && nbits <= 8 && nbits != 7, "sinq_vllm::cpu_linear: unsupported nbits ", nbits);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "sinq_vllm::cpu_linear: group_size must be a multiple of 8, got ",
              group_size);
  TORCH_CHECK(shard_offsets.size() >= 2 && shard_offsets[0] == 0, "sinq_vllm::cpu_linear: bad shard_offsets");
  TORCH_CHECK(x_in.dim() >= 1, "sinq_vllm::cpu_linear: x must have at least one dimension");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K % group_size == 0, "sinq_vllm::cpu_linear: in_features ", K, " is not a multiple of group size ",
              group_size);
  const int64_t G = K / group_size;
  const int64_t S = (int64_t)shard_offsets.size() - 1;
  const int64_t N = shard_offsets.back();
  const CodeTables ct = code_tables(codebook, nbits);
  TORCH_CHECK(!int8_act || (nbits <= 4 && ct.uniform),
              "sinq_vllm::cpu_linear: int8 activations need uniform codes of at most 4 bits (got ", nbits, "-bit",
              ct.uniform ? "" : " codebook", " codes)");

  thread_local Scratch sc;
  sc.tiles.clear();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(shard_offsets[s + 1] >= shard_offsets[s], "sinq_vllm::cpu_linear: shard_offsets must be sorted");
    for (int64_t r = shard_offsets[s]; r < shard_offsets[s + 1]; r += kTileRows)
      sc.tiles.push_back(TileInfo{(int32_t)s, (int32_t)r, (int32_t)std::min<int64_t>(kTileRows, shard_offsets[s + 1] - r)});
  }
  const int64_t T = (int64_t)sc.tiles.size();

  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.device().is_cpu(),
              "sinq_vllm::cpu_linear: qweight must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(qweight.numel() == T * tile_bytes((int)nbits, K), "sinq_vllm::cpu_linear: qweight has ", qweight.numel(),
              " bytes, expected ", T * tile_bytes((int)nbits, K), " for ", T, " tiles of K=", K, " at ", nbits, " bits");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kHalf && scales_zeros.is_contiguous() && scales_zeros.numel() == T * G * 128,
              "sinq_vllm::cpu_linear: scales_zeros must be a contiguous float16 tensor [", T, ", ", G, ", 2, 64]");
  TORCH_CHECK(col_scales.scalar_type() == at::kFloat && col_scales.is_contiguous() && col_scales.dim() == 2 &&
                  col_scales.size(0) == S && col_scales.size(1) == K,
              "sinq_vllm::cpu_linear: col_scales must be a contiguous float32 tensor [", S, ", ", K, "]");

  const int x_dt = dtype_code(x_in.scalar_type(), "x");
  at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  // rows of x: collapse leading dims (a view when possible)
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(-1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);

  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x_in.options());
  if (M == 0 || N == 0) return y;

  const void* bias_ptr = nullptr;
  int bias_dt = kF32;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.numel() == N, "sinq_vllm::cpu_linear: bias has ", bias.numel(), " elements, expected ", N);
    bias_dt = dtype_code(bias.scalar_type(), "bias");
    bias_ptr = bias.data_ptr();
  }

  const bool split = !int8_act && x_dt != kBF16;
  const int64_t Mp = split ? 2 * M : M;
  const int64_t xa_row_bytes = int8_act ? K : 2 * K;
  // Decode-sized activation buffers are reused across calls (per calling thread); large
  // (prefill) ones are allocated per call so that no thread keeps tens of MB around.
  const size_t xa_bytes = (size_t)(S * Mp * xa_row_bytes), xs_elems = (size_t)(S * Mp * G);
  Scratch big;
  Scratch& buf = xa_bytes <= kKeepScratchBytes ? sc : big;
  uint8_t* xa = buf.xa.get(xa_bytes);
  float* xsum = buf.xsum.get(xs_elems);
  float* xd = int8_act ? buf.xd.get(xs_elems) : nullptr;

  const Kernels& kr = kernels_for(isa_slot().load());

  // x * t once per shard and activation row, in the kernels' format
  const char* xbase = static_cast<const char*>(x2.data_ptr());
  const int64_t xstride = x2.stride(0) * dtype_bytes(x_dt);
  const float* t = col_scales.data_ptr<float>();
  auto prep = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = r / M, m = r % M;
      const int64_t xrow = s * Mp + (split ? 2 * m : m);
      if (int8_act) {
        kr.prep_int8(xbase + m * xstride, x_dt, t + s * K, K, group_size, reinterpret_cast<int8_t*>(xa) + xrow * K,
                     xd + xrow * G, xsum + xrow * G);
      } else {
        uint16_t* hi = reinterpret_cast<uint16_t*>(xa) + xrow * K;
        kr.prep_bf16(xbase + m * xstride, x_dt, t + s * K, K, group_size, hi, split ? hi + K : nullptr, xsum + xrow * G,
                     split ? xsum + (xrow + 1) * G : nullptr);
      }
    }
  };
  if (S * M * K >= (int64_t)1 << 16)
    at::parallel_for(0, S * M, 1, prep);
  else
    prep(0, S * M);

  Params p{};
  p.qw = qweight.data_ptr<uint8_t>();
  p.sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::Half>());
  p.tiles = sc.tiles.data();
  p.num_tiles = T;
  p.K = K;
  p.G = G;
  p.gs = group_size;
  p.nbits = (int)nbits;
  // decoded weights for large bf16 batches of nibble codes, unless exact products are asked for
  p.decoded = kr.decoded && !exact && !int8_act && x_dt == kBF16 && code_kind((int)nbits) == kNibble &&
              M >= kDecodedMinRows;
  p.lut = p.decoded ? ct.value : ct.hi;
  p.lut_lo = !ct.uniform && (split || p.decoded) ? ct.lo : nullptr;
  p.off = code_kind((int)nbits) == kByte8 ? 0.f : ct.off;
  p.uniform = ct.uniform;
  p.int8 = int8_act;
  p.xa = xa;
  p.xsum = xsum;
  p.xd = xd;
  p.Mp = Mp;
  p.split = split;
  // Row chunks keep a block of activations in L2 while the weight tiles stream past it;
  // decode-sized batches are one chunk (work items = tiles). Chunks of equal size, in
  // whole micro blocks, so that no chunk streams all weights for a few rows.
  // Decoded-weight mode: chunks of up to kDecodedChunkRows, each decodes every tile once.
  const int64_t max_chunk = p.decoded ? kDecodedChunkRows
                                      : std::max<int64_t>(1, kChunkBytes / xa_row_bytes / kMicroRows) * kMicroRows;
  const int64_t n_chunks = (Mp + max_chunk - 1) / max_chunk;
  p.chunk_rows = ((Mp + n_chunks - 1) / n_chunks + kMicroRows - 1) / kMicroRows * kMicroRows;
  p.y = y.data_ptr();
  p.y_dtype = x_dt;
  p.ldy = N;
  p.bias = bias_ptr;
  p.bias_dtype = bias_dt;

  at::parallel_for(0, n_chunks * T, 1, [&](int64_t i0, int64_t i1) { run_items(kr, p, i0, i1); });
  return y;
}

}  // namespace sinq_cpu
