// AVX-512 + AVX512_BF16 (+ AVX512_VNNI for int8 activations) kernels of the SINQ linear
// op (see sinq_cpu_kernel.h for the layout and the math).
//
// Every function in this translation unit carries a function-level target attribute and
// the file is compiled for the baseline target (the header's inline helpers stay baseline
// code), so nothing here runs unless the dispatcher in sinq_cpu_kernel.cpp found these
// instruction sets: the library stays loadable and correct on AVX2-only CPUs.
#include "sinq_cpu_kernel.h"

#ifdef SINQ_CPU_X86

#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

#define SINQ_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c,avx2")))

namespace sinq_cpu {
namespace {

SINQ_T512 static inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SINQ_T512 static inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
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

// Micro-kernel shape: MT activation rows x SB sub-blocks of 16 output rows per pass over K
// (4 / SB passes per tile). One or two rows take the whole tile at once (decode: the
// codes are read once, two accumulator sets hide the dot-product latency); more rows take
// half a tile per pass so that their running sums stay in registers next to the
// accumulators (6 rows x 2 sub-blocks: 12 accumulators + 12 sums).
template <int MT>
struct Shape {
  static constexpr int kSB = MT <= 2 ? 4 : 2;
  static constexpr bool kDual = MT <= 2;
  static constexpr int kA2 = kDual ? MT : 1;
};

// Weight operands of the bf16 kernels, one load step at a time: values(h) gives, for SB
// sub-blocks from sb0, the bf16 pair operands of k-pair kPairs * step + h.
template <int SB>
struct NibbleCodes {  // a step is one k8 (4 k-pairs); codes -> bf16 through the vpermw table
  static constexpr int kPairs = 4;
  __m512i w[SB], lut, lut_lo;
  SINQ_T512 NibbleCodes(const Params& p)
      : lut(_mm512_loadu_si512(p.lut)), lut_lo(p.lut_lo ? _mm512_loadu_si512(p.lut_lo) : _mm512_setzero_si512()) {}
  SINQ_T512 inline void load(const uint8_t* qt, int64_t step, int sb0) {
    for (int sb = 0; sb < SB; ++sb) w[sb] = _mm512_loadu_si512(qt + step * 256 + (sb0 + sb) * 64);
  }
  // vpermw reads 5 index bits; the table repeats its 16 entries, so the next nibble's bit is harmless
  SINQ_T512 inline __m512i index(int h, int sb) const { return h == 0 ? w[sb] : _mm512_srli_epi16(w[sb], 4 * h); }
  SINQ_T512 inline void values(int h, __m512i* v) const {
    for (int sb = 0; sb < SB; ++sb) v[sb] = _mm512_permutexvar_epi16(index(h, sb), lut);
  }
  SINQ_T512 inline void lo_values(int h, __m512i* v) const {
    for (int sb = 0; sb < SB; ++sb) v[sb] = _mm512_permutexvar_epi16(index(h, sb), lut_lo);
  }
};

template <int SB, int KIND>
struct ByteCodes {  // a step is 2 k-pairs of one-byte codes
  static constexpr int kPairs = 2;
  const uint8_t* pq = nullptr;
  SINQ_T512 explicit ByteCodes(const Params&) {}
  SINQ_T512 inline void load(const uint8_t* qt, int64_t step, int sb0) { pq = qt + step * 256 + sb0 * 32; }
  SINQ_T512 inline void values(int h, __m512i* v) const {
    const uint8_t* ph = pq + h * 128;
    for (int sb = 0; sb < SB; ++sb) {
      if constexpr (KIND == kByte7) {  // 0x4300 | q: the bf16 number 128 + q
        v[sb] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph + sb * 32))),
                                _mm512_set1_epi16(0x4300));
      } else {  // 8-bit codes: exact through fp32
        const __m512 lo =
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ph + sb * 32))));
        const __m512 hi = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ph + sb * 32 + 16))));
        v[sb] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      }
    }
  }
  SINQ_T512 inline void lo_values(int, __m512i*) const {}
};

// scale and zero rows of one group for sub-block sb (fp16 -> fp32)
SINQ_T512 static inline __m512 group_scale(const uint16_t* szg, int sb) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg + sb * 16)));
}
SINQ_T512 static inline __m512 group_zero(const uint16_t* szg, int sb) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg + 64 + sb * 16)));
}

