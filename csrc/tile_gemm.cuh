// Device side of the grouped tile GEMM shared by the forward, backward-input and backward-weight kernels
// (the plan each launch runs is built by grouped_gemm_plan.h; launch.cuh launches it). No torch headers.
// Also compiled by g++ for the CPU kernel emulation (SCALE_KERNELS_HOST_EMULATION, tests only).
//
// One thread block = one kTileM x kTileN output tile of one group, 128 threads (4 warps):
//   1. for each segment, for each kTileK slice: global -> shared (16-byte vector loads when the operand is
//      aligned, bounds-checked scalar loads at the edges, zero fill outside), then a tile MMA;
//   2. the fp32 accumulators go to shared memory; the epilogue applies the per-row route scale to the
//      second accumulator, adds the bias, rounds once to T and writes bounds-checked; the droute partial
//      row sums are reduced in a fixed order (deterministic, no atomics).
//
// Tensor cores for fp16/bf16: WMMA (nvcuda::wmma, m16n16k16, fp32 accumulate, sm_80+). Why WMMA and not
// hand-written mma.sync PTX or CUTLASS/CuTe: CUTLASS is not available offline here; mma.sync needs the
// per-lane fragment layouts and ldmatrix addressing written by hand, a class of bug that can only be
// caught on a GPU, and this code had to be written without one. WMMA's fragment semantics are defined by
// the API (load/store through shared memory with a documented layout), which the CPU emulation
// (csrc/emulate/) reproduces, so this very code is exercised on the CPU in every CI run. The cost is some peak throughput (no swizzled ldmatrix,
// no wgmma on sm_90); the kernels are structured so the MMA core can be swapped without touching the
// plan, the loaders or the epilogue.
// fp32 runs a SIMT core (exact fp32 FMA; matches torch's default allow_tf32=False matmuls).
//
// Conversions use explicit intrinsics only: torch builds CUDA sources with __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_HALF_OPERATORS__.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(SCALE_KERNELS_HOST_EMULATION)
#include "emulate/cuda_host_shim.h"  // CPU stand-ins: csrc/emulate/kernel_emulator.cpp runs this code on the CPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include "grouped_gemm_plan.h"
#include "upscaled_linear_params.h"

namespace scale_kernels {
namespace tile {

using plan::kTileK;
using plan::kTileM;
using plan::kTileN;

constexpr int kThreads = 128;          // 4 warps
constexpr int kLdC = kTileN + 4;       // fp32 staging row stride (multiple of 4 floats for WMMA stores)
static_assert(kThreads == 2 * kTileM, "the droute epilogue assigns two threads to each tile row");

// ---------------------------------------------------------------------------------------------------
// element conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------------
// Shared-memory layout of an operand tile. `Extent` is its non-K extent (kTileM for A, kTileN for B).
// The tile is stored with the dimension that is contiguous in global memory innermost, so global reads
// are coalesced and shared-memory writes are plain 16-byte vectors. Rows are padded by one 16-byte
// vector: row starts stay 16-byte aligned (vector stores), fragment starts stay 32-byte aligned (WMMA),
// and consecutive rows start in different banks.
template <typename T, bool KContig, int Extent>
struct TileLayout {
  static constexpr bool kKContig = KContig;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kOuter = KContig ? Extent : kTileK;
  static constexpr int kInner = KContig ? kTileK : Extent;
  static constexpr int kLd = kInner + kVec;
  static constexpr int kElems = kOuter * kLd;
  static_assert(kInner % kVec == 0, "tile rows must be whole 16-byte vectors");
  // shared-memory offset of element (e, k), e = row of A / column of B
  __device__ static __forceinline__ int offset(int e, int k) { return KContig ? e * kLd + k : k * kLd + e; }
};

// 16 bytes of T as one aligned aggregate: copies of it are single 128-bit accesses, and reading T elements
// through it is type-correct (no uint4 punning, so no strict-aliasing hazard in any compiler).
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// Loads the operand tile with non-K coordinates [e0, e0 + Extent) and K coordinates [k0, k0 + kTileK)
// from global memory (row-major with row stride ldg along the layout's outer dimension), zero-filling
// everything outside [0, e_lim) x [0, k_lim); when k_scale is set every element is scaled by
// k_scale[k] and rounded back to T (exactly what (r * dy0).to(T) does in the reference).
template <typename T, typename Layout>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ldg, int e0, int e_lim, int k0,
                                          int k_lim, const float* k_scale) {
  constexpr int kVec = Layout::kVec;
  constexpr int kChunksPerRow = Layout::kInner / kVec;
  constexpr int kChunks = Layout::kOuter * kChunksPerRow;
  constexpr bool kKC = Layout::kKContig;
  const int o0 = kKC ? e0 : k0, o_lim = kKC ? e_lim : k_lim;
  const int i0 = kKC ? k0 : e0, i_lim = kKC ? k_lim : e_lim;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(g) % 16 == 0) && (ldg % kVec == 0);
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int o = c / kChunksPerRow;
    const int i = (c % kChunksPerRow) * kVec;
    const int go = o0 + o;
    const int gi = i0 + i;
    Vec16<T> v;
    if (go < o_lim && vec_ok && gi + kVec <= i_lim) {
      v = *reinterpret_cast<const Vec16<T>*>(g + go * ldg + gi);  // one 128-bit load
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v.v[j] = (go < o_lim && gi + j < i_lim) ? g[go * ldg + gi + j] : from_float<T>(0.f);
      }
    }
    if (k_scale != nullptr) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int k = kKC ? gi + j : go;
        const float s = k < k_lim ? k_scale[k] : 0.f;
        v.v[j] = from_float<T>(to_float(v.v[j]) * s);
      }
    }
    *reinterpret_cast<Vec16<T>*>(smem + o * Layout::kLd + i) = v;  // one 128-bit store
  }
}

