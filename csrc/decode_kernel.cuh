// The one-launch decode kernel: [y ; y_up] of M <= 64 tokens, all four weight blocks, route and biases fused.
//
// Work split. Output features (rows of W / W12 for y, of W21 / W22 for y_up) are cut into blocks of 16; each
// 128-thread CTA owns one such block and reads its 16 weight rows exactly once. Its 4 warps split the reduction
// dimension (a contiguous share of each weight row each) and a fixed-order shared-memory sum joins them, so
// the result does not depend on timing (deterministic) and every weight element is loaded once per launch.
//
// Inner step (bf16 / fp16): a warp reads a 16-row x 32-column weight tile with one 128-bit load per lane and
// row pair (lane (g, c) = (lane / 4, lane % 4) takes columns 8c .. 8c+7 of rows g and g+8), the tokens' x the
// same way (token g of each group of 8), and runs two mma.m16n8k16 (fp32 accumulation) per group of 8 tokens.
// A dot product does not depend on the order of k, so the 8 consecutive columns a lane loads are assigned to
// the mma's k slots {2c, 2c+1, 2c+8, 2c+9} (first mma) and the same slots of the second: A and B use one
// mapping, so the products pair up, and no shuffle or shared-memory staging is needed. fp32 (exact, like
// torch's default matmul) runs a CUDA-core variant of the same step; its CTAs take 8 tokens each (grid.y).
//
// Loads are 128-bit when every matrix row is 16-byte aligned (pointer and row stride), else scalar; the last,
// partial 32-column chunk and rows / tokens past the edge are loaded element by element with zero fill.
#pragma once

#include <cstdint>

#include "upscaled_linear_params.h"

#ifdef SCALE_KERNELS_HOST_EMULATION
#include "emulate/cuda_host_shim.h"
#else
#include "device_primitives.cuh"
#endif

