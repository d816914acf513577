// SINQ linear op on CPU: argument checks, activation preparation, threading, run-time
// ISA dispatch, and the portable scalar kernel. The SIMD kernels live in
// sinq_cpu_avx512.cpp (AVX-512 + AVX512_BF16) and sinq_cpu_avx2.cpp (AVX2 + FMA); this
// file is compiled for the baseline target only.
#include "sinq_cpu_kernel.h"
#include "sinq_cpu_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
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
// Portable scalar kernel (same layout, direct codes, offset 0)
// ---------------------------------------------------------------------------------------
namespace {

inline float bf16_bits_to_f(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16_bits(float f) { return c10::BFloat16(f).x; }

inline float load_f(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[i];
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
  }
}

inline void store_f(void* base, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kF32: static_cast<float*>(base)[i] = v; break;
    case kF16: static_cast<c10::Half*>(base)[i] = c10::Half(v); break;
    default: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(v); break;
  }
}

inline int code_at(const uint8_t* qt, int nbits, int r, int64_t k) {
  const int sb = r / 16, rr = r % 16;
  if (nbits <= 4) {
    const int64_t k8 = k / 8;
    const int within = (int)(k % 8), e = within % 2, h = within / 2;
    const uint8_t* wp = qt + k8 * 256 + sb * 64 + 2 * (2 * rr + e);
    const int word = wp[0] | (wp[1] << 8);
    return (word >> (4 * h)) & 0xF;
  }
  const int64_t kp = k / 2;
  return qt[kp * 128 + sb * 32 + 2 * rr + (int)(k % 2)];
}

}  // namespace

void run_items_scalar(const Params& p, int64_t i0, int64_t i1) {
  const int64_t K = p.K, G = p.G, gs = p.gs;
  const int step = p.split ? 2 : 1;
  std::vector<float> xf(K);
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t tile = it / p.nmc, mc = it % p.nmc;
    const TileInfo& ti = p.tiles[tile];
    const uint8_t* qt = p.qw + tile * tile_bytes(p.nbits, K);
    const uint16_t* szt = p.sz + tile * G * 128;
    const int64_t r0 = mc * kChunkRows;
    const int64_t r1 = std::min<int64_t>(r0 + kChunkRows, p.Mp);
    for (int64_t xrow = r0; xrow < r1; xrow += step) {
      const int64_t m = xrow / step;
      for (int r = 0; r < ti.rows; ++r) {
        float y = 0.f;
        for (int h = 0; h < step; ++h) {
          const uint16_t* xb = p.xb + ((int64_t)ti.shard * p.Mp + xrow + h) * K;
          for (int64_t g = 0; g < G; ++g) {
            float acc = 0.f, xs = 0.f;
            for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
              const float xv = bf16_bits_to_f(xb[k]);
              acc += xv * (float)code_at(qt, p.nbits, r, k);
              xs += xv;
            }
            const float s = static_cast<float>(c10::Half(szt[g * 128 + r], c10::Half::from_bits()));
            const float z = static_cast<float>(c10::Half(szt[g * 128 + 64 + r], c10::Half::from_bits()));
            y += s * (acc - z * xs);
          }
        }
        const int64_t n = (int64_t)ti.row0 + r;
        if (p.bias) y += load_f(p.bias, p.bias_dtype, n);
        store_f(p.y, p.y_dtype, m * p.ldy + n, y);
      }
    }
  }
}

void prep_x_scalar(const XPrep& q, int64_t r0, int64_t r1) {
  const int64_t K = q.K, G = q.G, gs = q.gs;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r / q.M, m = r % q.M;
    const float* t = q.t + s * K;
    const int64_t xrow = s * q.Mp + (q.split ? 2 * m : m);
    uint16_t* hi = q.xb + xrow * K;
    uint16_t* lo = hi + K;
    float* sh = q.xsum + xrow * G;
    float* sl = sh + G;
    for (int64_t g = 0; g < G; ++g) {
      float ah = 0.f, al = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const float v = load_f(q.x, q.x_dtype, m * q.ldx + k) * t[k];
        const uint16_t h = f_to_bf16_bits(v);
        hi[k] = h;
        ah += bf16_bits_to_f(h);
        if (q.split) {
          const uint16_t l = f_to_bf16_bits(v - bf16_bits_to_f(h));
          lo[k] = l;
          al += bf16_bits_to_f(l);
        }
      }
      sh[g] = ah;
      if (q.split) sl[g] = al;
    }
  }
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
  Buf<uint16_t> xb;
  Buf<float> xsum;
  std::vector<TileInfo> tiles;
};

}  // namespace

at::Tensor cpu_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                      const at::Tensor& col_scales, c10::IntArrayRef shard_offsets,
                      const std::optional<at::Tensor>& bias_in, int64_t nbits, int64_t group_size) {
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

  const bool split = x_dt != kBF16;
  const int64_t Mp = split ? 2 * M : M;
  // Decode-sized activation buffers are reused across calls (per calling thread); large
  // (prefill) ones are allocated per call so that no thread keeps tens of MB around.
  const size_t xb_elems = (size_t)(S * Mp * K), xs_elems = (size_t)(S * Mp * G);
  Scratch big;
  Scratch& buf = xb_elems * sizeof(uint16_t) <= kKeepScratchBytes ? sc : big;
  uint16_t* xb_ptr = buf.xb.get(xb_elems);
  float* xsum_ptr = buf.xsum.get(xs_elems);

  const int isa = isa_slot().load();

  XPrep q{x2.data_ptr(), x_dt, x2.stride(0), col_scales.data_ptr<float>(), S, M, K, G, group_size, Mp, split,
          xb_ptr, xsum_ptr};
  auto prep = [&](int64_t r0, int64_t r1) {
#ifdef SINQ_CPU_X86
    if (isa == kAvx512Bf16) return prep_x_avx512bf16(q, r0, r1);
#endif
    prep_x_scalar(q, r0, r1);
  };
  if (S * M * K >= (int64_t)1 << 16)
    at::parallel_for(0, S * M, 1, prep);
  else
    prep(0, S * M);

  Params p{};
  p.qw = qweight.data_ptr<uint8_t>();
  p.sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::Half>());
  p.xb = xb_ptr;
  p.xsum = xsum_ptr;
  p.tiles = sc.tiles.data();
  p.num_tiles = T;
  p.K = K;
  p.G = G;
  p.gs = group_size;
  p.nbits = (int)nbits;
  p.Mp = Mp;
  p.split = split;
  p.nmc = (Mp + kChunkRows - 1) / kChunkRows;
  p.y = y.data_ptr();
  p.y_dtype = x_dt;
  p.ldy = N;
  p.bias = bias_ptr;
  p.bias_dtype = bias_dt;

  at::parallel_for(0, T * p.nmc, 1, [&](int64_t i0, int64_t i1) {
#ifdef SINQ_CPU_X86
    if (isa == kAvx512Bf16) return run_items_avx512bf16(p, i0, i1);
    if (isa == kAvx2) return run_items_avx2(p, i0, i1);
#endif
    run_items_scalar(p, i0, i1);
  });
  return y;
}

}  // namespace sinq_cpu