// ---------------------------------------------------------------------------------------------------
// Tile MMA cores: zero(), mma(sA, sB) over one kTileK slice, store(sC, kLdC) as row-major fp32.

// fp16 / bf16: 4 warps in a 2 x 2 grid, each owning a 32 x 32 sub-tile of 2 x 2 WMMA fragments.
template <typename T, typename ALayout, typename BLayout>
struct WmmaCore {
  using ALay = std::conditional_t<ALayout::kKContig, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using BLay = std::conditional_t<BLayout::kKContig, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALay>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLay>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC acc[2][2];

  __device__ __forceinline__ static int warp_m() { return (threadIdx.x / 32) / 2 * 32; }
  __device__ __forceinline__ static int warp_n() { return (threadIdx.x / 32) % 2 * 32; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void mma(const T* sA, const T* sB) {
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      FragA a[2];
      FragB b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        nvcuda::wmma::load_matrix_sync(a[i], sA + ALayout::offset(warp_m() + 16 * i, kk), ALayout::kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::load_matrix_sync(b[j], sB + BLayout::offset(warp_n() + 16 * j, kk), BLayout::kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* sC) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(sC + (warp_m() + 16 * i) * kLdC + warp_n() + 16 * j, acc[i][j], kLdC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// fp32: SIMT, the 128 threads as 16 x 8; thread (ty, tx) owns rows ty + 16 i and columns tx + 8 j.
template <typename ALayout, typename BLayout>
struct SimtCore {
  float acc[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void mma(const float* sA, const float* sB) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[ALayout::offset(ty + 16 * i, k)];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = sB[BLayout::offset(tx + 8 * j, k)];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* sC) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sC[(ty + 16 * i) * kLdC + tx + 8 * j] = acc[i][j];
  }
};
static_assert(kTileM == 64 && kTileN == 64 && kThreads == 128, "the MMA cores are written for 64x64 tiles");

template <typename T, typename ALayout, typename BLayout>
struct CoreFor {
  using type = WmmaCore<T, ALayout, BLayout>;
};
template <typename ALayout, typename BLayout>
struct CoreFor<float, ALayout, BLayout> {
  using type = SimtCore<ALayout, BLayout>;
};

// ---------------------------------------------------------------------------------------------------
// kernel pieces

// Accumulates sum_k A'(m, k) B(k, n) of one segment over this tile into `core`.
template <typename T, typename ALayout, typename BLayout, typename Core>
__device__ __forceinline__ void accumulate_segment(const plan::Segment<T>& s, const plan::Group<T>& g, int m0,
                                                   int n0, T* sA, T* sB, Core& core) {
  for (int k0 = 0; k0 < s.k; k0 += kTileK) {
    load_tile<T, ALayout>(sA, s.a, s.lda, m0, g.rows, k0, s.k, g.k_scale);
    load_tile<T, BLayout>(sB, s.b, s.ldb, n0, g.cols, k0, s.k, nullptr);
    __syncthreads();
    core.mma(sA, sB);
    __syncthreads();
  }
}

// dot_partial[tile_n * rows + m] = sum over this tile's columns of dot(m, n) * S(m, n); two threads per
// row, each summing 32 columns in order, combined by one shuffle: a fixed order, so bitwise reproducible.
template <typename T>
__device__ __forceinline__ void write_dot_partial(const plan::Group<T>& g, int tile_n, int m0, int n0,
                                                  const float* sS) {
  const int r = threadIdx.x / 2;
  const int half = threadIdx.x % 2;
  const int m = m0 + r;
  float sum = 0.f;
  if (m < g.rows) {
    for (int c = half * (kTileN / 2); c < (half + 1) * (kTileN / 2); ++c) {
      if (n0 + c < g.cols) sum += to_float(g.dot[m * g.lddot + n0 + c]) * sS[r * kLdC + c];
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  if (half == 0 && m < g.rows) g.dot_partial[static_cast<int64_t>(tile_n) * g.rows + m] = sum;
}

// out(m, n) = T(C(m, n) + row_scale[m] * S(m, n) + bias[n]), bounds-checked, coalesced along n.
template <typename T>
__device__ __forceinline__ void write_output(const plan::Group<T>& g, int m0, int n0, const float* sC,
                                             const float* sS) {
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    const int r = idx / kTileN, c = idx % kTileN;
    const int m = m0 + r, n = n0 + c;
    if (m >= g.rows || n >= g.cols) continue;
    float v = sC[r * kLdC + c];
    if (g.has_scaled) v += (g.row_scale != nullptr ? g.row_scale[m] : 1.f) * sS[r * kLdC + c];
    if (g.bias != nullptr) v += to_float(g.bias[n]);
    g.out[static_cast<int64_t>(m) * g.ldo + n] = from_float<T>(v);
  }
}

template <typename T, typename Layout>
__global__ void __launch_bounds__(kThreads) grouped_tile_gemm_kernel(const plan::Problem<T> problem) {
  using ALayout = TileLayout<T, Layout::kAKContig, kTileM>;
  using BLayout = TileLayout<T, Layout::kBKContig, kTileN>;
  using Core = typename CoreFor<T, ALayout, BLayout>::type;
  constexpr int kOperandBytes = (ALayout::kElems + BLayout::kElems) * static_cast<int>(sizeof(T));
  constexpr int kStagingBytes = 2 * kTileM * kLdC * static_cast<int>(sizeof(float));
  alignas(128) __shared__ unsigned char smem[kOperandBytes > kStagingBytes ? kOperandBytes : kStagingBytes];
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + ALayout::kElems;

  const plan::TileCoord tc = plan::locate_tile(problem, static_cast<int>(blockIdx.x));
  const plan::Group<T>& g = problem.groups[tc.group];
  const int m0 = tc.m0, n0 = tc.n0;

  Core acc, acc_scaled;
  acc.zero();
  for (int s = 0; s < g.num_segments; ++s)
    accumulate_segment<T, ALayout, BLayout>(g.segments[s], g, m0, n0, sA, sB, acc);
  if (g.has_scaled) {
    acc_scaled.zero();
    accumulate_segment<T, ALayout, BLayout>(g.scaled, g, m0, n0, sA, sB, acc_scaled);
  }

  // every K step ends with a barrier, so the operand tiles can now be overwritten by the fp32 staging
  float* sC = reinterpret_cast<float*>(smem);
  float* sS = sC + kTileM * kLdC;
  acc.store(sC);
  if (g.has_scaled) acc_scaled.store(sS);
  __syncthreads();
  if (g.dot_partial != nullptr) write_dot_partial(g, tc.tile_n, m0, n0, sS);
  write_output(g, m0, n0, sC, sS);
}

// droute[m] = sum_t partial[t * M + m], summed in tile order (deterministic).
__device__ __forceinline__ float sum_partials(const float* partial, int tiles, int M, int m) {
  float sum = 0.f;
  for (int t = 0; t < tiles; ++t) sum += partial[static_cast<int64_t>(t) * M + m];
  return sum;
}

// Op<T>::run(params, args...) with T the element type named by params.dtype (used by the CUDA launchers
// and by the CPU emulation).
template <template <typename> class Op, typename Params, typename... Args>
auto dispatch_dtype(const Params& params, Args&&... args) {
  switch (params.dtype) {
    case ScalarType::Float16:
      return Op<__half>::run(params, args...);
    case ScalarType::BFloat16:
      return Op<__nv_bfloat16>::run(params, args...);
    case ScalarType::Float32:
      break;
  }
  return Op<float>::run(params, args...);
}

}  // namespace tile
}  // namespace scale_kernels