namespace scale_kernels {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;       // output features per CTA (the mma's M)
constexpr int kTokenTile = 8;   // tokens per mma (its N)
constexpr int kChunk = 32;      // columns per warp step: 4 lanes x 8 elements
constexpr int kRedStride = kRows + 4;  // padded row of the reduction buffer (no bank conflicts on the writes)

// How a launch is laid out (computed on the host, shared by the CUDA launcher and the CPU emulation).
struct LaunchShape {
  int blocks_y = 0;       // CTAs computing y (d_out features); the y_up CTAs follow in grid.x
  int grid_x = 0;         // CTAs over output features
  int grid_y = 0;         // CTAs over token groups: 1 for bf16/fp16, ceil(M / 8) for fp32
  int token_tiles = 0;    // groups of 8 tokens per CTA (the kernel's NT): 1, 2, 4 or 8
  bool vector_loads = false;
};

inline bool rows_16B_aligned(const void* ptr, int64_t ld, int64_t rows, int elem) {
  const bool base = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return base && (rows <= 1 || (ld * elem) % 16 == 0);
}

inline LaunchShape launch_shape(const DecodeParams& p) {
  const Dims& d = p.dims;
  const int elem = element_size(p.dtype);
  LaunchShape s;
  s.blocks_y = static_cast<int>((d.d_out + kRows - 1) / kRows);
  s.grid_x = s.blocks_y + static_cast<int>((d.e_out + kRows - 1) / kRows);
  const int tiles = static_cast<int>((d.M + kTokenTile - 1) / kTokenTile);
  if (p.dtype == ScalarType::Float32) {
    s.token_tiles = 1;
    s.grid_y = tiles;
  } else {
    s.token_tiles = tiles <= 1 ? 1 : tiles <= 2 ? 2 : tiles <= 4 ? 4 : 8;
    s.grid_y = 1;
  }
  // x's second segment starts at column d_in: its rows must be aligned as well
  const char* x = static_cast<const char*>(p.x.ptr);
  bool aligned = rows_16B_aligned(x, p.x.ld, d.M, elem) && rows_16B_aligned(x + d.d_in * elem, p.x.ld, d.M, elem);
  aligned = aligned && rows_16B_aligned(p.w.ptr, p.w.ld, d.d_out, elem);
  aligned = aligned && rows_16B_aligned(p.w21.ptr, p.w21.ld, d.e_out, elem);
  aligned = aligned && rows_16B_aligned(p.w22.ptr, p.w22.ld, d.e_out, elem);
  if (p.w12.ptr != nullptr) aligned = aligned && rows_16B_aligned(p.w12.ptr, p.w12.ld, d.d_out, elem);
  s.vector_loads = aligned;
  return s;
}

// ---- 8 consecutive elements of one row ---------------------------------------------------------------------

// bf16 / fp16: four 32-bit registers, element 2i in the low half of r[i] (the mma operand packing).
struct Frag16 {
  uint32_t r[4];
};
// fp32: eight values.
struct Frag32 {
  float v[8];
};

template <typename T>
struct ElementTraits {  // bf16 / fp16
  using Frag = Frag16;
  using Bits = uint16_t;
};
template <>
struct ElementTraits<float> {
  using Frag = Frag32;
  using Bits = float;
};

// Loads elements [col, col + 8) of a row (null row = past the edge: zeros); columns >= K read as zero.
template <bool kStreaming>
__device__ __forceinline__ void load_frag(Frag16& f, const uint16_t* row, int col, int K, bool vec) {
  if (row != nullptr && vec && col + 8 <= K) {
    const uint4 v = kStreaming ? prim::load_streaming_16B(row + col) : prim::load_cached_16B(row + col);
    f.r[0] = v.x;
    f.r[1] = v.y;
    f.r[2] = v.z;
    f.r[3] = v.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = col + 2 * i;
    const uint32_t lo = (row != nullptr && k < K) ? prim::load_scalar(row + k) : 0u;
    const uint32_t hi = (row != nullptr && k + 1 < K) ? prim::load_scalar(row + k + 1) : 0u;
    f.r[i] = lo | (hi << 16);
  }
}

template <bool kStreaming>
__device__ __forceinline__ void load_frag(Frag32& f, const float* row, int col, int K, bool vec) {
  if (row != nullptr && vec && col + 8 <= K) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const void* p = row + col + 4 * h;
      const uint4 v = kStreaming ? prim::load_streaming_16B(p) : prim::load_cached_16B(p);
      const uint32_t bits[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) f.v[4 * h + i] = __uint_as_float(bits[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) f.v[i] = (row != nullptr && col + i < K) ? prim::load_scalar(row + col + i) : 0.0f;
}

// ---- the two inner cores; both leave their result in the mma accumulator layout ----------------------------
// acc[j][i] of lane (g, c): feature g + 8 * (i / 2), token 8 j + 2 c + (i % 2) of the CTA's tokens.

template <typename T, int NT>
struct MmaCore {  // bf16 / fp16 tensor cores
  using Bits = uint16_t;
  struct Acc {
    float c[NT][4];
  };
  static constexpr int kUnroll = NT <= 2 ? 4 : 2;  // weight chunks in flight per lane, within the register budget

  // One 32-column chunk: the lane's weight fragments of rows g and g + 8, times the tokens' x.
  __device__ __forceinline__ static void step(Acc& acc, const Frag16& lo, const Frag16& hi, const Bits* x,
                                              int64_t ldx, int tokens, int g, int col, int K, bool vec) {
    const uint32_t a0[4] = {lo.r[0], hi.r[0], lo.r[1], hi.r[1]};
    const uint32_t a1[4] = {lo.r[2], hi.r[2], lo.r[3], hi.r[3]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int t = kTokenTile * j + g;
      Frag16 xf;
      load_frag<false>(xf, t < tokens ? x + t * ldx : nullptr, col, K, vec);
      const uint32_t b0[2] = {xf.r[0], xf.r[1]};
      const uint32_t b1[2] = {xf.r[2], xf.r[3]};
      prim::mma_m16n8k16(acc.c[j], a0, b0, T{});
      prim::mma_m16n8k16(acc.c[j], a1, b1, T{});
    }
  }

  __device__ __forceinline__ static void finish(const Acc& acc, float (&out)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) out[j][i] = acc.c[j][i];
  }
};

struct SimtCore {  // fp32 on CUDA cores: exact fp32 products and sums, 8 tokens per CTA
  using Bits = float;
  struct Acc {
    float p[2][kTokenTile];  // rows g, g + 8 x the 8 tokens, partial over this lane's columns
  };
  static constexpr int kUnroll = 2;

