// SINQ decode kernel (M <= 16): y = (x * t_shard) @ ((Q - z) * s)^T + bias, on sm_80+.
//
// Pure CUDA (raw pointers, cudaStream_t, no torch headers). Layout: sinq_cuda.h and
// sinq_vllm/kernels/gpu_layout.py.
//
// Design
// ------
// * Tensor cores with swapped operands: the m16n8k16 "M" side is 16 weight columns
//   (output features), the "N" side 8 tokens, so M <= 8 wastes nothing on the token side
//   and M <= 16 takes two token tiles sharing every weight fragment.
// * Group-factored float zeros: for each quantization group
//       y += s * (sum_k xt * q  -  z * sum_k xt)
//   The B operand is the raw code q (exact in fp16/bf16), the token operand is
//   xt = x * t rounded to the activation dtype once; both sums accumulate in fp32 on the
//   tensor cores (sum_k xt by an extra mma against an all-ones fragment, which yields it
//   directly in the accumulator layout). Scale and zero are applied once per
//   (group, output) instead of once per weight: per weight the kernel only does
//   lop3 + hsub2 on pairs (4-bit) to build the operand. Exact codes and fp32
//   accumulation make this at least as faithful as dequantize-then-multiply.
// * The layout's nibble order puts codes (2p, 2p+1) of a word in nibbles (p, p+4), so
//   `lop3(w >> 4p, 0x000f000f, magic)` is one operand register. Within a 32-wide K chunk,
//   lane (g = lane/4, j = lane%4) reads word row 4c + j of its columns: codes
//   k = 32c + 8j + i. The mma's k-slots (2j, 2j+1, 2j+8, 2j+9) of step s are mapped to
//   k = 32c + 8j + 4s + (0, 1, 2, 3) on both operands (a permutation of the reduction
//   index, so the result is unchanged). 8-bit: chunks of 16, k = 16c + 4j + i, one step.
// * The column scale t of the warp's shard (every 128-column block lies in one shard) is
//   applied to x in registers: no separate activation-scaling kernel and no extra launch.
//   (Large M runs the Triton kernels, which multiply each A tile by its shard's t the same
//   way, so no activation-scaling kernel exists at all.)
// * Memory: every weight word is read by exactly one lane, with cache-streaming loads, in
//   fully used 32-byte sectors; a register ring prefetches STAGES chunks ahead. Each warp
//   owns 32 columns and a K slice; split-K partials go to an fp32 buffer that a second
//   small kernel sums in a fixed order (deterministic, CUDA-graph safe, no zero-fill).
//
// Why no Hopper (wgmma/TMA) variant: wgmma needs M = 64 rows per warpgroup, i.e. 64
// weight columns x (tokens padded to 8) per instruction; at M <= 16 the kernel is bound
// by HBM bandwidth, not by tensor-core issue (mma.sync covers the needed rate with a wide
// margin: ~0.2 mma per SM clock at 3.35 TB/s), and the loads are plain streaming loads
// that TMA would not make faster. Large M goes to the Triton GEMM, where wgmma pays.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sinq_cuda.h"

namespace sinq_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTiles = 2;     // 16-column tiles per warp
constexpr int kStages = 4;    // K chunks in flight per warp
static_assert(kWarps * kTiles * 16 == kGemvCtaColumns, "CTA width");

template <typename T>
struct Act;