// bf16 activations: one dpbf16 per (k-pair, sub-block, row), lanes = output rows; kLo adds
// the exact residual table of NF codes. tot += s * (acc - (z + off) * xsum) per group.
template <int MT, template <int> class Codes, bool kLo>
SINQ_T512 static void bf16_block(const Params& p, int64_t tile, int64_t xrow0, float* tot) {
  using Sh = Shape<MT>;
  constexpr int SB = Sh::kSB;
  using C = Codes<SB>;
  const int64_t G = p.G, steps = p.gs / (2 * C::kPairs);
  const uint8_t* __restrict qt = tile_codes(p, tile);
  const uint16_t* __restrict szt = tile_scales(p, tile);
  const uint32_t* xr[MT];
  const float* xsr[MT];
  for (int i = 0; i < MT; ++i) {
    const int64_t row = act_row(p, tile, xrow0 + i);
    xr[i] = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.xa) + row * p.K);
    xsr[i] = p.xsum + row * G;
  }
  C codes(p);
  const __m512 off = _mm512_set1_ps(p.off);

  for (int sb0 = 0; sb0 < 4; sb0 += SB) {
    __m512 sums[MT][SB];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) sums[i][sb] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[MT][SB];
      __m512 acc2[Sh::kA2][SB];
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
        for (int sb = 0; sb < SB; ++sb) acc[i][sb] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < Sh::kA2; ++i)
#pragma GCC unroll 4
        for (int sb = 0; sb < SB; ++sb) acc2[i][sb] = _mm512_setzero_ps();

      for (int64_t step = g * steps; step < (g + 1) * steps; ++step) {
        codes.load(qt, step, sb0);
#pragma GCC unroll 4
        for (int h = 0; h < C::kPairs; ++h) {
          __m512i v[SB], vl[SB];
          codes.values(h, v);
          if constexpr (kLo) codes.lo_values(h, vl);
#pragma GCC unroll 8
          for (int i = 0; i < MT; ++i) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xr[i][C::kPairs * step + h]);
#pragma GCC unroll 4
            for (int sb = 0; sb < SB; ++sb) {
              __m512& a = (Sh::kDual && (h & 1)) ? acc2[i < Sh::kA2 ? i : 0][sb] : acc[i][sb];
              a = _mm512_dpbf16_ps(a, (__m512bh)v[sb], xb);
              if constexpr (kLo) a = _mm512_dpbf16_ps(a, (__m512bh)vl[sb], xb);
            }
          }
        }
      }

      const uint16_t* szg = szt + g * 128;
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) {
        const __m512 s = group_scale(szg, sb0 + sb);
        const __m512 zo = _mm512_add_ps(group_zero(szg, sb0 + sb), off);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
          __m512 a = acc[i][sb];
          if constexpr (Sh::kDual) a = _mm512_add_ps(a, acc2[i < Sh::kA2 ? i : 0][sb]);
          sums[i][sb] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zo, _mm512_set1_ps(xsr[i][g]), a), s, sums[i][sb]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) _mm512_storeu_ps(tot + i * kTileRows + (sb0 + sb) * kSubRows, sums[i][sb]);
  }
}

// Nibble codes, int8 activations: u8 codes (low / high nibbles) x s8 activations, exact
// int32 sums per group, then tot += s * d * acc - (z * s) * (d * sum xq).
template <int MT>
SINQ_T512 static void int8_block(const Params& p, int64_t tile, int64_t xrow0, float* tot) {
  using Sh = Shape<MT>;
  constexpr int SB = Sh::kSB;
  const int64_t G = p.G, steps = p.gs / 8;
  const uint8_t* __restrict qt = tile_codes(p, tile);
  const uint16_t* __restrict szt = tile_scales(p, tile);
  const int32_t* xr[MT];
  const float* dr[MT];
  const float* er[MT];
  for (int i = 0; i < MT; ++i) {
    const int64_t row = act_row(p, tile, xrow0 + i);
    xr[i] = reinterpret_cast<const int32_t*>(static_cast<const int8_t*>(p.xa) + row * p.K);
    dr[i] = p.xd + row * G;
    er[i] = p.xsum + row * G;
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);

  for (int sb0 = 0; sb0 < 4; sb0 += SB) {
    __m512 sums[MT][SB];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) sums[i][sb] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i acc[MT][SB];
      __m512i acc2[Sh::kA2][SB];  // high nibbles in their own chains (one or two rows)
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
        for (int sb = 0; sb < SB; ++sb) acc[i][sb] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int i = 0; i < Sh::kA2; ++i)