  __device__ __forceinline__ static void step(Acc& acc, const Frag32& lo, const Frag32& hi, const float* x,
                                              int64_t ldx, int tokens, int /*g*/, int col, int K, bool vec) {
#pragma unroll
    for (int t = 0; t < kTokenTile; ++t) {
      Frag32 xf;
      load_frag<false>(xf, t < tokens ? x + t * ldx : nullptr, col, K, vec);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc.p[0][t] = fmaf(lo.v[i], xf.v[i], acc.p[0][t]);
        acc.p[1][t] = fmaf(hi.v[i], xf.v[i], acc.p[1][t]);
      }
    }
  }

  // Joins the 4 lanes of each quad (they hold different columns) by a reduce-scatter: after the exchange over
  // lane bit 1 a lane keeps 4 of the 8 tokens, after bit 0 the 2 tokens its accumulator slots hold.
  __device__ __forceinline__ static void finish(const Acc& acc, float (&out)[1][4]) {
    const int c = static_cast<int>(threadIdx.x % 32) % 4;
    const bool upper2 = (c & 2) != 0, upper1 = (c & 1) != 0;
    float half[2][4], quarter[2][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const float keep = upper2 ? acc.p[r][t + 4] : acc.p[r][t];
        const float send = upper2 ? acc.p[r][t] : acc.p[r][t + 4];
        half[r][t] = keep + prim::shfl_xor(send, 2);
      }
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const float keep = upper1 ? half[r][t + 2] : half[r][t];
        const float send = upper1 ? half[r][t] : half[r][t + 2];
        quarter[r][t] = keep + prim::shfl_xor(send, 1);
      }
    }
    out[0][0] = quarter[0][0];
    out[0][1] = quarter[0][1];
    out[0][2] = quarter[1][0];
    out[0][3] = quarter[1][1];
  }
};

template <typename T, int NT>
struct CoreFor {
  using type = MmaCore<T, NT>;
};
template <int NT>
struct CoreFor<float, NT> {
  static_assert(NT == 1, "fp32 CTAs take one group of 8 tokens");
  using type = SimtCore;
};

// One weight block times one segment of x (columns [0, K) of `x`), this warp's share of the K chunks.
template <typename Core, int NT>
__device__ __forceinline__ void segment_product(float (&out)[NT][4], MatrixRef wm, int64_t rows, int row0,
                                                const typename Core::Bits* x, int64_t ldx, int tokens, int K,
                                                bool vec) {
  using Bits = typename Core::Bits;
  using Frag = typename ElementTraits<Bits>::Frag;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
  const Bits* w = static_cast<const Bits*>(wm.ptr);
  const Bits* row_lo = row0 + g < rows ? w + (row0 + g) * wm.ld : nullptr;
  const Bits* row_hi = row0 + g + 8 < rows ? w + (row0 + g + 8) * wm.ld : nullptr;
  const int chunks = (K + kChunk - 1) / kChunk;
  const int begin = chunks * warp / kWarps, end = chunks * (warp + 1) / kWarps;
  typename Core::Acc acc{};
  for (int chunk = begin; chunk < end; chunk += Core::kUnroll) {
    Frag lo[Core::kUnroll], hi[Core::kUnroll];
#pragma unroll
    for (int u = 0; u < Core::kUnroll; ++u) {  // issue every weight load of the step before using any
      const bool in = chunk + u < end;
      const int col = (chunk + u) * kChunk + 8 * c;
      load_frag<true>(lo[u], in ? row_lo : nullptr, col, K, vec);
      load_frag<true>(hi[u], in ? row_hi : nullptr, col, K, vec);
    }
#pragma unroll
    for (int u = 0; u < Core::kUnroll; ++u) {
      if (chunk + u < end) Core::step(acc, lo[u], hi[u], x, ldx, tokens, g, (chunk + u) * kChunk + 8 * c, K, vec);
    }
  }
  Core::finish(acc, out);
}

