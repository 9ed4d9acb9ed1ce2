// The tile plan: how each of the three ops becomes ONE launch of a grouped tile GEMM.
//
// Header-only, with no torch or CUDA dependency: the launchers (*.cu) build their launch arguments with it,
// and csrc/emulate/kernel_emulator.cpp runs the very same plans through the device code on the CPU.
//
// A launch computes every output tile of up to kMaxGroups output matrices ("groups"). For one group:
//
//   C(m, n) = sum_{plain segments s} sum_k A_s'(m, k) B_s(k, n)                       (fp32 accumulator)
//           + row_scale[m] * S(m, n),   S(m, n) = sum_k A'(m, k) B(k, n) of the scaled segment
//                                                                                    (second accumulator)
//   out(m, n) = T(C(m, n) + bias[n])
//   dot_partial[tile_n * rows + m] = sum_{n in column tile tile_n} dot(m, n) * S(m, n)
//
// with A'(m, k) = T(A(m, k) * k_scale[k]) when k_scale is set, else A(m, k). How A and B are read from
// memory is fixed per launch by a Layout (see below): all segments of a launch share it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "upscaled_linear_params.h"

#if defined(__CUDACC__)
#define SCALE_KERNELS_HOST_DEVICE __host__ __device__
#else
#define SCALE_KERNELS_HOST_DEVICE
#endif

