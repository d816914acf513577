// AVX2 + FMA fallback kernels of the SINQ linear op (CPUs without AVX512_BF16).
//
// Same resident layout and same numerics as the AVX-512 path (bf16 activations, codes as
// the bf16 numbers 128 + q, fp32 accumulation); the bf16 pair dot product is emulated
// with two fp32 FMAs on 8 rows. Like the AVX-512 file, everything here carries a
// function-level target attribute and includes no shared inline code.
#include "sinq_cpu_kernel.h"

#ifdef SINQ_CPU_X86

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SINQ_T256 __attribute__((target("avx2,fma,f16c")))

namespace sinq_cpu {
namespace {

constexpr int kMicroRows2 = 4;

SINQ_T256 static inline float bf16_to_f(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SINQ_T256 static inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

SINQ_T256 static inline float load_f(const void* base, int dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (dtype == kF16) return _cvtsh_ss(h);
  return bf16_to_f(h);
}

SINQ_T256 static inline void store_f(void* base, int dtype, int64_t i, float v) {
  if (dtype == kF32)
    static_cast<float*>(base)[i] = v;
  else if (dtype == kF16)
    static_cast<uint16_t*>(base)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  else
    static_cast<uint16_t*>(base)[i] = f_to_bf16(v);
}

// One tile x MT activation rows; loop order group -> sub-block -> k so that the
// accumulators (MT x 2 halves of 8 rows) fit the 16 ymm registers.
template <int MT, int KIND>
SINQ_T256 static void gemm_block(const Params& p, const TileInfo& ti, int64_t tile, int64_t xrow0,
                                 float* __restrict tot) {
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
  std::memset(tot, 0, sizeof(float) * MT * 64);
  const __m256i c0F = _mm256_set1_epi16(0x000F);
  const __m256i c43 = _mm256_set1_epi16(0x4300);
  const __m256i cHi = _mm256_set1_epi32((int)0xFFFF0000u);
  const float offs = KIND == kNibble ? 128.f : 0.f;

  for (int64_t g = 0; g < G; ++g) {
    for (int sb = 0; sb < 4; ++sb) {
      __m256 acc[MT][2];
      for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      if constexpr (KIND == kNibble) {
        const int64_t q0 = g * (gs / 8), q1 = q0 + gs / 8;
        for (int64_t k8 = q0; k8 < q1; ++k8) {
          const uint8_t* pq = qt + k8 * 256 + sb * 64;
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + 32));
          for (int h = 0; h < 4; ++h) {
            const __m256i v0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w0, 4 * h), c0F), c43);
            const __m256i v1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w1, 4 * h), c0F), c43);
            const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
            const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, cHi));
            const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
            const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, cHi));
            for (int i = 0; i < MT; ++i) {
              const __m256i xa = _mm256_set1_epi32((int)xr[i][4 * k8 + h]);
              const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xa, 16));
              const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xa, cHi));
              acc[i][0] = _mm256_fmadd_ps(e0, xe, acc[i][0]);
              acc[i][0] = _mm256_fmadd_ps(o0, xo, acc[i][0]);
              acc[i][1] = _mm256_fmadd_ps(e1, xe, acc[i][1]);
              acc[i][1] = _mm256_fmadd_ps(o1, xo, acc[i][1]);
            }
          }
        }
      } else {
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
      }
      const uint16_t* szg = szt + g * 128 + sb * 16;
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(szg + h * 8)));
        const __m256 zo = _mm256_add_ps(
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(szg + 64 + h * 8))), _mm256_set1_ps(offs));
        for (int i = 0; i < MT; ++i) {
          const __m256 d = _mm256_fnmadd_ps(zo, _mm256_set1_ps(xsr[i][g]), acc[i][h]);
          float* tp = tot + i * 64 + sb * 16 + h * 8;
          _mm256_storeu_ps(tp, _mm256_fmadd_ps(d, s, _mm256_loadu_ps(tp)));
        }
      }
    }
  }
}

SINQ_T256 static void finalize(const Params& p, const TileInfo& ti, const float* tot, int nx, int64_t xrow0) {
  const int step = p.split ? 2 : 1;
  for (int j = 0; j < nx; j += step) {
    const int64_t m = xrow0 / step + j / step;
    for (int r = 0; r < ti.rows; ++r) {
      float v = tot[j * 64 + r];
      if (p.split) v += tot[(j + 1) * 64 + r];
      const int64_t n = (int64_t)ti.row0 + r;
      if (p.bias) v += load_f(p.bias, p.bias_dtype, n);
      store_f(p.y, p.y_dtype, m * p.ldy + n, v);
    }
  }
}

template <int KIND>
SINQ_T256 static void run_items_kind(const Params& p, int64_t i0, int64_t i1) {
  alignas(64) float tot[kMicroRows2 * 64];
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t tile = it / p.nmc, mc = it % p.nmc;
    const TileInfo& ti = p.tiles[tile];
    const int64_t r0 = mc * kChunkRows;
    const int64_t r1 = (r0 + kChunkRows < p.Mp) ? r0 + kChunkRows : p.Mp;
    for (int64_t r = r0; r < r1; r += kMicroRows2) {
      const int mt = (int)((r1 - r) < kMicroRows2 ? (r1 - r) : kMicroRows2);
      switch (mt) {
        case 1: gemm_block<1, KIND>(p, ti, tile, r, tot); break;
        case 2: gemm_block<2, KIND>(p, ti, tile, r, tot); break;
        case 3: gemm_block<3, KIND>(p, ti, tile, r, tot); break;
        default: gemm_block<4, KIND>(p, ti, tile, r, tot); break;
      }
      finalize(p, ti, tot, mt, r);
    }
  }
}

}  // namespace

SINQ_T256 void run_items_avx2(const Params& p, int64_t i0, int64_t i1) {
  switch (code_kind(p.nbits)) {
    case kNibble: run_items_kind<kNibble>(p, i0, i1); break;
    case kByte7: run_items_kind<kByte7>(p, i0, i1); break;
    default: run_items_kind<kByte8>(p, i0, i1); break;
  }
}

}  // namespace sinq_cpu

#endif  // SINQ_CPU_X86
