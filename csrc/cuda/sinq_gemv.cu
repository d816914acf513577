// SINQ decode kernel (M <= 64): y = (x * t_shard) @ ((V(Q) - z) * s)^T + bias, on sm_80+.
//
// Pure CUDA (raw pointers, cudaStream_t, no torch headers). Layout: sinq_cuda.h and
// sinq_vllm/kernels/gpu_layout.py (docs/design.md §4.3).
//
// Design (docs/design.md §4.2)
// ------
// * Tensor cores with swapped operands: the m16n8k16 "M" side is 16 weight columns
//   (output features), the "N" side 8 tokens, so M <= 8 wastes nothing on the token side
//   and a CTA takes 16 tokens as two token tiles sharing every weight fragment. M up to
//   64 runs ceil(M / 16) token blocks as adjacent CTAs (blockIdx.x), which read the same
//   weight tile at about the same time, so the weights come from HBM once and from L2
//   for the other blocks.
// * Group-factored float zeros: for each quantization group
//       y += s * (sum_k xt * V(q)  -  z * sum_k xt)
//   The A operand is the exact code q (or its codebook value V(q) from a 16-entry table in
//   shared memory: NF4/NF3), the token operand is xt = x * t rounded to the activation
//   dtype once; both sums accumulate in fp32 on the tensor cores (sum_k xt by an extra mma
//   against an all-ones fragment, which yields it directly in the accumulator layout).
//   Scale and zero are applied once per (group, output) instead of once per weight.
// * Lane order: codes (2p, 2p+1) of a word sit in nibbles (p, p+4), so
//   `lop3(w >> 4p, 0x000f000f, magic)` is one operand register. Within a 32-wide K chunk,
//   lane (g = lane/4, j = lane%4) owns word row 4c + j of its warp's columns
//   g, g+8, g+16, g+24: codes k = 32c + 8j + i. The mma's k-slots (2j, 2j+1, 2j+8, 2j+9)
//   of step s are mapped to k = 32c + 8j + 4s + (0, 1, 2, 3) on both operands (a
//   permutation of the reduction index). 8-bit: chunks of 16, k = 16c + 4j + i, one step.
// * Memory: the layout stores each lane's four words of a chunk contiguously, so a lane
//   issues one 16-byte streaming load per chunk and a warp reads 512 contiguous bytes;
//   a register ring keeps STAGES chunks (16 * STAGES bytes per lane) in flight. The
//   (scale, zero) pairs of a group are one 16-byte load per lane as well. The column scale
//   t of the warp's shard (every 128-column CTA lies in one shard) is applied to x in
//   registers: no activation-scaling kernel.
// * Split-K in one launch: the planner splits K so that the grid gives every SM about as
//   many CTAs as can be resident (occupancy API). Each split stores its partial sums to a
//   workspace, then the CTA's thread 0 counts its arrival on the tile's counter; the last
//   CTA sums all splits in split order (deterministic), adds the bias, writes y and resets
//   the counter to 0, so the counters are zero again after every launch (CUDA graphs).
//
// Why no Hopper (wgmma/TMA) variant: wgmma needs M = 64 rows per warpgroup, i.e. 64
// weight columns x (tokens padded to 8) per instruction; at M <= 64 the kernel is bound by
// HBM bandwidth, not by tensor-core issue (mma.sync covers the needed rate with a wide
// margin), and the loads are plain streaming loads that TMA would not make faster.

#include <algorithm>
#include <cstdint>

#include "sinq_act.cuh"
#include "sinq_cuda.h"

