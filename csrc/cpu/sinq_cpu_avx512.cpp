// AVX-512 + AVX512_BF16 kernels of the SINQ linear op (see sinq_cpu_kernel.h for the layout).
//
// Every function in this translation unit carries a function-level target attribute and
// the file includes nothing but <immintrin.h>/<cstdint>/<cstring> and our own header, so
// no inline function of a shared header is ever instantiated with AVX-512 code: the
// library stays loadable and correct on AVX2-only CPUs, where the dispatcher in
// sinq_cpu_kernel.cpp never calls into this file.
#include "sinq_cpu_kernel.h"

#ifdef SINQ_CPU_X86

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SINQ_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,avx2")))

namespace sinq_cpu {
namespace {

#ifndef SINQ_CPU_PREFETCH
#define SINQ_CPU_PREFETCH 0
#endif
// software prefetch distance of the code stream in decode (MT <= 2); 0: hardware only
constexpr int kPrefetchBytes = SINQ_CPU_PREFETCH;

SINQ_T512 static inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SINQ_T512 static inline __m512 load_f32x16(const void* base, int dtype, int64_t idx, __mmask16 m) {
  if (dtype == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + idx);
  if (dtype == kF16) return _mm512_cvtph_ps(h);
  return bf16x16_to_f32(h);
}

SINQ_T512 static inline void store_f32x16(void* base, int dtype, int64_t idx, __m512 v, __mmask16 m) {
  if (dtype == kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + idx, m, v);
  } else if (dtype == kF16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + idx, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + idx, m, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// One tile (64 rows) x MT activation rows [xrow0, xrow0 + MT) of the x buffer.
// Writes the fp32 result (without bias) to tot[MT][64].
template <int MT, int KIND>
SINQ_T512 static void gemm_block(const Params& p, const TileInfo& ti, int64_t tile, int64_t xrow0,
                                 float* __restrict tot) {
  constexpr bool kDual = MT <= 2;  // two accumulator sets to hide the dpbf16 latency
  constexpr int kA2 = kDual ? MT : 1;
  const int64_t K = p.K, G = p.G, gs = p.gs;
  const uint8_t* __restrict qt = p.qw + tile * tile_bytes(p.nbits, K);
  const uint16_t* __restrict szt = p.sz + tile * G * 128;
  const uint32_t* xr[MT];
  const float* xsr[MT];
  for (int i = 0; i < MT; ++i) {
    const int64_t row = (int64_t)ti.shard * p.Mp + xrow0 + i;
    xr[i] = reinterpret_cast<const uint32_t*>(p.xb + row * K);
    xsr[i] = p.xsum + row * G;
  }
  constexpr bool kRegTot = MT == 1;  // small blocks keep the running sums in registers
  __m512 totr[kRegTot ? MT : 1][4];
  if constexpr (kRegTot) {
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < 4; ++sb) totr[i][sb] = _mm512_setzero_ps();
  } else {
    std::memset(tot, 0, sizeof(float) * MT * 64);
  }
  const __m512i c0F = _mm512_set1_epi16(0x000F);
  const __m512i c43 = _mm512_set1_epi16(0x4300);
  const __m512 off = _mm512_set1_ps(KIND == kByte8 ? 0.f : 128.f);

  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MT][4];
    __m512 acc2[kA2][4];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < 4; ++sb) acc[i][sb] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < kA2; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < 4; ++sb) acc2[i][sb] = _mm512_setzero_ps();

    if constexpr (KIND == kNibble) {
      // 64 bytes = 32 words per (k8, sub-block); word j = 2*r + e holds the four nibbles of
      // k-pairs 4*k8 + h (h = 0..3) of row r: (w >> 4h) & 0xF | 0x4300 is the bf16 operand.
      const int64_t q0 = g * (gs / 8), q1 = q0 + gs / 8;
      for (int64_t k8 = q0; k8 < q1; ++k8) {
        const uint8_t* pq = qt + k8 * 256;
        if constexpr (kPrefetchBytes > 0 && MT <= 2) {
#pragma GCC unroll 4
          for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(pq + kPrefetchBytes + 64 * l), _MM_HINT_T0);
        }
        __m512i w[4];
#pragma GCC unroll 4
        for (int sb = 0; sb < 4; ++sb) w[sb] = _mm512_loadu_si512(pq + sb * 64);
#pragma GCC unroll 4
        for (int h = 0; h < 4; ++h) {
          __m512i v[4];
#pragma GCC unroll 4
          for (int sb = 0; sb < 4; ++sb) {
            if (h == 0)
              v[sb] = _mm512_ternarylogic_epi32(w[sb], c0F, c43, 0xEA);  // (w & 0xF) | 0x4300
            else if (h == 3)
              v[sb] = _mm512_or_si512(_mm512_srli_epi16(w[sb], 12), c43);
            else
              v[sb] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w[sb], 4 * h), c0F, c43, 0xEA);
          }
