// SINQ linear op on CPU: shared declarations of the ISA-specific kernels (no torch here).
//
//   y[m, n] = sum_k (x[m, k] * t[shard(n), k]) * (V(Q[n, k]) - z[n, k / g]) * s[n, k / g] + bias[n]
//
// V(q) = q for uniform layers, V(q) = CB[q] for NF4/NF3 layers (docs/design.md §1).
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
//     bf16 kernels: (w >> 4h) & 0xF of the 32 words indexes the bf16 pair operand of
//     _mm512_dpbf16_ps for k-pair 4*k8 + h of 16 rows, lanes = rows.
//     int8 kernels: the 32-bit lane of row r holds the bytes [Q0|Q2, Q4|Q6, Q1|Q3, Q5|Q7]
//     (low|high nibble, k relative to 8*k8), so w & 0x0F0F0F0F and (w >> 4) & 0x0F0F0F0F
//     are the u8 operands of _mm512_dpbusd_epi32 for k (0, 4, 1, 5) and (2, 6, 3, 7).
//   qweight, "byte" layout (5 <= nbits <= 8), uint8 [T, K/2, 4, 32]:
//     byte [t, kp, sb, 2*r + e] = Q[row, 2*kp + e]
//   scales_zeros, fp16 [T, G, 2, 64]: [.., 0, j] = s[64t + j, g], [.., 1, j] = z[64t + j, g]
//     (the checkpoint's fp16 values; z stays a float, never rounded).
//   col_scales, fp32 [S, K].
//
// Exact (bf16) activations, the default. xt = x * t is rounded to bf16 once per call and
// shard (one "hi" row); for fp16/fp32 activations a second "lo" row bf16(xt - hi) carries
// the rounding error, so that the result keeps ~16 mantissa bits of the activations. Code
// values become bf16 through a 32-entry table (one vpermw): uniform codes map to
// 0x4300 | q, the bf16 number 128 + q (exact), NF codes to bf16(CB[q]) ("hi"), plus a
// second table of bf16(CB[q] - hi) ("lo") when the activations are split, so that those
// products are exact. Per (row, group) the kernels compute
//   acc = sum_k xt[k] * V'(q[k])      (bf16 products are exact, fp32 accumulation)
//   y  += s * (acc - (z + off) * sum_k xt[k])      (one fused fnmadd, one fma)
// with V' = 128 + q and off = 128 (uniform nibbles and 5-7 bit bytes), V' = q and off = 0
// (8-bit codes, converted int -> fp32 -> bf16, exact), V' = CB[q] and off = 0 (NF).
//
// int8 activations (opt-in, uniform nibble layers): per (row, group) xt is quantized to
// int8 with d = max|xt| / 127 (round to nearest even), and
//   y += s * d * sum_k xq[k] * q[k] - (z * s) * (d * sum_k xq[k])
// with exact int32 dot products (_mm512_dpbusd_epi32: twice the multiply-adds per
// instruction of _mm512_dpbf16_ps). Group sizes must be multiples of 8 (one nibble word
// spans 8 k).
//
// Decoded weights (bf16 activations, nibble codes, batches of at least kDecodedMinRows rows,
// unless the caller asks for exact products; AVX-512 only): large batches are compute-bound,
// and there the per-group epilogue above (2 FMAs per 32 dot products at group 64, on the
// pipes the dot products need) is what keeps the exact kernel below a bf16 GEMM. Instead,
// a k-block of a tile is decoded once per row chunk into bf16 weights
// W[n, k] = bf16((V(q) - z) * s) (V(q) exact in fp32, one rounding, as a bf16 checkpoint of
// the same weights would hold them), and a plain register-blocked bf16 micro-kernel runs
// all rows of the chunk over it: the decoding is amortized over the rows, and there is no
// per-group work left. Numerics: bf16 x * t times bf16 weights, fp32 accumulation (the
// error of a bf16 linear layer; docs/design.md §4.2). In this mode lut / lut_lo hold
// V(q) itself (exact hi + lo split for NF codes).
//
// Work split (run_items): a work item is (row chunk, tile); row chunks hold at most
// kChunkBytes of activations, so that a chunk stays in L2 while all weight tiles stream
// past it (decode-sized batches are a single chunk, and the items are the tiles). Inside
// an item, micro blocks of up to kMicroRows activation rows: one or two rows sweep the
// whole tile at once (the codes are read once; two accumulator sets hide the dot-product
// latency), more rows sweep it in two halves so that the running sums stay in registers.
// On AMD Zen 4 the dot products share their pipes with every fp32 multiply/FMA, while
// the code decoding (shifts, masks, vpermw) and int <-> float conversions run beside
// them: the per-group epilogue (2 FMAs per accumulator in bf16, 3 in int8) is the cost
// to keep small, not the decoding.
#pragma once

#include <cstdint>

namespace sinq_cpu {

constexpr int kTileRows = 64;
constexpr int kSubRows = 16;
constexpr int kMicroRows = 6;   // activation rows per micro-kernel call; even (hi/lo pairs)
constexpr int kLutSize = 32;    // vpermw table: entry i is the value of code i & 15
constexpr int64_t kChunkBytes = int64_t(384) << 10;  // activation bytes per row chunk at most (stays in L2)
// decoded-weight mode: smallest batch that uses it (measured sweep: docs/design.md §4.2),
// k per decoded block (64 k-pairs x 64 rows of bf16 pairs: 16 KiB, stays in L1), rows per
// chunk at most (a k-block of their activations and their fp32 sums stay in L2)
constexpr int64_t kDecodedMinRows = 256;
constexpr int kDecodedKBlock = 128;
constexpr int64_t kDecodedChunkRows = 512;
static_assert(kMicroRows % 2 == 0, "hi/lo row pairs must never straddle a micro-kernel call");

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2 };