#pragma GCC unroll 4
        for (int sb = 0; sb < SB; ++sb) acc2[i][sb] = _mm512_setzero_si512();

      for (int64_t k8 = g * steps; k8 < (g + 1) * steps; ++k8) {
        const uint8_t* pq = qt + k8 * 256 + sb0 * 64;
        __m512i lo[SB], hi[SB];
#pragma GCC unroll 4
        for (int sb = 0; sb < SB; ++sb) {
          const __m512i w = _mm512_loadu_si512(pq + sb * 64);
          lo[sb] = _mm512_and_si512(w, low4);
          hi[sb] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
        }
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
          const __m512i xa = _mm512_set1_epi32(xr[i][2 * k8]);
          const __m512i xb = _mm512_set1_epi32(xr[i][2 * k8 + 1]);
#pragma GCC unroll 4
          for (int sb = 0; sb < SB; ++sb) {
            acc[i][sb] = _mm512_dpbusd_epi32(acc[i][sb], lo[sb], xa);
            __m512i& a2 = Sh::kDual ? acc2[i < Sh::kA2 ? i : 0][sb] : acc[i][sb];
            a2 = _mm512_dpbusd_epi32(a2, hi[sb], xb);
          }
        }
      }

      const uint16_t* szg = szt + g * 128;
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) {
        const __m512 s = group_scale(szg, sb0 + sb);
        const __m512 zs = _mm512_mul_ps(group_zero(szg, sb0 + sb), s);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
          __m512i a = acc[i][sb];
          if constexpr (Sh::kDual) a = _mm512_add_epi32(a, acc2[i < Sh::kA2 ? i : 0][sb]);
          const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(dr[i][g]));
          sums[i][sb] = _mm512_fnmadd_ps(zs, _mm512_set1_ps(er[i][g]), _mm512_fmadd_ps(v, s, sums[i][sb]));
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
      for (int sb = 0; sb < SB; ++sb) _mm512_storeu_ps(tot + i * kTileRows + (sb0 + sb) * kSubRows, sums[i][sb]);
  }
}

template <int SB>
using Byte7 = ByteCodes<SB, kByte7>;
template <int SB>
using Byte8 = ByteCodes<SB, kByte8>;

// F<MT> for a run-time mt in [1, kMicroRows]
#define SINQ_ROWS_SWITCH(CALL) \
  switch (mt) {                \
    case 1: CALL(1); break;    \
    case 2: CALL(2); break;    \
    case 3: CALL(3); break;    \
    case 4: CALL(4); break;    \
    case 5: CALL(5); break;    \
    default: CALL(6); break;   \
  }
static_assert(kMicroRows == 6, "SINQ_ROWS_SWITCH covers 1..6 rows");

SINQ_T512 static void block(const Params& p, int64_t tile, int64_t xrow0, int mt, float* tot) {
  switch (code_kind(p.nbits)) {
    case kNibble:
      if (p.int8) {
#define SINQ_CALL(R) int8_block<R>(p, tile, xrow0, tot)
        SINQ_ROWS_SWITCH(SINQ_CALL)
#undef SINQ_CALL
      } else if (p.lut_lo) {
#define SINQ_CALL(R) bf16_block<R, NibbleCodes, true>(p, tile, xrow0, tot)
        SINQ_ROWS_SWITCH(SINQ_CALL)
#undef SINQ_CALL
      } else {
#define SINQ_CALL(R) bf16_block<R, NibbleCodes, false>(p, tile, xrow0, tot)
        SINQ_ROWS_SWITCH(SINQ_CALL)
#undef SINQ_CALL
      }
      break;
    case kByte7:
#define SINQ_CALL(R) bf16_block<R, Byte7, false>(p, tile, xrow0, tot)
      SINQ_ROWS_SWITCH(SINQ_CALL)
#undef SINQ_CALL
      break;
    default:
#define SINQ_CALL(R) bf16_block<R, Byte8, false>(p, tile, xrow0, tot)
      SINQ_ROWS_SWITCH(SINQ_CALL)
#undef SINQ_CALL
      break;
  }
}
#undef SINQ_ROWS_SWITCH

// ---------------------------------------------------------------------------------------
// Decoded-weight mode (sinq_cpu_kernel.h): bf16 weights of a k-block, then a bf16 GEMM
// ---------------------------------------------------------------------------------------