#pragma GCC unroll 8
          for (int i = 0; i < MT; ++i) {
            const __m512i xb = _mm512_set1_epi32((int)xr[i][4 * k8 + h]);
#pragma GCC unroll 4
            for (int sb = 0; sb < 4; ++sb) {
              if (kDual && (h & 1))
                acc2[i < kA2 ? i : 0][sb] = _mm512_dpbf16_ps(acc2[i < kA2 ? i : 0][sb], (__m512bh)v[sb], (__m512bh)xb);
              else
                acc[i][sb] = _mm512_dpbf16_ps(acc[i][sb], (__m512bh)v[sb], (__m512bh)xb);
            }
          }
        }
      }
    } else {
      const int64_t p0 = g * (gs / 2), p1 = p0 + gs / 2;
      for (int64_t kp = p0; kp < p1; kp += 2) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const uint8_t* pq = qt + (kp + h) * 128;
          __m512i v[4];
#pragma GCC unroll 4
          for (int sb = 0; sb < 4; ++sb) {
            if constexpr (KIND == kByte7) {
              v[sb] = _mm512_or_si512(
                  _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + sb * 32))), c43);
            } else {
              const __m512 lo = _mm512_cvtepi32_ps(
                  _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pq + sb * 32))));
              const __m512 hi = _mm512_cvtepi32_ps(
                  _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pq + sb * 32 + 16))));
              v[sb] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            }
          }
#pragma GCC unroll 8
          for (int i = 0; i < MT; ++i) {
            const __m512i xb = _mm512_set1_epi32((int)xr[i][kp + h]);
#pragma GCC unroll 4
            for (int sb = 0; sb < 4; ++sb) {
              if (kDual && h == 1)
                acc2[i < kA2 ? i : 0][sb] = _mm512_dpbf16_ps(acc2[i < kA2 ? i : 0][sb], (__m512bh)v[sb], (__m512bh)xb);
              else
                acc[i][sb] = _mm512_dpbf16_ps(acc[i][sb], (__m512bh)v[sb], (__m512bh)xb);
            }
          }
        }
      }
    }

    // group epilogue: tot += s * (acc - (z + off) * xsum)
    const uint16_t* szg = szt + g * 128;
#pragma GCC unroll 4
    for (int sb = 0; sb < 4; ++sb) {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg + sb * 16)));
      const __m512 zo = _mm512_add_ps(
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg + 64 + sb * 16))), off);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        __m512 a = acc[i][sb];
        if constexpr (kDual) a = _mm512_add_ps(a, acc2[i < kA2 ? i : 0][sb]);
        const __m512 d = _mm512_fnmadd_ps(zo, _mm512_set1_ps(xsr[i][g]), a);
        if constexpr (kRegTot) {
          totr[i < (kRegTot ? MT : 1) ? i : 0][sb] = _mm512_fmadd_ps(d, s, totr[i < (kRegTot ? MT : 1) ? i : 0][sb]);
        } else {
          float* tp = tot + i * 64 + sb * 16;
          _mm512_storeu_ps(tp, _mm512_fmadd_ps(d, s, _mm512_loadu_ps(tp)));
        }
      }
    }
  }
  if constexpr (kRegTot) {
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < 4; ++sb) _mm512_storeu_ps(tot + i * 64 + sb * 16, totr[i][sb]);
  }
}