namespace sinq_cuda {
namespace {

using detail::Act;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTiles = 2;  // 16-column tiles per warp
static_assert(kWarps * kTiles * 16 == kGemvCtaColumns, "CTA width");
static_assert(2 * 8 == kGemvTokenBlock, "two token tiles per CTA");

// Pipeline depth and the occupancy the register budget is held to (__launch_bounds__):
// one token tile keeps 5 chunks (80 bytes) in flight per lane at 4 CTAs per SM, two
// token tiles 4 chunks at 3 CTAs per SM.
template <int MT>
struct Tuning;
template <>
struct Tuning<1> {
  static constexpr int kStages = 5;
  static constexpr int kMinBlocks = 4;
};
template <>
struct Tuning<2> {
  static constexpr int kStages = 4;
  static constexpr int kMinBlocks = 3;
};

// Per-stage registers of the prefetch ring.
template <int BITS, int MT>
struct Stage;

template <int MT>
struct Stage<4, MT> {
  uint4 w;      // words of columns g, g+8, g+16, g+24 (slot 2t + h: tile t, row half h)
  uint4 x[MT];  // 8 activations of token g (+8 mt) at k = 32c + 8j ...
  uint4 t;      // their 8 column scales (fp16)
};

template <int MT>
struct Stage<8, MT> {
  uint4 w;
  uint2 x[MT];  // 4 activations at k = 16c + 4j ...
  uint2 t;
};

__device__ __forceinline__ uint32_t word_of(const uint4& w, int slot) {
  return slot == 0 ? w.x : slot == 1 ? w.y : slot == 2 ? w.z : w.w;
}

// The 32-bit words of a 16- or 8-byte load (pairs of fp16/bf16 values), zero-filled to 4.
__device__ __forceinline__ void words_of(const uint4& v, uint32_t (&o)[4]) {
  o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
}
__device__ __forceinline__ void words_of(const uint2& v, uint32_t (&o)[4]) {
  o[0] = v.x, o[1] = v.y, o[2] = o[3] = 0u;
}

template <typename T, int BITS, int MT, bool LUT>
__global__ void __launch_bounds__(kThreads, Tuning<MT>::kMinBlocks) sinq_gemv_kernel(const GemvArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int PACK = 32 / BITS;   // codes per word
  constexpr int CK = 4 * PACK;      // K per chunk: 4 word rows (one per lane of a quad)
  constexpr int KPL = PACK;         // K per lane per chunk
  constexpr int STAGES = Tuning<MT>::kStages;
  constexpr int VALS = kTiles * MT * 4;  // accumulator values per thread
  using A = Act<T>;
  static_assert(!LUT || BITS == 4, "codebooks index 4-bit containers");

  __shared__ uint16_t lut[16];
  __shared__ int last_split;
  if constexpr (LUT) {
    if (threadIdx.x < 16) lut[threadIdx.x] = A::bits(p.codebook[threadIdx.x]);
    __syncthreads();
  }

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // mma groupID: weight column within a tile, token within a token tile
  const int j = lane & 3;   // threadID_in_group: which word row of the chunk
  const int m0 = blockIdx.x * kGemvTokenBlock;
  const int col0 = (blockIdx.y * kWarps + warp) * (16 * kTiles);  // n_pad % 128 == 0: always < n_pad
  const int wt = col0 >> 5;

  const int split = blockIdx.z;
  const int kbeg = split * p.k_per_split;
  const int kend = min(p.k, kbeg + p.k_per_split);
  const int nch = kend > kbeg ? (kend - kbeg) / CK : 0;
  const int cpg = p.group_size / CK;  // chunks per group (group_size % CK == 0, checked on the host)

  const int blk = col0 / p.align;
  const int shard = __ldg(p.blk + 3 * blk);
  const int out0 = __ldg(p.blk + 3 * blk + 1);
  const int valid = __ldg(p.blk + 3 * blk + 2);
  const int local0 = col0 - blk * p.align;

  const uint4* wbase = reinterpret_cast<const uint4*>(p.qweight) + detail::lane_words(kbeg / CK, wt, p.n_pad, lane);
  const int64_t wstep = p.n_pad;  // 16-byte words per chunk: (n_pad / 32) warp tiles x 32 lanes
  const uint16_t* tbase = p.col_scales + static_cast<int64_t>(shard) * p.k + kbeg + KPL * j;
  const bool lane_has_token = m0 + g < p.m;  // token tile 0; tile 1 tokens are 8 later
  const T* xbase[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int tok = m0 + g + 8 * mt;
    xok[mt] = tok < p.m;
    xbase[mt] = static_cast<const T*>(p.x) + static_cast<int64_t>(xok[mt] ? tok : 0) * p.x_row_stride + kbeg + KPL * j;
  }

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

  Stage<BITS, MT> ring[STAGES];
  auto load = [&](Stage<BITS, MT>& st, int c) {
    st.w = __ldcs(wbase + c * wstep);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (BITS == 4) {
        st.x[mt] = xok[mt] ? __ldg(reinterpret_cast<const uint4*>(xbase[mt] + c * CK)) : make_uint4(0, 0, 0, 0);
      } else {
        st.x[mt] = xok[mt] ? __ldg(reinterpret_cast<const uint2*>(xbase[mt] + c * CK)) : make_uint2(0, 0);
      }
    }
    if constexpr (BITS == 4) {
      st.t = lane_has_token ? __ldg(reinterpret_cast<const uint4*>(tbase + c * CK)) : make_uint4(0, 0, 0, 0);
    } else {
      st.t = lane_has_token ? __ldg(reinterpret_cast<const uint2*>(tbase + c * CK)) : make_uint2(0, 0);
    }
  };