// dst[kp * 64 + row] = the bf16 pair (W[row, 2 kp], W[row, 2 kp + 1]) of k-pairs
// [k0 / 2, (k0 + kn) / 2) of the tile, W = bf16((V(q) - z) * s): V(q) comes exactly from the
// tables (hi, + lo for NF codes), (V - z) * s is one fused multiply-add with -(z * s), which
// is exact in fp32 (both fp16), so W is the product rounded once to fp32, then to bf16.
template <bool kLo>
SINQ_T512 static void decode_kblock(const Params& p, int64_t tile, int64_t k0, int64_t kn, uint32_t* dst) {
  const uint8_t* __restrict qt = tile_codes(p, tile);
  const uint16_t* __restrict szt = tile_scales(p, tile);
  const __m512i lut = _mm512_loadu_si512(p.lut);
  const __m512i lut_lo = kLo ? _mm512_loadu_si512(p.lut_lo) : _mm512_setzero_si512();
  const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);
  // cvtne2ps_pbh(odd, even) puts the 16 even-k values in words 0-15 and the odd ones in
  // 16-31; word 2r of a pair operand is row r's even k, word 2r + 1 its odd k
  alignas(64) static const uint16_t kPairOrder[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pair_order = _mm512_load_si512(kPairOrder);
  for (int64_t k8 = k0 / 8; k8 < (k0 + kn) / 8; ++k8) {
    const uint16_t* szg = szt + (k8 * 8 / p.gs) * 128;
    uint32_t* d8 = dst + (k8 - k0 / 8) * 4 * kTileRows;
#pragma GCC unroll 4
    for (int sb = 0; sb < 4; ++sb) {
      const __m512 s = group_scale(szg, sb);
      const __m512 nzs = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(group_zero(szg, sb), s));
      const __m512i w = _mm512_loadu_si512(qt + k8 * 256 + sb * 64);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const __m512i idx = h == 0 ? w : _mm512_srli_epi16(w, 4 * h);  // vpermw reads 5 bits: the table repeats
        const __m512i v = _mm512_permutexvar_epi16(idx, lut);
        __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        __m512 odd_v = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
        if constexpr (kLo) {
          const __m512i vl = _mm512_permutexvar_epi16(idx, lut_lo);
          even = _mm512_add_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(vl, 16)));
          odd_v = _mm512_add_ps(odd_v, _mm512_castsi512_ps(_mm512_and_si512(vl, odd)));
        }
        even = _mm512_fmadd_ps(even, s, nzs);
        odd_v = _mm512_fmadd_ps(odd_v, s, nzs);
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd_v, even);
        _mm512_store_si512(d8 + h * kTileRows + sb * kSubRows, _mm512_permutexvar_epi16(pair_order, packed));
      }
    }
  }
}

// c[i * 64 + r] (+)= sum over nkp k-pairs of x rows xr[i] (bf16 pairs) times the decoded
// block: MT rows x 4 sub-blocks of accumulators (24 registers at MT = 6), no epilogue.
template <int MT>
SINQ_T512 static void decoded_gemm(const uint32_t* __restrict wb, int64_t nkp, const uint32_t* const* xr, float* c,
                                   bool first) {
  __m512 acc[MT][4];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
    for (int sb = 0; sb < 4; ++sb)
      acc[i][sb] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * kTileRows + sb * kSubRows);
  for (int64_t kp = 0; kp < nkp; ++kp) {
    __m512i b[4];
#pragma GCC unroll 4
    for (int sb = 0; sb < 4; ++sb) b[sb] = _mm512_load_si512(wb + kp * kTileRows + sb * kSubRows);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xr[i][kp]);
#pragma GCC unroll 4
      for (int sb = 0; sb < 4; ++sb) acc[i][sb] = _mm512_dpbf16_ps(acc[i][sb], (__m512bh)b[sb], xb);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 4
    for (int sb = 0; sb < 4; ++sb) _mm512_storeu_ps(c + i * kTileRows + sb * kSubRows, acc[i][sb]);
}