template <>
struct Act<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic4 = 0x64006400u;  // 1024.0 in both halves: (0x6400 | q) = 1024 + q
  static constexpr uint32_t kOnes = 0x3C003C00u;    // (1.0, 1.0)
  __device__ static __forceinline__ uint32_t sub_magic4(uint32_t v) {
    const uint32_t magic = kMagic4;
    __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&magic));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
  __device__ static __forceinline__ float to_float(__half v) { return __half2float(v); }
  __device__ static __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // codes i0, i1 (bytes sel0, sel1 of w) of an 8-bit word as an exact half2 pair
  template <int B0, int B1>
  __device__ static __forceinline__ uint32_t byte_pair(uint32_t w) {
    // result bytes [w.B0, 0x64, w.B1, 0x64] = half2(1024 + q0, 1024 + q1)
    const uint32_t r = __byte_perm(w, 0x64646464u, (B0) | (4 << 4) | (B1 << 8) | (4 << 12));
    return sub_magic4(r);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Act<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic4 = 0x43004300u;  // 128.0 in both halves: (0x4300 | q) = 128 + q
  static constexpr uint32_t kOnes = 0x3F803F80u;    // (1.0, 1.0)
  __device__ static __forceinline__ uint32_t sub_magic4(uint32_t v) {
    const uint32_t magic = kMagic4;
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                               *reinterpret_cast<const __nv_bfloat162*>(&magic));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
  __device__ static __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  template <int B0, int B1>
  __device__ static __forceinline__ uint32_t byte_pair(uint32_t w) {
    // bf16 has 8 significant bits: 128 + q is not exact for q >= 128, so go through fp32:
    // bytes [w.B, 0, 0, 0x4B] = 2^23 + q exactly; minus 2^23 = q; q <= 255 is exact in bf16.
    const float q0 = __uint_as_float(__byte_perm(w, 0x4B000000u, (B0) | (4 << 4) | (4 << 8) | (7 << 12))) - 8388608.0f;
    const float q1 = __uint_as_float(__byte_perm(w, 0x4B000000u, (B1) | (4 << 4) | (4 << 8) | (7 << 12))) - 8388608.0f;
    return pack(q0, q1);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// (a & MASK) | OR in one instruction
template <uint32_t MASK, uint32_t OR>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "n"(OR));
  return r;
}

// Codes (2p, 2p+1) of a 4-bit word (nibbles p, p+4) as an exact T2 pair.
template <typename T, int P>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w) {
  return Act<T>::sub_magic4(and_or<0x000F000Fu, Act<T>::kMagic4>(w >> (4 * P)));
}

struct Params {
  const void* x;
  const uint32_t* qweight;
  const uint32_t* scales_zeros;
  const float* col_scales;
  const int32_t* blk;
  const void* bias;
  void* out;
  float* partials;
  int64_t x_row_stride;
  int m, n, k, n_pad, group_size, align, split_k, k_per_split;
};

// Per-stage registers of the prefetch ring.
template <int BITS, int MT>
struct Stage;

template <int MT>
struct Stage<4, MT> {
  uint32_t w[kTiles][2];  // [tile][column r / r+8]
  uint4 x[MT];            // 8 activations of token g (+8 mt) at k = 32c + 8j ...
  float4 t0, t1;          // the 8 column scales
};