namespace scale_kernels {
namespace plan {

constexpr int kTileM = 64;  // output rows per tile
constexpr int kTileN = 64;  // output columns per tile
constexpr int kTileK = 32;  // reduction depth per shared-memory stage
constexpr int kMaxGroups = 3;
constexpr int kMaxSegments = 2;

constexpr int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Operand layouts of one launch.
//   A(m, k) = kAKContig ? a[m * lda + k] : a[k * lda + m]
//   B(k, n) = kBKContig ? b[n * ldb + k] : b[k * ldb + n]
struct ForwardLayout {         // A = x (tokens x in), B = W^T: both read along k
  static constexpr bool kAKContig = true;
  static constexpr bool kBKContig = true;
};
struct BackwardInputLayout {   // A = dy (tokens x out), B = W (out x in): B read along n
  static constexpr bool kAKContig = true;
  static constexpr bool kBKContig = false;
};
struct BackwardWeightLayout {  // A = dy^T (out x tokens), B = x (tokens x in): K = tokens
  static constexpr bool kAKContig = false;
  static constexpr bool kBKContig = false;
};

template <typename T>
struct Segment {
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  int k = 0;  // reduction length (0: contributes nothing)
};

template <typename T>
struct Group {
  int rows = 0, cols = 0;             // output matrix shape
  int num_segments = 0;               // plain segments, summed into the main accumulator
  Segment<T> segments[kMaxSegments];
  bool has_scaled = false;            // a segment summed into the second accumulator ...
  Segment<T> scaled;
  const float* row_scale = nullptr;   // ... and scaled per output row by this (rows,) vector (null = 1)
  const float* k_scale = nullptr;     // (k,) scale of A along k for every segment, or null
  const T* bias = nullptr;            // (cols,) or null
  T* out = nullptr;                   // (rows, cols) with row stride ldo
  int64_t ldo = 0;
  const T* dot = nullptr;             // (rows, cols) with row stride lddot: dotted with S (needs has_scaled)
  int64_t lddot = 0;
  float* dot_partial = nullptr;       // (col_tiles, rows) partial row sums of dot * S, or null
  int col_tiles = 0;                  // set by add_group
  int tile_begin = 0;                 // first linear tile index of this group, set by add_group
};

template <typename T>
struct Problem {
  Group<T> groups[kMaxGroups];
  int num_groups = 0;
  int num_tiles = 0;  // grid size of the launch
};

// Which group and which output tile linear tile index `block` (the kernel's blockIdx.x) computes.
struct TileCoord {
  int group;
  int tile_n;  // column-tile index within the group (row of the droute partial buffer)
  int m0, n0;  // first output row / column of the tile
};

template <typename T>
SCALE_KERNELS_HOST_DEVICE inline TileCoord locate_tile(const Problem<T>& p, int block) {
  int gi = 0;
  for (int i = 1; i < kMaxGroups; ++i) {
    if (i < p.num_groups && block >= p.groups[i].tile_begin) gi = i;
  }
  const Group<T>& g = p.groups[gi];
  const int t = block - g.tile_begin;
  const int tile_n = t % g.col_tiles;
  return TileCoord{gi, tile_n, (t / g.col_tiles) * kTileM, tile_n * kTileN};
}

// An output group: (rows, cols) written to `out` with row stride ldo, plus an optional (cols,) bias.
template <typename T>
Group<T> output_group(int64_t rows, int64_t cols, T* out, int64_t ldo, const void* bias = nullptr) {
  Group<T> g;
  g.rows = static_cast<int>(rows);
  g.cols = static_cast<int>(cols);
  g.out = out;
  g.ldo = ldo;
  g.bias = static_cast<const T*>(bias);
  return g;
}

template <typename T>
Segment<T> segment(const T* a, int64_t lda, MatrixRef b, int64_t k) {
  Segment<T> s;
  s.a = a;
  s.lda = lda;
  s.b = static_cast<const T*>(b.ptr);
  s.ldb = b.ld;
  s.k = static_cast<int>(k);
  return s;
}

// Appends a plain segment (summed into the main accumulator).
template <typename T>
void add_segment(Group<T>& g, const T* a, int64_t lda, MatrixRef b, int64_t k) {
  g.segments[g.num_segments++] = segment(a, lda, b, k);
}

// Sets the segment summed into the second accumulator, scaled per output row by row_scale (null = 1).
template <typename T>
void set_scaled(Group<T>& g, const T* a, int64_t lda, MatrixRef b, int64_t k, const float* row_scale) {
  g.has_scaled = true;
  g.scaled = segment(a, lda, b, k);
  g.row_scale = row_scale;
}

// Appends a group and gives it its range of linear tile indices; empty outputs get no tiles at all.
template <typename T>
void add_group(Problem<T>& p, Group<T> g) {
  if (g.rows <= 0 || g.cols <= 0) return;
  g.col_tiles = ceil_div(g.cols, kTileN);
  g.tile_begin = p.num_tiles;
  p.num_tiles += ceil_div(g.rows, kTileM) * g.col_tiles;
  p.groups[p.num_groups++] = g;
}

// Forward (ForwardLayout): [y | y_up] = [x0 W^T + r * (x1 W12^T) + b | x0 W21^T + x1 W22^T + b_up].
template <typename T>
Problem<T> forward_problem(const ForwardParams& p) {
  const Dims& d = p.dims;
  const T* x0 = static_cast<const T*>(p.x.ptr);
  const T* x1 = x0 + d.d_in;
  T* y = static_cast<T*>(p.y);
  Problem<T> prob;

  // original output columns: loop K over W, then W12 into the scaled accumulator
  Group<T> orig = output_group<T>(d.M, d.d_out, y, p.ldy, p.bias);
  add_segment(orig, x0, p.x.ld, p.w, d.d_in);
  if (p.w12.ptr != nullptr) set_scaled(orig, x1, p.x.ld, p.w12, d.e_in, p.route);
  add_group(prob, orig);

  // expansion output columns: loop K over W21, then W22
  Group<T> up = output_group<T>(d.M, d.e_out, y + d.d_out, p.ldy, p.bias_up);
  add_segment(up, x0, p.x.ld, p.w21, d.d_in);
  add_segment(up, x1, p.x.ld, p.w22, d.e_in);
  add_group(prob, up);
  return prob;
}

// Number of column tiles of the dx1 group = rows of the droute partial-sum buffer.
inline int droute_partial_tiles(const Dims& d) { return ceil_div(d.e_in, kTileN); }

// Whether droute has any term: not without w12, and not when the W12 term is empty (d_out == 0), where
// droute is exactly 0 whatever x_up holds (NaN included), as in the reference.
inline bool droute_has_terms(const BackwardInputParams& p) { return p.w12.ptr != nullptr && p.dims.d_out > 0; }

// Rows of the partial-sum buffer that the backward-input launch actually writes:
// droute[m] = sum over the first droute_written_tiles(p) rows of partial[., m] (0 rows: droute = 0).
inline int droute_written_tiles(const BackwardInputParams& p) {
  return droute_has_terms(p) ? droute_partial_tiles(p.dims) : 0;
}

// Backward input (BackwardInputLayout): dx0 = dy0 W + dy1 W21; dx1 = dy1 W22 + r * (dy0 W12) with
// droute partials <x1, dy0 W12> per column tile of dx1 (reduced afterwards in a fixed order).
template <typename T>
Problem<T> backward_input_problem(const BackwardInputParams& p) {
  const Dims& d = p.dims;
  const T* dy0 = static_cast<const T*>(p.dy.ptr);
  const T* dy1 = dy0 + d.d_out;
  T* dx = static_cast<T*>(p.dx);
  Problem<T> prob;

  // original input columns: dy0 . W then dy1 . W21
  Group<T> orig = output_group<T>(d.M, d.d_in, dx, p.lddx);
  add_segment(orig, dy0, p.dy.ld, p.w, d.d_out);
  add_segment(orig, dy1, p.dy.ld, p.w21, d.e_out);
  add_group(prob, orig);

  // expansion input columns: dy1 . W22 plus r * (dy0 . W12)
  Group<T> up = output_group<T>(d.M, d.e_in, dx + d.d_in, p.lddx);
  add_segment(up, dy1, p.dy.ld, p.w22, d.e_out);
  if (p.w12.ptr != nullptr) {
    set_scaled(up, dy0, p.dy.ld, p.w12, d.d_out, p.route);
    if (p.droute != nullptr && droute_has_terms(p)) {
      up.dot = static_cast<const T*>(p.x.ptr) + d.d_in;
      up.lddot = p.x.ld;
      up.dot_partial = p.workspace;
    }
  }
  add_group(prob, up);
  return prob;
}

// Backward weight (BackwardWeightLayout, K = tokens): only the requested gradients get tiles.
//   dW21 = dy1^T x0 (e_out x d_in), dW22 = dy1^T x1 (e_out x e_in), dW12 = (r * dy0)^T x1 (d_out x e_in)
template <typename T>
Problem<T> backward_weight_problem(const BackwardWeightParams& p) {
  const Dims& d = p.dims;
  const T* dy0 = static_cast<const T*>(p.dy.ptr);
  const T* dy1 = dy0 + d.d_out;
  const T* x0 = static_cast<const T*>(p.x.ptr);
  const MatrixRef x0_ref{x0, p.x.ld}, x1_ref{x0 + d.d_in, p.x.ld};
  struct Wanted {
    void* out;
    int64_t rows, cols;
    const T* a;
    MatrixRef b;
    const float* k_scale;
  };
  const Wanted wanted[3] = {
      {p.dw21, d.e_out, d.d_in, dy1, x0_ref, nullptr},
      {p.dw22, d.e_out, d.e_in, dy1, x1_ref, nullptr},
      {p.dw12, d.d_out, d.e_in, dy0, x1_ref, p.route},
  };
  Problem<T> prob;
  for (const Wanted& w : wanted) {
    if (w.out == nullptr) continue;
    Group<T> g = output_group<T>(w.rows, w.cols, static_cast<T*>(w.out), w.cols);
    add_segment(g, w.a, p.dy.ld, w.b, d.M);
    g.k_scale = w.k_scale;
    add_group(prob, g);
  }
  return prob;
}

// Which plan and operand layout each op's parameters run: the one association the launchers (*.cu)
// and the CPU emulator both use.
template <typename Params>
struct PlanFor;
template <>
struct PlanFor<ForwardParams> {
  using Layout = ForwardLayout;
  template <typename T>
  static Problem<T> make(const ForwardParams& p) { return forward_problem<T>(p); }
};
template <>
struct PlanFor<BackwardInputParams> {
  using Layout = BackwardInputLayout;
  template <typename T>
  static Problem<T> make(const BackwardInputParams& p) { return backward_input_problem<T>(p); }
};
template <>
struct PlanFor<BackwardWeightParams> {
  using Layout = BackwardWeightLayout;
  template <typename T>
  static Problem<T> make(const BackwardWeightParams& p) { return backward_weight_problem<T>(p); }
};

}  // namespace plan
}  // namespace scale_kernels