SINQ_T512 static void decoded(const Params& p, int64_t tile, int64_t xrow0, int64_t rows, float* c) {
  alignas(64) uint32_t wb[kDecodedKBlock / 2 * kTileRows];
  const uint16_t* xa = static_cast<const uint16_t*>(p.xa);
  for (int64_t k0 = 0; k0 < p.K; k0 += kDecodedKBlock) {
    const int64_t kn = std::min<int64_t>(kDecodedKBlock, p.K - k0);  // a multiple of 8 (K is of the group size)
    if (p.lut_lo)
      decode_kblock<true>(p, tile, k0, kn, wb);
    else
      decode_kblock<false>(p, tile, k0, kn, wb);
    for (int64_t r = 0; r < rows; r += kMicroRows) {
      const int mt = (int)std::min<int64_t>(kMicroRows, rows - r);
      const uint32_t* xr[kMicroRows];
      for (int i = 0; i < mt; ++i)
        xr[i] = reinterpret_cast<const uint32_t*>(xa + act_row(p, tile, xrow0 + r + i) * p.K + k0);
      float* cr = c + r * kTileRows;
      switch (mt) {
        case 1: decoded_gemm<1>(wb, kn / 2, xr, cr, k0 == 0); break;
        case 2: decoded_gemm<2>(wb, kn / 2, xr, cr, k0 == 0); break;
        case 3: decoded_gemm<3>(wb, kn / 2, xr, cr, k0 == 0); break;
        case 4: decoded_gemm<4>(wb, kn / 2, xr, cr, k0 == 0); break;
        case 5: decoded_gemm<5>(wb, kn / 2, xr, cr, k0 == 0); break;
        default: decoded_gemm<6>(wb, kn / 2, xr, cr, k0 == 0); break;
      }
    }
  }
}

SINQ_T512 static void store_row(const float* a, const float* b, const void* bias, int bias_dtype, void* y, int y_dtype,
                                int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = first_lanes(n - i);
    __m512 v = _mm512_maskz_loadu_ps(mask, a + i);
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b + i));
    if (bias) v = _mm512_add_ps(v, load_f32x16(bias, bias_dtype, i, mask));
    store_f32x16(y, y_dtype, i, v, mask);
  }
}

// hi = bf16(x * t) (+ lo = bf16(x * t - hi)) and the group sums of what was stored.
SINQ_T512 static void prep_bf16(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, uint16_t* hi,
                                uint16_t* lo, float* sum_hi, float* sum_lo) {
  for (int64_t g = 0; g * gs < K; ++g) {
    __m512 ah = _mm512_setzero_ps(), al = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const __mmask16 mask = first_lanes((g + 1) * gs - k);
      const __m512 v = _mm512_mul_ps(load_f32x16(x, x_dtype, k, mask), _mm512_maskz_loadu_ps(mask, t + k));
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(hi + k, mask, h);
      const __m512 hf = bf16x16_to_f32(h);
      ah = _mm512_add_ps(ah, hf);
      if (lo) {
        const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
        _mm256_mask_storeu_epi16(lo + k, mask, l);
        al = _mm512_add_ps(al, bf16x16_to_f32(l));
      }
    }
    sum_hi[g] = _mm512_reduce_add_ps(ah);
    if (lo) sum_lo[g] = _mm512_reduce_add_ps(al);
  }
}

// int8 codes of x * t per group (d = max|x t| / 127, round to nearest even), in int8_pos order.
SINQ_T512 static void prep_int8(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, int8_t* q, float* d,
                                float* dsum) {
  // within each 8: k0 k4 k1 k5 k2 k6 k3 k7 (int8_pos)
  const __m128i order = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t g = 0; g * gs < K; ++g) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const __mmask16 mask = first_lanes((g + 1) * gs - k);
      const __m512 v = _mm512_mul_ps(load_f32x16(x, x_dtype, k, mask), _mm512_maskz_loadu_ps(mask, t + k));
      amax = _mm512_max_ps(amax, _mm512_and_ps(v, sign));
    }
    const float mx = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const __mmask16 mask = first_lanes((g + 1) * gs - k);
      const __m512 v = _mm512_mul_ps(load_f32x16(x, x_dtype, k, mask), _mm512_maskz_loadu_ps(mask, t + k));
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // MXCSR: round to nearest even
      sum = _mm512_add_epi32(sum, qi);
      _mm_mask_storeu_epi8(q + k, mask, _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(qi), order));
    }
    d[g] = mx / 127.f;
    dsum[g] = d[g] * (float)_mm512_reduce_add_epi32(sum);
  }
}

const Kernels kAvx512Kernels{block, decoded, store_row, prep_bf16, prep_int8};

}  // namespace

const Kernels& avx512bf16_kernels() { return kAvx512Kernels; }

}  // namespace sinq_cpu

#endif  // SINQ_CPU_X86