  // (scale, zero) pairs of the current group for the lane's columns g + 8 slot
  uint4 sz;
  auto load_sz = [&](int group_index) {
    sz = __ldg(reinterpret_cast<const uint4*>(p.scales_zeros) + detail::lane_scales(group_index, wt, p.n_pad, g));
  };

  // A operand of tile t, step s: rows g / g+8 (slots 2t / 2t+1), code pairs (2s, 2s+1)
  auto weight_frag = [&](const uint4& w, int t, int s, uint32_t (&a)[4]) {
    const uint32_t w0 = t == 0 ? w.x : w.z;
    const uint32_t w1 = t == 0 ? w.y : w.w;
    if constexpr (BITS == 8) {
      a[0] = A::template byte_pair<0, 1>(w0);
      a[1] = A::template byte_pair<0, 1>(w1);
      a[2] = A::template byte_pair<2, 3>(w0);
      a[3] = A::template byte_pair<2, 3>(w1);
    } else if constexpr (LUT) {
      if (s == 0) {
        a[0] = detail::lut_pair<0>(w0, lut);
        a[1] = detail::lut_pair<0>(w1, lut);
        a[2] = detail::lut_pair<1>(w0, lut);
        a[3] = detail::lut_pair<1>(w1, lut);
      } else {
        a[0] = detail::lut_pair<2>(w0, lut);
        a[1] = detail::lut_pair<2>(w1, lut);
        a[2] = detail::lut_pair<3>(w0, lut);
        a[3] = detail::lut_pair<3>(w1, lut);
      }
    } else {
      if (s == 0) {
        a[0] = detail::nibble_pair<T, 0>(w0);
        a[1] = detail::nibble_pair<T, 0>(w1);
        a[2] = detail::nibble_pair<T, 1>(w0);
        a[3] = detail::nibble_pair<T, 1>(w1);
      } else {
        a[0] = detail::nibble_pair<T, 2>(w0);
        a[1] = detail::nibble_pair<T, 2>(w1);
        a[2] = detail::nibble_pair<T, 3>(w0);
        a[3] = detail::nibble_pair<T, 3>(w1);
      }
    }
  };