// gemm_block<mt, KIND> for a run-time mt in [1, N]
template <int KIND, int N>
SINQ_T512 static inline void call_block(int mt, const Params& p, const TileInfo& ti, int64_t tile, int64_t r,
                                        float* tot) {
  if constexpr (N > 1) {
    if (mt < N) return call_block<KIND, N - 1>(mt, p, ti, tile, r, tot);
  }
  gemm_block<N, KIND>(p, ti, tile, r, tot);
}

// Adds bias, folds hi/lo rows and writes the valid rows of one tile for `nx` x-buffer rows.
SINQ_T512 static void finalize(const Params& p, const TileInfo& ti, const float* tot, int nx, int64_t xrow0) {
  const int step = p.split ? 2 : 1;
  for (int j = 0; j < nx; j += step) {
    const int64_t m = xrow0 / step + j / step;
    for (int sb = 0; sb < 4; ++sb) {
      const int valid = ti.rows - sb * 16;
      if (valid <= 0) break;
      const __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
      __m512 v = _mm512_loadu_ps(tot + j * 64 + sb * 16);
      if (p.split) v = _mm512_add_ps(v, _mm512_loadu_ps(tot + (j + 1) * 64 + sb * 16));
      const int64_t n = (int64_t)ti.row0 + sb * 16;
      if (p.bias) v = _mm512_add_ps(v, load_f32x16(p.bias, p.bias_dtype, n, mask));
      store_f32x16(p.y, p.y_dtype, m * p.ldy + n, v, mask);
    }
  }
}

template <int KIND>
SINQ_T512 static void run_items_kind(const Params& p, int64_t i0, int64_t i1) {
  alignas(64) float tot[kMicroRows * 64];
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t tile = it / p.nmc, mc = it % p.nmc;
    const TileInfo& ti = p.tiles[tile];
    const int64_t r0 = mc * kChunkRows;
    const int64_t r1 = (r0 + kChunkRows < p.Mp) ? r0 + kChunkRows : p.Mp;
    for (int64_t r = r0; r < r1; r += kMicroRows) {
      const int mt = (int)((r1 - r) < kMicroRows ? (r1 - r) : kMicroRows);
      call_block<KIND, kMicroRows>(mt, p, ti, tile, r, tot);
      finalize(p, ti, tot, mt, r);
    }
  }
}

}  // namespace

SINQ_T512 void run_items_avx512bf16(const Params& p, int64_t i0, int64_t i1) {
  switch (code_kind(p.nbits)) {
    case kNibble: run_items_kind<kNibble>(p, i0, i1); break;
    case kByte7: run_items_kind<kByte7>(p, i0, i1); break;
    default: run_items_kind<kByte8>(p, i0, i1); break;
  }
}

// xb = bf16(x * t) (+ lo row bf16(x * t - hi) when split) and per-group sums of what was stored.
SINQ_T512 void prep_x_avx512bf16(const XPrep& q, int64_t r0, int64_t r1) {
  const int64_t K = q.K, G = q.G, gs = q.gs;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r / q.M, m = r % q.M;
    const float* t = q.t + s * K;
    const int64_t xrow = s * q.Mp + (q.split ? 2 * m : m);
    uint16_t* hi = q.xb + xrow * K;
    uint16_t* lo = hi + K;
    float* sh = q.xsum + xrow * G;
    float* sl = sh + G;
    const int64_t xoff = m * q.ldx;
    for (int64_t g = 0; g < G; ++g) {
      __m512 ah = _mm512_setzero_ps(), al = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        const int64_t left = (g + 1) * gs - k;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512 v = _mm512_mul_ps(load_f32x16(q.x, q.x_dtype, xoff + k, mask), _mm512_maskz_loadu_ps(mask, t + k));
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(hi + k, mask, h);
        const __m512 hf = bf16x16_to_f32(h);
        ah = _mm512_add_ps(ah, hf);
        if (q.split) {
          const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
          _mm256_mask_storeu_epi16(lo + k, mask, l);
          al = _mm512_add_ps(al, bf16x16_to_f32(l));
        }
      }
      sh[g] = _mm512_reduce_add_ps(ah);
      if (q.split) sl[g] = _mm512_reduce_add_ps(al);
    }
  }
}

}  // namespace sinq_cpu

#endif  // SINQ_CPU_X86