// grid: (shape.grid_x, shape.grid_y), kThreads threads; NT = shape.token_tiles (fp32: 1).
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT >= 8 ? 3 : 4)
    decode_kernel(const DecodeParams p, const LaunchShape shape) {
  using Core = typename CoreFor<T, NT>::type;
  using Bits = typename Core::Bits;
  constexpr int kTokens = NT * kTokenTile;
  __shared__ float partial[kWarps][kTokens][kRedStride];

  const Dims& d = p.dims;
  const int block = static_cast<int>(blockIdx.x);
  const bool original = block < shape.blocks_y;  // y (W, W12, bias) or y_up (W21, W22, bias_up)
  const int64_t rows = original ? d.d_out : d.e_out;
  const int row0 = (original ? block : block - shape.blocks_y) * kRows;
  const int token0 = static_cast<int>(blockIdx.y) * kTokens;
  const int tokens = static_cast<int>(d.M) - token0;  // > 0; those past kTokens belong to other CTAs
  const bool vec = shape.vector_loads;
  const Bits* x0 = static_cast<const Bits*>(p.x.ptr) + token0 * p.x.ld;
  const MatrixRef second = original ? p.w12 : p.w22;

  float acc[NT][4];
  segment_product<Core, NT>(acc, original ? p.w : p.w21, rows, row0, x0, p.x.ld, tokens,
                            static_cast<int>(d.d_in), vec);
  if (second.ptr != nullptr && d.e_in > 0) {
    float acc2[NT][4];
    segment_product<Core, NT>(acc2, second, rows, row0, x0 + d.d_in, p.x.ld, tokens, static_cast<int>(d.e_in),
                              vec);
    const int c = static_cast<int>(threadIdx.x % 32) % 4;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = kTokenTile * j + 2 * c + (i % 2);
        const float gate = (original && p.route != nullptr && t < tokens) ? p.route[token0 + t] : 1.0f;
        acc[j][i] += gate * acc2[j][i];  // r * (x1 W12^T): a NaN/inf term stays NaN/inf even where r = 0
      }
  }

  // fixed-order sum over the warps' column shares, then bias, rounding and store
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][kTokenTile * j + 2 * c + (i % 2)][g + 8 * (i / 2)] = acc[j][i];
  __syncthreads();
  const T* bias = static_cast<const T*>(original ? p.bias : p.bias_up);
  T* y = static_cast<T*>(p.y) + (original ? 0 : d.d_out);
  for (int idx = static_cast<int>(threadIdx.x); idx < kTokens * kRows; idx += kThreads) {
    const int r = idx % kRows, t = idx / kRows;  // consecutive threads: consecutive features of one token
    if (t >= tokens || row0 + r >= rows) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][t][r];
    if (bias != nullptr) sum += prim::to_float(bias[row0 + r]);
    y[(token0 + t) * p.ldy + row0 + r] = prim::from_float<T>(sum);
  }
}

// Calls Launcher::run<T, NT>(p, shape, extra...) with the kernel instantiation the launch shape needs.
template <typename Launcher, typename T, typename... Extra>
auto dispatch_token_tiles(const DecodeParams& p, const LaunchShape& s, Extra... extra) {
  switch (s.token_tiles) {
    case 1:
      return Launcher::template run<T, 1>(p, s, extra...);
    case 2:
      return Launcher::template run<T, 2>(p, s, extra...);
    case 4:
      return Launcher::template run<T, 4>(p, s, extra...);
    default:
      return Launcher::template run<T, 8>(p, s, extra...);
  }
}

template <typename Launcher, typename... Extra>
auto dispatch(const DecodeParams& p, const LaunchShape& s, Extra... extra) {
  switch (p.dtype) {
    case ScalarType::Float32:
      return Launcher::template run<float, 1>(p, s, extra...);
    case ScalarType::Float16:
      return dispatch_token_tiles<Launcher, __half>(p, s, extra...);
    default:
      return dispatch_token_tiles<Launcher, __nv_bfloat16>(p, s, extra...);
  }
}

}  // namespace decode
}  // namespace scale_kernels
