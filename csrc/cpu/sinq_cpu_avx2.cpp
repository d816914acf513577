// AVX2 + FMA fallback kernels of the SINQ linear op (CPUs without AVX512_BF16).
//
// Same resident layout and same numerics as the AVX-512 path (see sinq_cpu_kernel.h):
// bf16 activations with code values 128 + q (uniform) or the codebook table (NF, here as
// fp32: hi + lo of the exact split, or hi alone, as the AVX-512 products), the bf16 pair
// dot product emulated with two fp32 FMAs on 8 rows; int8 activations with
// vpmaddubsw + vpmaddwd (exact: |code * x| <= 15 * 127, no saturation). Output rows and
// activation preparation use the portable code (sinq_cpu_scalar.cpp). Like the AVX-512
// file, everything here carries a function-level target attribute.
#include "sinq_cpu_kernel.h"

#ifdef SINQ_CPU_X86

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SINQ_T256 __attribute__((target("avx2,fma,f16c")))

namespace sinq_cpu {
namespace {

enum Mode : int { kUniform = 0, kTable = 1, kInt8 = 2, kBytes = 3 };

// fp32 value of 16-entry table `tab` at idx (32-bit lanes, 0..15)
SINQ_T256 static inline __m256 lookup16(__m256 tab_lo, __m256 tab_hi, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab_lo, idx), _mm256_permutevar8x32_ps(tab_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// One tile x MT activation rows; loop order group -> sub-block -> k so that the
// accumulators (MT x 2 halves of 8 rows) fit the 16 ymm registers.
template <int MT, int MODE>
SINQ_T256 static void block_mode(const Params& p, int64_t tile, int64_t xrow0, float* __restrict tot) {
  const int64_t G = p.G, gs = p.gs;
  const uint8_t* __restrict qt = tile_codes(p, tile);
  const uint16_t* __restrict szt = tile_scales(p, tile);
  const uint32_t* xr[MT];
  const float* xsr[MT];
  const float* dr[MT];
  for (int i = 0; i < MT; ++i) {
    const int64_t row = act_row(p, tile, xrow0 + i);
    xr[i] = MODE == kInt8 ? reinterpret_cast<const uint32_t*>(static_cast<const int8_t*>(p.xa) + row * p.K)
                          : reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.xa) + row * p.K);
    xsr[i] = p.xsum + row * G;
    dr[i] = MODE == kInt8 ? p.xd + row * G : nullptr;
  }
  std::memset(tot, 0, sizeof(float) * MT * kTileRows);
  const __m256i c0F = _mm256_set1_epi16(0x000F);
  const __m256i c43 = _mm256_set1_epi16(0x4300);
  const __m256i cHi = _mm256_set1_epi32((int)0xFFFF0000u);
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 tab_lo = _mm256_setzero_ps(), tab_hi = _mm256_setzero_ps();
  if constexpr (MODE == kTable) {
    alignas(32) float tab[16];
    for (int q = 0; q < 16; ++q)
      tab[q] = bf16_to_float(p.lut[q]) + (p.lut_lo ? bf16_to_float(p.lut_lo[q]) : 0.f);
    tab_lo = _mm256_load_ps(tab);
    tab_hi = _mm256_load_ps(tab + 8);
  }
  const float off = MODE == kUniform || MODE == kTable ? p.off : 0.f;

