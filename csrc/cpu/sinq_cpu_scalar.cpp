// SINQ linear op on CPU: the work-item driver every instruction set shares, the portable
// helpers (conversions, output rows, activation preparation) and the scalar kernel, which
// computes every mode of the SIMD kernels (same layout, same tables, same int8
// quantization) one product at a time. Compiled for the baseline target; no torch here
// beyond c10's fp16/bf16 conversions.
#include "sinq_cpu_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace sinq_cpu {

float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float f) { return c10::BFloat16(f).x; }

float load_as_float(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[i];
    case kF16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

void store_row_portable(const float* a, const float* b, const void* bias, int bias_dtype, void* y, int y_dtype, int n) {
  for (int i = 0; i < n; ++i) {
    float v = a[i];
    if (b) v += b[i];
    if (bias) v += load_as_float(bias, bias_dtype, i);
    switch (y_dtype) {
      case kF32: static_cast<float*>(y)[i] = v; break;
      case kF16: static_cast<c10::Half*>(y)[i] = c10::Half(v); break;
      default: static_cast<uint16_t*>(y)[i] = float_to_bf16(v); break;
    }
  }
}

void prep_bf16_portable(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, uint16_t* hi, uint16_t* lo,
                        float* sum_hi, float* sum_lo) {
  for (int64_t g = 0; g * gs < K; ++g) {
    float ah = 0.f, al = 0.f;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const float v = load_as_float(x, x_dtype, k) * t[k];
      hi[k] = float_to_bf16(v);
      ah += bf16_to_float(hi[k]);
      if (lo) {
        lo[k] = float_to_bf16(v - bf16_to_float(hi[k]));
        al += bf16_to_float(lo[k]);
      }
    }
    sum_hi[g] = ah;
    if (lo) sum_lo[g] = al;
  }
}

void prep_int8_portable(const void* x, int x_dtype, const float* t, int64_t K, int64_t gs, int8_t* q, float* d,
                        float* dsum) {
  for (int64_t g = 0; g * gs < K; ++g) {
    float amax = 0.f;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
      amax = std::max(amax, std::fabs(load_as_float(x, x_dtype, k) * t[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const int v = (int)std::nearbyint(load_as_float(x, x_dtype, k) * t[k] * inv);  // round to nearest even
      q[(k & ~int64_t(7)) + int8_pos((int)(k & 7))] = (int8_t)v;
      sum += v;
    }
    d[g] = amax / 127.f;
    dsum[g] = d[g] * (float)sum;
  }
}

void run_items(const Kernels& kr, const Params& p, int64_t i0, int64_t i1) {
  alignas(64) float tot[kMicroRows * kTileRows];
  thread_local std::vector<float> decoded_sums;  // decoded-weight mode: [chunk rows, 64]
  if (p.decoded && decoded_sums.size() < (size_t)(p.chunk_rows * kTileRows))
    decoded_sums.resize((size_t)(p.chunk_rows * kTileRows));
  const int step = p.split ? 2 : 1;
  const int ybytes = dtype_bytes(p.y_dtype), bbytes = dtype_bytes(p.bias_dtype);
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t tile = it % p.num_tiles;
    const int64_t r0 = (it / p.num_tiles) * p.chunk_rows;
    const int64_t r1 = std::min(r0 + p.chunk_rows, p.Mp);
    const TileInfo& ti = p.tiles[tile];
    const void* bias = p.bias ? static_cast<const char*>(p.bias) + (int64_t)ti.row0 * bbytes : nullptr;
    auto store = [&](int64_t xrow, const float* a, const float* b) {
      char* y = static_cast<char*>(p.y) + ((xrow / step) * p.ldy + ti.row0) * ybytes;
      kr.store_row(a, b, bias, p.bias_dtype, y, p.y_dtype, ti.rows);
    };
    if (p.decoded) {
      kr.decoded(p, tile, r0, r1 - r0, decoded_sums.data());
      for (int64_t r = r0; r < r1; ++r) store(r, decoded_sums.data() + (r - r0) * kTileRows, nullptr);
      continue;
    }
    for (int64_t r = r0; r < r1; r += kMicroRows) {
      const int mt = (int)std::min<int64_t>(kMicroRows, r1 - r);
      kr.block(p, tile, r, mt, tot);
      for (int j = 0; j < mt; j += step)
        store(r + j, tot + j * kTileRows, p.split ? tot + (j + 1) * kTileRows : nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Scalar kernel
// ---------------------------------------------------------------------------------------
namespace {

inline int code_at(const uint8_t* qt, int nbits, int r, int64_t k) {
  const int sb = r / kSubRows, rr = r % kSubRows;
  if (nbits <= 4) {
    const int within = (int)(k % 8), e = within % 2, h = within / 2;
    const uint8_t* wp = qt + (k / 8) * 256 + sb * 64 + 2 * (2 * rr + e);
    return ((wp[0] | (wp[1] << 8)) >> (4 * h)) & 0xF;
  }
  return qt[(k / 2) * 128 + sb * 32 + 2 * rr + (int)(k % 2)];
}

void scalar_block(const Params& p, int64_t tile, int64_t xrow0, int mt, float* tot) {
  const TileInfo& ti = p.tiles[tile];
  const int64_t K = p.K, G = p.G, gs = p.gs;
  const uint8_t* qt = tile_codes(p, tile);
  const uint16_t* szt = tile_scales(p, tile);
  float value[256];  // V'(q) of every code
  for (int q = 0; q < 256; ++q)
    value[q] = p.nbits <= 4 ? bf16_to_float(p.lut[q & 15]) + (p.lut_lo ? bf16_to_float(p.lut_lo[q & 15]) : 0.f)
                            : (float)q + p.off;
  for (int j = 0; j < mt; ++j) {
    const int64_t row = act_row(p, tile, xrow0 + j);
    const float* xsum = p.xsum + row * G;
    for (int r = 0; r < ti.rows; ++r) {
      float y = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const float s = half_to_float(szt[g * 128 + r]);
        const float z = half_to_float(szt[g * 128 + 64 + r]);
        if (p.int8) {
          const int8_t* xq = static_cast<const int8_t*>(p.xa) + row * K;
          int acc = 0;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
            acc += (int)xq[(k & ~int64_t(7)) + int8_pos((int)(k & 7))] * code_at(qt, p.nbits, r, k);
          y += s * p.xd[row * G + g] * (float)acc - z * s * xsum[g];
        } else {
          const uint16_t* xb = static_cast<const uint16_t*>(p.xa) + row * K;
          float acc = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += bf16_to_float(xb[k]) * value[code_at(qt, p.nbits, r, k)];
          y += s * (acc - (z + p.off) * xsum[g]);
        }
      }
      tot[j * kTileRows + r] = y;
    }
  }
}

const Kernels kScalarKernels{scalar_block, nullptr, store_row_portable, prep_bf16_portable, prep_int8_portable};

}  // namespace

const Kernels& scalar_kernels() { return kScalarKernels; }

}  // namespace sinq_cpu