// kind of code layout / conversion
enum CodeKind : int { kNibble = 0, kByte7 = 1, kByte8 = 2 };

static constexpr int code_kind(int nbits) { return nbits <= 4 ? kNibble : (nbits < 8 ? kByte7 : kByte8); }
static constexpr int64_t tile_bytes(int nbits, int64_t K) { return nbits <= 4 ? K * 32 : K * 64; }
static constexpr int dtype_bytes(int dtype) { return dtype == kF32 ? 4 : 2; }
// byte position of k (0..7) inside an 8-k block of int8 activations: k0 k4 k1 k5 k2 k6 k3 k7
static constexpr int int8_pos(int k) { return 2 * (k & 3) + (k >> 2); }

struct TileInfo {
  int32_t shard;
  int32_t row0;  // first output row (unpadded numbering)
  int32_t rows;  // valid rows in this tile (<= 64)
};

struct Params {
  const uint8_t* qw;        // packed codes
  const uint16_t* sz;       // fp16 scales/zeros [T, G, 2, 64]
  const TileInfo* tiles;
  int64_t num_tiles;
  int64_t K, G, gs;
  int nbits;
  // code values (nibble layouts): bf16 bits lut[q] (kLutSize entries, i & 15), off as above;
  // lut_lo: bf16 residuals of an exact split (NF codes, split activations) or nullptr
  const uint16_t* lut;
  const uint16_t* lut_lo;
  float off;
  bool uniform;             // lut is the 0x4300 | q table
  // activations, per shard s rows [s * Mp, (s + 1) * Mp):
  //   bf16: xa = bf16 x * t [S, Mp, K] (hi/lo rows when split), xsum [S, Mp, G] group sums
  //   int8: xa = int8 [S, Mp, K] (int8_pos order), xsum = d * sum xq, xd = d [S, Mp, G]
  bool int8;
  const void* xa;
  const float* xsum;
  const float* xd;
  int64_t Mp;               // activation rows per shard (2*M when split)
  bool split;               // hi/lo rows (fp16/fp32 activations, bf16 mode)
  bool decoded;             // decoded-weight mode (bf16 activations, nibble codes, Kernels::decoded)
  int64_t chunk_rows;       // rows of a work item (multiple of kMicroRows)
  void* y;                  // output [M, ldy]
  int y_dtype;
  int64_t ldy;
  const void* bias;         // [N] or nullptr
  int bias_dtype;
};

// The kernels of one instruction set. Work items (run_items) are (row chunk, tile) pairs;
// `block` computes a micro block, `store_row` writes one finished output row segment.
struct Kernels {
  // tot[j * 64 + r] (fp32, no bias) for x rows [xrow0, xrow0 + mt) of tile `tile`, mt <= kMicroRows
  void (*block)(const Params& p, int64_t tile, int64_t xrow0, int mt, float* tot);
  // decoded-weight mode: c[j * 64 + r] (fp32, no bias) for x rows [xrow0, xrow0 + rows) of
  // tile `tile`, rows <= p.chunk_rows; nullptr when the ISA has no such mode
  void (*decoded)(const Params& p, int64_t tile, int64_t xrow0, int64_t rows, float* c);
  // y[0:n] = a[0:n] (+ b[0:n] when b) (+ bias[0:n] when bias), n <= 64
  void (*store_row)(const float* a, const float* b, const void* bias, int bias_dtype, void* y, int y_dtype, int n);
  // one activation row x[0:K] * t[0:K]: bf16 hi (and lo, when lo) + their group sums
  void (*prep_bf16)(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, uint16_t* hi, uint16_t* lo,
                    float* sum_hi, float* sum_lo);
  // one activation row: int8 codes in int8_pos order, d and d * sum(codes) per group
  void (*prep_int8)(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, int8_t* q, float* d,
                    float* dsum);
};

const Kernels& scalar_kernels();
#if defined(__x86_64__) || defined(_M_X64)
#define SINQ_CPU_X86 1
const Kernels& avx2_kernels();
const Kernels& avx512bf16_kernels();
#endif

// Where a micro block reads (plain inline code: the SIMD files call it from their
// target-attributed functions, so it is compiled for the baseline target everywhere)
inline const uint8_t* tile_codes(const Params& p, int64_t tile) { return p.qw + tile * tile_bytes(p.nbits, p.K); }
inline const uint16_t* tile_scales(const Params& p, int64_t tile) { return p.sz + tile * p.G * 2 * kTileRows; }
// row of the activation buffers (xa, xsum, xd) for x-buffer row xrow of this tile's shard
inline int64_t act_row(const Params& p, int64_t tile, int64_t xrow) { return (int64_t)p.tiles[tile].shard * p.Mp + xrow; }

// Work items [i0, i1): item it covers row chunk it / num_tiles and tile it % num_tiles.
void run_items(const Kernels& k, const Params& p, int64_t i0, int64_t i1);

// Portable pieces the ISA files share (sinq_cpu_scalar.cpp)
float half_to_float(uint16_t h);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);  // round to nearest even
float load_as_float(const void* base, int dtype, int64_t i);
void store_row_portable(const float* a, const float* b, const void* bias, int bias_dtype, void* y, int y_dtype, int n);
void prep_bf16_portable(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, uint16_t* hi, uint16_t* lo,
                        float* sum_hi, float* sum_lo);
void prep_int8_portable(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, int8_t* q, float* d,
                        float* dsum);

}  // namespace sinq_cpu