template <int MT>
struct Stage<8, MT> {
  uint32_t w[kTiles][2];
  uint2 x[MT];  // 4 activations at k = 16c + 4j ...
  float4 t0;
};

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads) sinq_gemv_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int PACK = 32 / BITS;   // codes per word
  constexpr int CK = 4 * PACK;      // K per chunk: 4 word rows (one per lane of a quad)
  constexpr int KPL = PACK;         // K per lane per chunk
  using A = Act<T>;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // mma groupID: weight column within a tile, token within a token tile
  const int j = lane & 3;   // threadID_in_group: which word row of the chunk
  const int col0 = (blockIdx.x * kWarps + warp) * (16 * kTiles);
  if (col0 >= p.n_pad) return;  // warp-uniform

  const int split = blockIdx.y;
  const int kbeg = split * p.k_per_split;
  const int kend = min(p.k, kbeg + p.k_per_split);
  const int nch = kend > kbeg ? (kend - kbeg) / CK : 0;
  const int cpg = p.group_size / CK;  // chunks per group (group_size % CK == 0, checked on the host)

  const int blk = col0 / p.align;
  const int shard = __ldg(p.blk + 3 * blk);
  const int out0 = __ldg(p.blk + 3 * blk + 1);
  const int valid = __ldg(p.blk + 3 * blk + 2);
  const int local0 = col0 - blk * p.align;

  const uint32_t* wbase = p.qweight + static_cast<int64_t>(kbeg / PACK + j) * p.n_pad + col0 + g;
  const int64_t wstep = static_cast<int64_t>(4) * p.n_pad;  // word rows per chunk
  const float* tbase = p.col_scales + static_cast<int64_t>(shard) * p.k + kbeg + KPL * j;
  const T* xbase[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int tok = g + 8 * mt;
    xok[mt] = tok < p.m;
    xbase[mt] = static_cast<const T*>(p.x) + static_cast<int64_t>(xok[mt] ? tok : 0) * p.x_row_stride + kbeg + KPL * j;
  }
  const uint32_t* szbase = p.scales_zeros + col0 + g;

  float acc[kTiles][MT][4];
  float accg[kTiles][MT][4];
  float sxg[MT][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][mt][e] = accg[t][mt][e] = 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) sxg[mt][e] = 0.f;

  const uint32_t ones[4] = {A::kOnes, A::kOnes, A::kOnes, A::kOnes};

  Stage<BITS, MT> ring[kStages];
  auto load = [&](Stage<BITS, MT>& st, int c) {
    const uint32_t* wp = wbase + c * wstep;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      st.w[t][0] = __ldcs(wp + 16 * t);
      st.w[t][1] = __ldcs(wp + 16 * t + 8);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (BITS == 4) {
        st.x[mt] = xok[mt] ? __ldg(reinterpret_cast<const uint4*>(xbase[mt] + c * CK)) : make_uint4(0, 0, 0, 0);
      } else {
        st.x[mt] = xok[mt] ? __ldg(reinterpret_cast<const uint2*>(xbase[mt] + c * CK)) : make_uint2(0, 0);
      }
    }
    st.t0 = __ldg(reinterpret_cast<const float4*>(tbase + c * CK));
    if constexpr (BITS == 4) st.t1 = __ldg(reinterpret_cast<const float4*>(tbase + c * CK + 4));
  };

  // scale/zero pairs of the current group for columns (g, g+8) of each tile
  uint32_t sz[kTiles][2];
  auto load_sz = [&](int group_index) {
    const uint32_t* sp = szbase + static_cast<int64_t>(group_index) * p.n_pad;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      sz[t][0] = __ldg(sp + 16 * t);
      sz[t][1] = __ldg(sp + 16 * t + 8);
    }
  };

  auto compute = [&](const Stage<BITS, MT>& st) {
    // token operand: xt = x * t rounded to T, pairs in k order
    uint32_t bx[MT][BITS == 4 ? 4 : 2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (BITS == 4) {
        const uint32_t xs[4] = {st.x[mt].x, st.x[mt].y, st.x[mt].z, st.x[mt].w};
        const float tv[8] = {st.t0.x, st.t0.y, st.t0.z, st.t0.w, st.t1.x, st.t1.y, st.t1.z, st.t1.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 xf = A::unpack(xs[q]);
          bx[mt][q] = A::pack(xf.x * tv[2 * q], xf.y * tv[2 * q + 1]);
        }
      } else {
        const uint32_t xs[2] = {st.x[mt].x, st.x[mt].y};
        const float tv[4] = {st.t0.x, st.t0.y, st.t0.z, st.t0.w};
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const float2 xf = A::unpack(xs[q]);
          bx[mt][q] = A::pack(xf.x * tv[2 * q], xf.y * tv[2 * q + 1]);
        }
      }
    }
    if constexpr (BITS == 4) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) A::mma(sxg[mt], ones, bx[mt][2 * s], bx[mt][2 * s + 1]);
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          uint32_t a[4];
          if (s == 0) {
            a[0] = nibble_pair<T, 0>(st.w[t][0]);
            a[1] = nibble_pair<T, 0>(st.w[t][1]);
            a[2] = nibble_pair<T, 1>(st.w[t][0]);
            a[3] = nibble_pair<T, 1>(st.w[t][1]);
          } else {
            a[0] = nibble_pair<T, 2>(st.w[t][0]);
            a[1] = nibble_pair<T, 2>(st.w[t][1]);
            a[2] = nibble_pair<T, 3>(st.w[t][0]);
            a[3] = nibble_pair<T, 3>(st.w[t][1]);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) A::mma(accg[t][mt], a, bx[mt][2 * s], bx[mt][2 * s + 1]);
        }
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) A::mma(sxg[mt], ones, bx[mt][0], bx[mt][1]);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        uint32_t a[4];
        a[0] = A::template byte_pair<0, 1>(st.w[t][0]);
        a[1] = A::template byte_pair<0, 1>(st.w[t][1]);
        a[2] = A::template byte_pair<2, 3>(st.w[t][0]);
        a[3] = A::template byte_pair<2, 3>(st.w[t][1]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) A::mma(accg[t][mt], a, bx[mt][0], bx[mt][1]);
      }
    }
  };

  // y += s * (sum xt q - z * sum xt) for the group just finished; c0/c1 are tokens
  // (2j, 2j+1) of column g, c2/c3 the same tokens of column g+8.
  auto finish_group = [&]() {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 s_z = __half22float2(*reinterpret_cast<const __half2*>(&sz[t][h]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& a = acc[t][mt][2 * h + e];
            a = fmaf(s_z.x, fmaf(-s_z.y, sxg[mt][e], accg[t][mt][2 * h + e]), a);
            accg[t][mt][2 * h + e] = 0.f;
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sxg[mt][e] = 0.f;
  };

  int group_index = kbeg / p.group_size;
  if (nch > 0) load_sz(group_index);
#pragma unroll
  for (int s = 0; s < kStages; ++s)
    if (s < nch) load(ring[s], s);

  int in_group = 0;
  for (int c0 = 0; c0 < nch; c0 += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int c = c0 + s;
      if (c < nch) {
        compute(ring[s]);
        if (c + kStages < nch) load(ring[s], c + kStages);
        if (++in_group == cpg || c + 1 == nch) {
          finish_group();
          in_group = 0;
          ++group_index;
          if (c + 1 < nch) load_sz(group_index);
        }
      }
    }
  }

  // store: acc[t][mt][2h + e] is column col0 + 16t + g + 8h, token 8mt + 2j + e
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = local0 + 16 * t + g + 8 * h;
      if (local >= valid) continue;
      const int col = out0 + local;
      float b = 0.f;
      if (p.split_k == 1 && p.bias != nullptr) b = A::to_float(static_cast<const T*>(p.bias)[col]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = 8 * mt + 2 * j + e;
          if (tok >= p.m) continue;
          const float v = acc[t][mt][2 * h + e];
          if (p.split_k == 1) {
            static_cast<T*>(p.out)[static_cast<int64_t>(tok) * p.n + col] = A::from_float(v + b);
          } else {
            p.partials[(static_cast<int64_t>(split) * p.m + tok) * p.n + col] = v;
          }
        }
      }
    }
  }