  auto compute = [&](const Stage<BITS, MT>& st) {
    // token operand: xt = x * t rounded to T, pairs in k order
    constexpr int PAIRS = KPL / 2;
    uint32_t bx[MT][PAIRS];
    uint32_t ts[4];
    words_of(st.t, ts);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      uint32_t xs[4];
      words_of(st.x[mt], xs);
#pragma unroll
      for (int q = 0; q < PAIRS; ++q) {
        const float2 xf = A::unpack(xs[q]);
        const float2 tf = __half22float2(*reinterpret_cast<const __half2*>(&ts[q]));
        bx[mt][q] = A::pack(xf.x * tf.x, xf.y * tf.y);
      }
    }
    constexpr int STEPS = BITS == 4 ? 2 : 1;
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) A::mma(sxg[mt], ones, bx[mt][2 * s], bx[mt][2 * s + 1]);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        uint32_t a[4];
        weight_frag(st.w, t, s, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) A::mma(accg[t][mt], a, bx[mt][2 * s], bx[mt][2 * s + 1]);
      }
    }
  };

  // y += s * (sum xt V(q) - z * sum xt) for the group just finished; c0/c1 are tokens
  // (2j, 2j+1) of column g, c2/c3 the same tokens of column g+8.
  auto finish_group = [&]() {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t pair = word_of(sz, 2 * t + h);
        const float2 s_z = __half22float2(*reinterpret_cast<const __half2*>(&pair));
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
  for (int s = 0; s < STAGES; ++s)
    if (s < nch) load(ring[s], s);

  int in_group = 0;
  for (int c0 = 0; c0 < nch; c0 += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      const int c = c0 + s;
      if (c < nch) {
        compute(ring[s]);
        if (c + STAGES < nch) load(ring[s], c + STAGES);
        if (++in_group == cpg || c + 1 == nch) {
          finish_group();
          in_group = 0;
          ++group_index;
          if (c + 1 < nch) load_sz(group_index);
        }
      }
    }
  }

  // acc[t][mt][2h + e] is column col0 + 16t + 8h + g, token m0 + 8mt + 2j + e; value index
  // v = (t * MT + mt) * 4 + 2h + e is the same in every split, so the last CTA re-reads
  // exactly the values each of its threads owns.
  // Calls f(t, h, mt, e, value index) for every accumulator that is a real output.
  auto for_each_output = [&](auto&& f) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (local0 + 16 * t + 8 * h + g < valid && m0 + 8 * mt + 2 * j + e < p.m) f(t, h, mt, e, (t * MT + mt) * 4 + 2 * h + e);
  };
  auto store = [&](int t, int h, int mt, int e, float v) {
    const int col = out0 + local0 + 16 * t + 8 * h + g;
    const int tok = m0 + 8 * mt + 2 * j + e;
    if (p.bias != nullptr) v += A::to_float(static_cast<const T*>(p.bias)[col]);
    static_cast<T*>(p.out)[static_cast<int64_t>(tok) * p.n + col] = A::from_float(v);
  };

  if (p.split_k == 1) {
    for_each_output([&](int t, int h, int mt, int e, int) { store(t, h, mt, e, acc[t][mt][2 * h + e]); });
    return;
  }

  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  float* tile_ws = p.workspace + static_cast<int64_t>(tile) * p.split_k * (VALS * kThreads);
  float* mine = tile_ws + static_cast<int64_t>(split) * (VALS * kThreads) + threadIdx.x;
  for_each_output([&](int t, int h, int mt, int e, int v) { mine[v * kThreads] = acc[t][mt][2 * h + e]; });
  __threadfence();  // this thread's partials are visible device-wide before the arrival
  __syncthreads();
  if (threadIdx.x == 0) last_split = atomicAdd(p.counters + tile, 1) == p.split_k - 1;
  __syncthreads();
  if (!last_split) return;
  __threadfence();
  for_each_output([&](int t, int h, int mt, int e, int v) {
    const float* src = tile_ws + static_cast<int64_t>(v) * kThreads + threadIdx.x;
    float sum = 0.f;
    for (int s = 0; s < p.split_k; ++s) sum += __ldcg(src + static_cast<int64_t>(s) * (VALS * kThreads));
    store(t, h, mt, e, sum);
  });
  if (threadIdx.x == 0) p.counters[tile] = 0;  // zero again for the next launch
#else
  __trap();  // built for an architecture without bf16 mma.sync (needs sm_80+)
#endif
}

int token_tiles(int m) { return m > 8 ? 2 : 1; }

int token_blocks(int m) { return m > 8 ? (m + kGemvTokenBlock - 1) / kGemvTokenBlock : 1; }

