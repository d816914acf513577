// Device helpers shared by the SINQ CUDA kernels: the activation type traits (fp16/bf16
// conversions, exact code operands, the m16n8k16 mma) and the layout's lane-order indexing
// (sinq_cuda.h, sinq_vllm/kernels/gpu_layout.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sinq_cuda {
namespace detail {

// Conversions and the tensor-core mma for one activation type (fp16 or bf16): the two
// differ only in the intrinsics' names, the magic constants and the PTX type.
template <typename T>
struct Act {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  using T2 = std::conditional_t<kHalf, __half2, __nv_bfloat162>;
  // the 4-bit magic: (0x6400 | q) = 1024 + q in fp16, (0x4300 | q) = 128 + q in bf16
  static constexpr uint32_t kMagic4 = kHalf ? 0x64006400u : 0x43004300u;
  static constexpr uint32_t kOnes = kHalf ? 0x3C003C00u : 0x3F803F80u;  // (1.0, 1.0)

  __device__ static __forceinline__ T2 as_pair(uint32_t v) { return *reinterpret_cast<const T2*>(&v); }
  __device__ static __forceinline__ uint32_t as_word(T2 v) { return *reinterpret_cast<const uint32_t*>(&v); }
  __device__ static __forceinline__ uint32_t sub_magic4(uint32_t v) {
    return as_word(__hsub2(as_pair(v), as_pair(kMagic4)));
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (kHalf) return as_word(__floats2half2_rn(lo, hi));
    else return as_word(__floats2bfloat162_rn(lo, hi));
  }
  __device__ static __forceinline__ float2 unpack(uint32_t v) {
    if constexpr (kHalf) return __half22float2(as_pair(v));
    else return __bfloat1622float2(as_pair(v));
  }
  __device__ static __forceinline__ T from_float(float v) {
    if constexpr (kHalf) return __float2half_rn(v);
    else return __float2bfloat16_rn(v);
  }
  __device__ static __forceinline__ float to_float(T v) {
    if constexpr (kHalf) return __half2float(v);
    else return __bfloat162float(v);
  }
  __device__ static __forceinline__ uint16_t bits(float v) {
    const T t = from_float(v);
    return *reinterpret_cast<const uint16_t*>(&t);
  }
  // codes (bytes B0, B1 of w) of an 8-bit word as an exact T2 pair
  template <int B0, int B1>
  __device__ static __forceinline__ uint32_t byte_pair(uint32_t w) {
    if constexpr (kHalf) {  // bytes [w.B0, 0x64, w.B1, 0x64] = half2(1024 + q0, 1024 + q1)
      return sub_magic4(__byte_perm(w, 0x64646464u, (B0) | (4 << 4) | (B1 << 8) | (4 << 12)));
    } else {  // bf16 has 8 significant bits, so via fp32: bytes [w.B, 0, 0, 0x4B] = 2^23 + q exactly
      const float q0 = __uint_as_float(__byte_perm(w, 0x4B000000u, (B0) | (4 << 4) | (4 << 8) | (7 << 12))) - 8388608.0f;
      const float q1 = __uint_as_float(__byte_perm(w, 0x4B000000u, (B1) | (4 << 4) | (4 << 8) | (7 << 12))) - 8388608.0f;
      return pack(q0, q1);  // q <= 255 is exact in bf16
    }
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#define SINQ_MMA_M16N8K16(TYPE)                                                                                 \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "    \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                                      \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
    if constexpr (kHalf) SINQ_MMA_M16N8K16("f16");
    else SINQ_MMA_M16N8K16("bf16");
#undef SINQ_MMA_M16N8K16
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

// Codebook values of codes (2p, 2p+1) of a 4-bit word, from a 16-entry table of T bits in
// shared memory (8 words in 8 banks: conflict-free).
template <int P>
__device__ __forceinline__ uint32_t lut_pair(uint32_t w, const uint16_t* lut) {
  const uint32_t v = w >> (4 * P);
  return static_cast<uint32_t>(lut[v & 0xF]) | (static_cast<uint32_t>(lut[(v >> 16) & 0xF]) << 16);
}

// Code of input column 8-aligned-chunk position i (i < 8) of a 4-bit word: nibble pos(i).
__device__ __forceinline__ uint32_t nibble_code(uint32_t w, int i) {
  return (w >> (4 * ((i >> 1) + 4 * (i & 1)))) & 0xF;
}

// 16-byte index of lane `lane`'s words of chunk c (4 word rows) and warp tile wt.
__device__ __forceinline__ int64_t lane_words(int64_t c, int wt, int n_pad, int lane) {
  return (c * (n_pad >> 5) + wt) * 32 + lane;
}

// 16-byte index of the (scale, zero) pairs of columns g, g+8, g+16, g+24 of warp tile wt.
__device__ __forceinline__ int64_t lane_scales(int64_t group, int wt, int n_pad, int g) {
  return group * (n_pad >> 2) + wt * 8 + g;
}

}  // namespace detail
}  // namespace sinq_cuda