  for (int64_t g = 0; g < G; ++g) {
    for (int sb = 0; sb < 4; ++sb) {
      __m256 acc[MT][2];
      __m256i iacc[MT][2];
      for (int i = 0; i < MT; ++i) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        iacc[i][0] = iacc[i][1] = _mm256_setzero_si256();
      }
      if constexpr (MODE == kBytes) {
        const int64_t p0 = g * (gs / 2), p1 = p0 + gs / 2;
        const __m256i cLo = _mm256_set1_epi32(0xFFFF);
        for (int64_t kp = p0; kp < p1; ++kp) {
          const uint8_t* pq = qt + kp * 128 + sb * 32;
          __m256 we[2], wo[2];
          for (int h = 0; h < 2; ++h) {
            const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pq + h * 16)));
            we[h] = _mm256_cvtepi32_ps(_mm256_and_si256(w, cLo));
            wo[h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 16));
          }
          for (int i = 0; i < MT; ++i) {
            const __m256i xa = _mm256_set1_epi32((int)xr[i][kp]);
            const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xa, 16));
            const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xa, cHi));
            for (int h = 0; h < 2; ++h) {
              acc[i][h] = _mm256_fmadd_ps(we[h], xe, acc[i][h]);
              acc[i][h] = _mm256_fmadd_ps(wo[h], xo, acc[i][h]);
            }
          }
        }
      } else {
        const int64_t q0 = g * (gs / 8), q1 = q0 + gs / 8;
        for (int64_t k8 = q0; k8 < q1; ++k8) {
          const uint8_t* pq = qt + k8 * 256 + sb * 64;
          __m256i w[2];
          for (int h = 0; h < 2; ++h) w[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + 32 * h));
          if constexpr (MODE == kInt8) {
            for (int h = 0; h < 2; ++h) {
              const __m256i lo = _mm256_and_si256(w[h], low4);
              const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w[h], 4), low4);
              for (int i = 0; i < MT; ++i) {
                const __m256i xa = _mm256_set1_epi32((int)xr[i][2 * k8]);
                const __m256i xb = _mm256_set1_epi32((int)xr[i][2 * k8 + 1]);
                iacc[i][h] = _mm256_add_epi32(iacc[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xa), ones));
                iacc[i][h] = _mm256_add_epi32(iacc[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb), ones));
              }
            }
          } else {
            for (int pair = 0; pair < 4; ++pair) {  // k-pair 4 * k8 + pair: even k in the low 16 bits
              __m256 ev[2], od[2];
              for (int h = 0; h < 2; ++h) {
                if constexpr (MODE == kUniform) {
                  const __m256i v = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w[h], 4 * pair), c0F), c43);
                  ev[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                  od[h] = _mm256_castsi256_ps(_mm256_and_si256(v, cHi));
                } else {
                  const __m256i m4 = _mm256_set1_epi32(0xF);
                  ev[h] = lookup16(tab_lo, tab_hi, _mm256_and_si256(_mm256_srli_epi32(w[h], 4 * pair), m4));
                  od[h] = lookup16(tab_lo, tab_hi, _mm256_and_si256(_mm256_srli_epi32(w[h], 16 + 4 * pair), m4));
                }
              }
              for (int i = 0; i < MT; ++i) {
                const __m256i xa = _mm256_set1_epi32((int)xr[i][4 * k8 + pair]);
                const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xa, 16));
                const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xa, cHi));
                for (int h = 0; h < 2; ++h) {
                  acc[i][h] = _mm256_fmadd_ps(ev[h], xe, acc[i][h]);
                  acc[i][h] = _mm256_fmadd_ps(od[h], xo, acc[i][h]);
                }
              }
            }
          }
        }
      }
      const uint16_t* szg = szt + g * 128 + sb * 16;
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(szg + h * 8)));
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(szg + 64 + h * 8)));
        for (int i = 0; i < MT; ++i) {
          float* tp = tot + i * kTileRows + sb * kSubRows + h * 8;
          __m256 t = _mm256_loadu_ps(tp);
          if constexpr (MODE == kInt8) {
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(iacc[i][h]), _mm256_set1_ps(dr[i][g]));
            t = _mm256_fnmadd_ps(_mm256_mul_ps(z, s), _mm256_set1_ps(xsr[i][g]), _mm256_fmadd_ps(v, s, t));
          } else {
            const __m256 d = _mm256_fnmadd_ps(_mm256_add_ps(z, _mm256_set1_ps(off)), _mm256_set1_ps(xsr[i][g]), acc[i][h]);
            t = _mm256_fmadd_ps(d, s, t);
          }
          _mm256_storeu_ps(tp, t);
        }
      }
    }
  }
}

// up to kMicroRows rows, at most 4 per call (16 ymm registers)
template <int MODE>
SINQ_T256 static void block_rows(const Params& p, int64_t tile, int64_t xrow0, int mt, float* tot) {
  for (int j = 0; j < mt; j += 4) {
    float* t = tot + j * kTileRows;
    switch (mt - j) {
      case 1: block_mode<1, MODE>(p, tile, xrow0 + j, t); break;
      case 2: block_mode<2, MODE>(p, tile, xrow0 + j, t); break;
      case 3: block_mode<3, MODE>(p, tile, xrow0 + j, t); break;
      default: block_mode<4, MODE>(p, tile, xrow0 + j, t); break;
    }
  }
}

SINQ_T256 static void block(const Params& p, int64_t tile, int64_t xrow0, int mt, float* tot) {
  if (code_kind(p.nbits) != kNibble) return block_rows<kBytes>(p, tile, xrow0, mt, tot);
  if (p.int8) return block_rows<kInt8>(p, tile, xrow0, mt, tot);
  if (p.uniform) return block_rows<kUniform>(p, tile, xrow0, mt, tot);
  block_rows<kTable>(p, tile, xrow0, mt, tot);
}

const Kernels kAvx2Kernels{block, nullptr, store_row_portable, prep_bf16_portable, prep_int8_portable};

}  // namespace

const Kernels& avx2_kernels() { return kAvx2Kernels; }

}  // namespace sinq_cpu

#endif  // SINQ_CPU_X86