// Calls f(kernel pointer) with the instantiation these arguments select.
template <typename F>
auto with_kernel(const GemvArgs& a, F&& f) {
  const bool two = token_tiles(a.m) == 2;
  const bool lut = a.codebook != nullptr;
  auto pick = [&](auto tag) {
    using TT = decltype(tag);
    if (a.bits == 8) return two ? f(&sinq_gemv_kernel<TT, 8, 2, false>) : f(&sinq_gemv_kernel<TT, 8, 1, false>);
    if (lut) return two ? f(&sinq_gemv_kernel<TT, 4, 2, true>) : f(&sinq_gemv_kernel<TT, 4, 1, true>);
    return two ? f(&sinq_gemv_kernel<TT, 4, 2, false>) : f(&sinq_gemv_kernel<TT, 4, 1, false>);
  };
  if (a.act == ActType::kFloat16) return pick(__half{});
  return pick(__nv_bfloat16{});
}

}  // namespace

const char* gemv_unsupported_reason(const GemvArgs& a) {
  if (a.bits != 4 && a.bits != 8) return "container bits must be 4 or 8";
  if (a.codebook != nullptr && a.bits != 4) return "codebooks need 4-bit codes";
  if (a.m < 0 || a.m > kGemvMaxM) return "M must be at most 64";
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
  if ((reinterpret_cast<uintptr_t>(a.qweight) & 15) != 0 || (reinterpret_cast<uintptr_t>(a.scales_zeros) & 15) != 0)
    return "weights must be 16-byte aligned";
  return nullptr;
}

int gemv_tiles(const GemvArgs& a) { return (a.n_pad / kGemvCtaColumns) * token_blocks(a.m); }

int64_t gemv_workspace_floats(const GemvArgs& a) {
  if (a.split_k <= 1) return 0;
  return static_cast<int64_t>(gemv_tiles(a)) * a.split_k * kThreads * kTiles * token_tiles(a.m) * 4;
}

int gemv_ctas_per_sm(const GemvArgs& a) {
  constexpr int kVariants = 12, kDevices = 64;
  static int cache[kVariants][kDevices] = {};  // 0: not asked yet (benign race: same value)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) device = 0;
  const int variant = (a.act == ActType::kFloat16 ? 0 : 6) + (a.bits == 8 ? 4 : a.codebook ? 2 : 0) +
                      (token_tiles(a.m) == 2 ? 1 : 0);
  int& slot = cache[variant][device];
  if (slot == 0) {
    int blocks = 0;
    const cudaError_t err = with_kernel(a, [&](auto kernel) {
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0);
    });
    slot = err == cudaSuccess && blocks > 0 ? blocks : 1;
  }
  return slot;
}

void plan_split_k(GemvArgs& a, int requested, int num_sms, int ctas_per_sm) {
  const int groups = std::max(1, a.k / std::max(1, a.group_size));
  int split = requested;
  if (split <= 0) {
    const int base = std::max(1, gemv_tiles(a));
    // one wave of resident CTAs on every SM; slices of >= 256 K; fp32 partials (8 bytes per
    // output per split, written and read once, mostly in L2) <= the packed weight bytes
    const int want = (std::max(1, ctas_per_sm) * std::max(1, num_sms) + base - 1) / base;
    const int by_len = std::max(1, a.k / 256);
    const int by_traffic = std::max(1, (a.k * a.bits) / (64 * std::max(1, a.m)));
    split = std::min({want, by_len, by_traffic, 64});
  }
  split = std::max(1, std::min(split, groups));
  const int groups_per_split = (groups + split - 1) / split;
  a.k_per_split = groups_per_split * a.group_size;
  a.split_k = (groups + groups_per_split - 1) / groups_per_split;
}

cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  const dim3 grid(token_blocks(a.m), a.n_pad / kGemvCtaColumns, a.split_k);
  with_kernel(a, [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(a);
    return cudaSuccess;
  });
  return cudaGetLastError();
}

}  // namespace sinq_cuda
