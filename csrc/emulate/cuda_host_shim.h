// Host (CPU) stand-ins for exactly the CUDA features tile_gemm.cuh uses, so that its device code compiles
// with g++ and runs on the CPU (csrc/emulate/kernel_emulator.cpp: one std::thread per CUDA thread, blocks
// one after another). A test tool, never part of the extension.
//
// Semantics kept: __syncthreads is a real barrier of the block's 128 threads (races between the phases of
// a block can show up); __shfl_xor_sync exchanges through a buffer between two barriers of the warp;
// WMMA follows its documented API contract (row_major: element (r, c) at p[r * ldm + c]; col_major: at
// p[c * ldm + r]; mma_sync: D = A B + C with fp32 accumulation); lane 0 of each warp holds the whole
// fragment and does the warp's collective work (the other lanes only check pointer alignment). Not kept: real tensor-core rounding inside one 16x16x16 product, warp scheduling,
// memory-model details, 256-bit alignment faults (checked by assertions below instead).
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time, so a static array is the block's shared memory
#define __restrict__

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

template <typename T>
inline T __ldg(const T* p) {
  return *p;
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
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
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
struct BlockSync {
  std::barrier<> block{kBlockThreads};
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float shfl[kBlockThreads];
  BlockSync() {
    for (int w = 0; w < kBlockThreads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
};
inline BlockSync* sync = nullptr;  // set by the launcher for the block being run
}  // namespace scale_kernels_emu

inline void __syncthreads() { scale_kernels_emu::sync->block.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: the full warp*/, float v, int lane_mask) {
  auto& s = *scale_kernels_emu::sync;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32;
  s.shfl[t] = v;
  s.warps[warp]->arrive_and_wait();
  const float r = s.shfl[warp * 32 + ((t % 32) ^ lane_mask)];
  s.warps[warp]->arrive_and_wait();
  return r;
}

// ---- WMMA at the API level ----
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers m16n16k16 only");
  float v[16][16];
};

inline float element_to_float(__half x) { return __half2float(x); }
inline float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check_alignment(const void* p) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && "WMMA needs 256-bit aligned fragment pointers");
  (void)p;
}

inline bool is_lane0() { return threadIdx.x % 32 == 0; }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_alignment(p);
  if (!is_lane0()) return;
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = element_to_float(kRowMajor ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  if (!is_lane0()) return;
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!is_lane0()) return;
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.v[m][k], b.v[k][n], acc);
      out[m][n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_alignment(p);
  if (!is_lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}
}  // namespace wmma
}  // namespace nvcuda