#else
  __trap();  // built for an architecture without bf16 mma.sync (needs sm_80+)
#endif
}

template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partials, const T* __restrict__ bias,
                                     T* __restrict__ out, int m, int n, int split_k) {
  const int64_t total = static_cast<int64_t>(m) * n;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  float acc = 0.f;
  for (int s = 0; s < split_k; ++s) acc += partials[s * total + idx];  // fixed order: deterministic
  if (bias != nullptr) acc += Act<T>::to_float(bias[idx % n]);
  out[idx] = Act<T>::from_float(acc);
}

template <typename T, int BITS, int MT>
cudaError_t launch_typed(const GemvArgs& a, cudaStream_t stream) {
  Params p;
  p.x = a.x;
  p.qweight = a.qweight;
  p.scales_zeros = a.scales_zeros;
  p.col_scales = a.col_scales;
  p.blk = a.blk;
  p.bias = a.bias;
  p.out = a.out;
  p.partials = a.partials;
  p.x_row_stride = a.x_row_stride;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.n_pad = a.n_pad;
  p.group_size = a.group_size;
  p.align = a.align;
  p.split_k = a.split_k;
  p.k_per_split = a.k_per_split;
  const dim3 grid((a.n_pad + kGemvCtaColumns - 1) / kGemvCtaColumns, a.split_k);
  sinq_gemv_kernel<T, BITS, MT><<<grid, kThreads, 0, stream>>>(p);
  if (a.split_k > 1) {
    const int64_t total = static_cast<int64_t>(a.m) * a.n;
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
    splitk_reduce_kernel<T><<<blocks, threads, 0, stream>>>(a.partials, static_cast<const T*>(a.bias),
                                                            static_cast<T*>(a.out), a.m, a.n, a.split_k);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_act(const GemvArgs& a, cudaStream_t stream) {
  const bool two = a.m > 8;
  if (a.bits == 4) return two ? launch_typed<T, 4, 2>(a, stream) : launch_typed<T, 4, 1>(a, stream);
  return two ? launch_typed<T, 8, 2>(a, stream) : launch_typed<T, 8, 1>(a, stream);
}

}  // namespace

const char* gemv_unsupported_reason(const GemvArgs& a) {
  if (a.bits != 4 && a.bits != 8) return "container bits must be 4 or 8";
  if (a.m < 0 || a.m > kGemvMaxM) return "M must be at most 16";
  const int ck = a.bits == 4 ? 32 : 16;
  if (a.group_size <= 0 || a.group_size % ck != 0) {
    return a.bits == 4 ? "group size must be a multiple of 32 (4-bit container)"
                       : "group size must be a multiple of 16 (8-bit container)";
  }
  if (a.k % a.group_size != 0) return "in_features must be a multiple of the group size";
  if (a.align <= 0 || a.align % kGemvCtaColumns != 0) return "layout align must be a multiple of 128";
  if (a.n_pad % a.align != 0) return "padded columns must be a multiple of align";
  if (a.x_row_stride % 8 != 0) return "activation rows must be 16-byte aligned";
  if ((reinterpret_cast<uintptr_t>(a.x) & 15) != 0) return "activations must be 16-byte aligned";
  if ((reinterpret_cast<uintptr_t>(a.col_scales) & 15) != 0) return "column scales must be 16-byte aligned";
  return nullptr;
}

void plan_split_k(GemvArgs& a, int requested, int num_sms) {
  const int groups = std::max(1, a.k / std::max(1, a.group_size));
  int split = requested;
  if (split <= 0) {
    const int ctas = std::max(1, (a.n_pad + kGemvCtaColumns - 1) / kGemvCtaColumns);
    // enough CTAs for ~4 per SM, slices of >= 256 K, partial-sum traffic (8 bytes per
    // output per split, mostly L2-resident) <= 1/4 of the weight bytes
    const int want = (4 * std::max(1, num_sms) + ctas - 1) / ctas;
    const int by_len = std::max(1, a.k / 256);
    const int by_traffic = std::max(1, (a.k * a.bits) / (256 * std::max(1, a.m)));
    split = std::min({want, by_len, by_traffic, 32});
  }
  split = std::max(1, std::min(split, groups));
  const int groups_per_split = (groups + split - 1) / split;
  a.k_per_split = groups_per_split * a.group_size;
  a.split_k = (groups + groups_per_split - 1) / groups_per_split;
}

cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  if (a.act == ActType::kFloat16) return launch_act<__half>(a, stream);
  return launch_act<__nv_bfloat16>(a, stream);
}

}  // namespace sinq_cuda
