// SINQ prefill dequantizer: the dense weight of one merged shard,
//     W[r, k] = (V(Q[n, k]) - z[n, k / g]) * s[n, k / g] * t[shard, k],   n = col0 + r,
// in the activation dtype, for torch.matmul (cuBLAS) at large M (docs/design.md §4.2;
// sinq_vllm/kernels/gpu_layout.py prefill_linear). Pure CUDA; layout: sinq_cuda.h.
//
// Each thread takes the 16-byte lane block the decode kernel's lane would take (4 columns
// x one word row of a 4-row chunk), so a warp reads 512 contiguous bytes, and writes each
// column's 8 (4-bit) or 4 (8-bit) consecutive outputs with one 16- or 8-byte store: four
// lanes of a quad cover 32 consecutive k of a row. The column scale t is folded into W, so
// the matmul takes x as it is. Arithmetic in fp32, one rounding.

#include <cstdint>

#include "sinq_act.cuh"
#include "sinq_cuda.h"

namespace sinq_cuda {
namespace {

using detail::Act;

constexpr int kThreads = 128;

template <typename T, int BITS, bool LUT>
__global__ void __launch_bounds__(kThreads) sinq_dequant_kernel(const DequantArgs p) {
  constexpr int PACK = 32 / BITS;
  constexpr int CK = 4 * PACK;  // K per chunk (4 word rows)
  using A = Act<T>;
  static_assert(!LUT || BITS == 4, "codebooks index 4-bit containers");

  __shared__ float lut[16];
  if constexpr (LUT) {
    if (threadIdx.x < 16) lut[threadIdx.x] = p.codebook[threadIdx.x];
    __syncthreads();
  }

  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int lane = static_cast<int>(idx & 31);
  const int64_t rest = idx >> 5;
  const int warp_tiles = (p.rows + 31) / 32;
  const int wt = p.col0 / 32 + static_cast<int>(rest % warp_tiles);
  const int64_t c = rest / warp_tiles;
  if (c >= p.k / CK) return;
  const int g = lane >> 2, j = lane & 3;
  const int k0 = static_cast<int>(c) * CK + PACK * j;

  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(p.qweight) + detail::lane_words(c, wt, p.n_pad, lane));
  const uint4 sz = __ldg(reinterpret_cast<const uint4*>(p.scales_zeros) +
                         detail::lane_scales((c * CK) / p.group_size, wt, p.n_pad, g));
  float t[PACK];
  const uint16_t* tp = p.col_scales + static_cast<int64_t>(p.shard) * p.k + k0;
  if constexpr (BITS == 4) {
    const uint4 tv = __ldg(reinterpret_cast<const uint4*>(tp));
    const uint32_t tw[4] = {tv.x, tv.y, tv.z, tv.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&tw[q]));
      t[2 * q] = f.x, t[2 * q + 1] = f.y;
    }
  } else {
    const uint2 tv = __ldg(reinterpret_cast<const uint2*>(tp));
    const uint32_t tw[2] = {tv.x, tv.y};
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&tw[q]));
      t[2 * q] = f.x, t[2 * q + 1] = f.y;
    }
  }

  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  const uint32_t pairs[4] = {sz.x, sz.y, sz.z, sz.w};
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    const int r = wt * 32 + 8 * slot + g - p.col0;
    if (r >= p.rows) continue;
    const float2 s_z = __half22float2(*reinterpret_cast<const __half2*>(&pairs[slot]));
    uint32_t packed[PACK / 2];
#pragma unroll
    for (int i = 0; i < PACK; i += 2) {
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t code = BITS == 4 ? detail::nibble_code(words[slot], i + e) : (words[slot] >> (8 * (i + e))) & 0xFF;
        const float value = LUT ? lut[code] : static_cast<float>(code);
        v[e] = (value - s_z.y) * s_z.x * t[i + e];
      }
      packed[i / 2] = A::pack(v[0], v[1]);
    }
    T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(r) * p.k + k0;
    if constexpr (BITS == 4) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
    }
  }
}

template <typename T>
cudaError_t launch_act(const DequantArgs& a, cudaStream_t stream) {
  const int ck = a.bits == 4 ? 32 : 16;
  const int64_t threads = static_cast<int64_t>(a.k / ck) * ((a.rows + 31) / 32) * 32;
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  if (a.bits == 8) {
    sinq_dequant_kernel<T, 8, false><<<blocks, kThreads, 0, stream>>>(a);
  } else if (a.codebook != nullptr) {
    sinq_dequant_kernel<T, 4, true><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    sinq_dequant_kernel<T, 4, false><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

const char* dequant_unsupported_reason(const DequantArgs& a) {
  if (a.bits != 4 && a.bits != 8) return "container bits must be 4 or 8";
  if (a.codebook != nullptr && a.bits != 4) return "codebooks need 4-bit codes";
  const int ck = a.bits == 4 ? 32 : 16;
  if (a.group_size <= 0 || a.group_size % ck != 0 || a.k % a.group_size != 0)
    return a.bits == 4 ? "group size must be a multiple of 32 dividing in_features (4-bit container)"
                       : "group size must be a multiple of 16 dividing in_features (8-bit container)";
  if (a.col0 % 32 != 0 || a.n_pad % 32 != 0 || a.col0 + a.rows > a.n_pad) return "shard columns outside the layout";
  if ((reinterpret_cast<uintptr_t>(a.out) & 15) != 0 || (reinterpret_cast<uintptr_t>(a.col_scales) & 15) != 0)
    return "output and column scales must be 16-byte aligned";
  return nullptr;
}

cudaError_t launch_dequant(const DequantArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.k == 0) return cudaSuccess;
  if (a.act == ActType::kFloat16) return launch_act<__half>(a, stream);
  return launch_act<__nv_bfloat16>(a, stream);
}

}  // namespace sinq_cuda
