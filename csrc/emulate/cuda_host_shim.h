// Host (CPU) stand-ins for the CUDA features decode_kernel.cuh uses, so that its device code compiles with g++
// and runs on the CPU (csrc/emulate/decode_emulator.cpp: one std::thread per CUDA thread, blocks one after
// another). A test tool, never part of the extension. Provides what device_primitives.cuh provides on a GPU.
//
// Semantics kept: __syncthreads is a real barrier of the block's 128 threads (a missing barrier shows up as a
// race); warp-collective operations (shuffles, mma) exchange values through a buffer between two barriers of
// the warp, so every lane must take part, as on the GPU; mma.m16n8k16 reads its operands in exactly the lane /
// register layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), independent
// of how the kernel fills them, with exact products and fp32 sums; fp16 / bf16 round to nearest even; 128-bit
// loads assert 16-byte alignment. Not kept: the tensor cores' internal summation order, warp scheduling,
// memory-model details.
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time, so a static array is the block's shared memory

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- fp16 / bf16 storage types with round-to-nearest-even conversions ----
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ---- block / warp synchronisation ----
namespace scale_kernels_emu {
constexpr int kBlockThreads = 128;
constexpr int kWarpSize = 32;

// What the lanes of one warp put on the table for a collective operation.
struct WarpExchange {
  float value[kWarpSize];
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
};

struct BlockSync {
  std::barrier<> block{kBlockThreads};
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  WarpExchange exchange[kBlockThreads / kWarpSize];
  BlockSync() {
    for (int w = 0; w < kBlockThreads / kWarpSize; ++w) warps.push_back(std::make_unique<std::barrier<>>(kWarpSize));
  }
};
inline BlockSync* sync = nullptr;  // set by the launcher for the block being run

inline int lane() { return static_cast<int>(threadIdx.x) % kWarpSize; }
inline int warp() { return static_cast<int>(threadIdx.x) / kWarpSize; }
inline void warp_barrier() { sync->warps[warp()]->arrive_and_wait(); }
inline WarpExchange& exchange() { return sync->exchange[warp()]; }

inline float element_to_float(uint16_t bits, __nv_bfloat16) { return __bfloat162float(__nv_bfloat16{bits}); }
inline float element_to_float(uint16_t bits, __half) { return __half2float(__half{bits}); }

// Element i (0..7) of a lane's A fragment / (0..3) of its B fragment: register i / 2, low half for even i.
inline uint16_t fragment_element(const uint32_t* regs, int i) {
  return static_cast<uint16_t>(i % 2 == 0 ? regs[i / 2] & 0xffffu : regs[i / 2] >> 16);
}

// A (16 x 16) element (row, k): held by lane 4 * (row % 8) + (k % 8) / 2 as a_i, per the PTX layout
// row = groupID (+8 for a2, a3, a6, a7), col = 2 * threadID_in_group + (i & 1) (+8 for i >= 4).
inline uint16_t a_element(const WarpExchange& e, int row, int k) {
  const int i = (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0) + (k % 2);
  return fragment_element(e.a[4 * (row % 8) + (k % 8) / 2], i);
}

// B (16 x 8) element (k, n): held by lane 4 * n + (k % 8) / 2 as b_i, per the PTX layout
// row = 2 * threadID_in_group + (i & 1) (+8 for i >= 2), col = groupID.
inline uint16_t b_element(const WarpExchange& e, int k, int n) {
  const int i = (k >= 8 ? 2 : 0) + (k % 2);
  return fragment_element(e.b[4 * n + (k % 8) / 2], i);
}
}  // namespace scale_kernels_emu

inline void __syncthreads() { scale_kernels_emu::sync->block.arrive_and_wait(); }

namespace scale_kernels {
namespace prim {

inline uint4 load_16B(const void* p) {
  assert(reinterpret_cast<uintptr_t>(p) % 16 == 0 && "128-bit loads need 16-byte aligned addresses");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline uint4 load_streaming_16B(const void* p) { return load_16B(p); }
inline uint4 load_cached_16B(const void* p) { return load_16B(p); }

inline uint16_t load_scalar(const uint16_t* p) { return *p; }
inline float load_scalar(const float* p) { return *p; }

inline float shfl_xor(float v, int lane_mask) {
  using namespace scale_kernels_emu;
  exchange().value[lane()] = v;
  warp_barrier();
  const float r = exchange().value[lane() ^ lane_mask];
  warp_barrier();
  return r;
}

// D = A B + D, warp-collective, operands in the PTX fragment layout (see a_element / b_element); lane
// (g, c) = (lane / 4, lane % 4) owns D elements (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T tag) {
  using namespace scale_kernels_emu;
  WarpExchange& e = exchange();
  const int me = lane();
  std::memcpy(e.a[me], a, sizeof(a));
  std::memcpy(e.b[me], b, sizeof(b));
  warp_barrier();
  const int g = me / 4, c = me % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), n = 2 * c + (i % 2);
    float sum = d[i];
    for (int k = 0; k < 16; ++k) {
      const float av = element_to_float(a_element(e, row, k), tag);
      const float bv = element_to_float(b_element(e, k, n), tag);
      sum = std::fma(av, bv, sum);
    }
    d[i] = sum;
  }
  warp_barrier();
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace prim
}  // namespace scale_kernels
