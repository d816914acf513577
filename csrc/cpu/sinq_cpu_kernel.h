// SINQ linear op on CPU: shared declarations of the ISA-specific kernels.
//
//   y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (Q[n, k] - z[n, k / g]) * s[n, k / g] + bias[n]
//
// Resident layout (written by sinq_vllm/kernels/cpu_backend.py::repack, read here):
//
//   Rows are grouped in tiles of 64 output rows (4 sub-blocks of 16 rows, one per
//   AVX-512 fp32 lane vector). Every merged-layer shard is padded on its own to a
//   multiple of 64 rows (padded rows: code 0, scale 0, zero 0), so a tile belongs to
//   exactly one shard and uses one column-scale row. Tiles are numbered shard by shard.
//
//   qweight, "nibble" layout (nbits <= 4), uint8 [T, K/8, 4, 64] viewed as uint16 words
//   [T, K/8, 4, 32]:
//     word [t, k8, sb, 2*r + e] = sum_h Q[row, 8*k8 + 2*h + e] << (4*h),  h = 0..3
//     with row = 64*t + 16*sb + r (padded numbering), r < 16, e < 2 (little endian).
//     (w >> 4h) & 0xF of the 32 words is the bf16 pair operand of _mm512_dpbf16_ps for
//     k-pair 4*k8 + h of 16 rows, lanes = rows: no shuffle, no horizontal reduction.
//   qweight, "byte" layout (5 <= nbits <= 8), uint8 [T, K/2, 4, 32]:
//     byte [t, kp, sb, 2*r + e] = Q[row, 2*kp + e]
//   scales_zeros, fp16 [T, G, 2, 64]: [.., 0, j] = s[64t + j, g], [.., 1, j] = z[64t + j, g]
//     (the checkpoint's fp16 values; z stays a float, never rounded).
//   col_scales, fp32 [S, K].
//
// Codes become bf16 without any conversion instruction: 0x4300 | q is the bf16 number
// 128 + q (exact for q < 128), so the kernels compute
//   acc = sum_k xt[k] * (128 + q[k])  (bf16 products are exact, fp32 accumulation)
//   y  += s * (acc - (z + 128) * sum_k xt[k])        (one fused fnmadd, one fma)
// per (row, group). 8-bit codes (q up to 255) are converted with int->fp32->bf16 instead
// (exact) and use offset 0. Group sizes must be multiples of 8 (one nibble word spans 8 k).
// xt = x * t is rounded to bf16 once per call (one "hi" row); for
// fp16/fp32 activations a second "lo" row bf16(xt - hi) carries the rounding error so
// that the result keeps ~16 mantissa bits of the activations.
#pragma once

#include <cstdint>

namespace sinq_cpu {

constexpr int kTileRows = 64;
constexpr int kSubRows = 16;
constexpr int kMicroRows = 4;   // activation rows per micro-kernel call (AVX-512); even (hi/lo pairs)
constexpr int64_t kChunkRows = 48;  // activation rows per work item
static_assert(kMicroRows % 2 == 0 && kChunkRows % kMicroRows == 0 && kChunkRows % 4 == 0,
              "hi/lo row pairs must never straddle a micro-kernel call or a work item");

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2 };

// kind of code layout / conversion
enum CodeKind : int { kNibble = 0, kByte7 = 1, kByte8 = 2 };

static constexpr int code_kind(int nbits) { return nbits <= 4 ? kNibble : (nbits < 8 ? kByte7 : kByte8); }
static constexpr int64_t tile_bytes(int nbits, int64_t K) { return nbits <= 4 ? K * 32 : K * 64; }

struct TileInfo {
  int32_t shard;
  int32_t row0;  // first output row (unpadded numbering)
  int32_t rows;  // valid rows in this tile (<= 64)
};

struct Params {
  const uint8_t* qw;        // packed codes
  const uint16_t* sz;       // fp16 scales/zeros [T, G, 2, 64]
  const uint16_t* xb;       // bf16 activations [S, Mp, K] (x * t per shard; hi/lo rows when split)
  const float* xsum;        // [S, Mp, G] group sums of xb rows
  const TileInfo* tiles;
  int64_t num_tiles;
  int64_t K, G, gs;
  int nbits;
  int64_t Mp;               // activation rows per shard in xb (2*M when split)
  bool split;               // hi/lo rows (fp16/fp32 activations)
  int64_t nmc;              // work items per tile (row chunks of kChunkRows)
  void* y;                  // output [M, ldy]
  int y_dtype;
  int64_t ldy;
  const void* bias;         // [N] or nullptr
  int bias_dtype;
};

struct XPrep {
  const void* x;            // [M, ldx]
  int x_dtype;
  int64_t ldx;
  const float* t;           // [S, K]
  int64_t S, M, K, G, gs, Mp;
  bool split;
  uint16_t* xb;
  float* xsum;
};

// Work items it in [i0, i1): tile = it / nmc, row chunk = it % nmc.
void run_items_scalar(const Params& p, int64_t i0, int64_t i1);
// Activation rows r in [r0, r1) over S * M (shard-major).
void prep_x_scalar(const XPrep& q, int64_t r0, int64_t r1);

#if defined(__x86_64__) || defined(_M_X64)
#define SINQ_CPU_X86 1
void run_items_avx2(const Params& p, int64_t i0, int64_t i1);
void run_items_avx512bf16(const Params& p, int64_t i0, int64_t i1);
void prep_x_avx512bf16(const XPrep& q, int64_t r0, int64_t r1);
#endif

}  // namespace sinq_cpu
