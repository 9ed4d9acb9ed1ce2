// CPU emulation of the tile plans in grouped_gemm_plan.h (a test tool, not part of the extension).
//
// It runs the exact Problem the CUDA launchers build (same groups, segments, strides, tile ranges,
// locate_tile, droute partial-buffer layout and fixed-order reduction) with a scalar loop per tile in
// double precision, so a CPU test can check the decomposition of every op against the fp64 reference.
// What it does NOT cover: the device-side loaders, the WMMA/SIMT cores, shared-memory layout and
// synchronisation -- those need a GPU (tests/test_ops_cuda.py, scripts/gpu_check_cuda.sh).
//
// Built by tests/test_csrc_compile.py with `g++ -std=c++17 -shared -fPIC`; loaded through ctypes.
// Matrices: inputs with explicit row strides (ld*), outputs contiguous, route float32 or null.
#include <cstdint>
#include <vector>

#include "../grouped_gemm_plan.h"

namespace scale_kernels {
namespace {

using T = double;

template <typename Layout>
T load_a(const plan::Segment<T>& s, const float* k_scale, int m, int k) {
  const T v = Layout::kAKContig ? s.a[m * s.lda + k] : s.a[k * s.lda + m];
  return k_scale != nullptr ? v * k_scale[k] : v;
}

template <typename Layout>
T load_b(const plan::Segment<T>& s, int k, int n) {
  return Layout::kBKContig ? s.b[n * s.ldb + k] : s.b[k * s.ldb + n];
}

template <typename Layout>
T dot_segment(const plan::Segment<T>& s, const float* k_scale, int m, int n) {
  T acc = 0;
  for (int k = 0; k < s.k; ++k) acc += load_a<Layout>(s, k_scale, m, k) * load_b<Layout>(s, k, n);
  return acc;
}

// One "thread block" per linear tile index, exactly as the kernel's grid.
template <typename Layout>
void run(const plan::Problem<T>& prob) {
  for (int block = 0; block < prob.num_tiles; ++block) {
    const plan::TileCoord tc = plan::locate_tile(prob, block);
    const plan::Group<T>& g = prob.groups[tc.group];
    for (int r = 0; r < plan::kTileM; ++r) {
      const int m = tc.m0 + r;
      if (m >= g.rows) continue;
      T partial = 0;
      for (int c = 0; c < plan::kTileN; ++c) {
        const int n = tc.n0 + c;
        if (n >= g.cols) continue;
        T acc = 0;
        for (int s = 0; s < g.num_segments; ++s) acc += dot_segment<Layout>(g.segments[s], g.k_scale, m, n);
        if (g.has_scaled) {
          const T sc = dot_segment<Layout>(g.scaled, g.k_scale, m, n);
          acc += (g.row_scale != nullptr ? g.row_scale[m] : 1.0) * sc;
          if (g.dot_partial != nullptr) partial += g.dot[m * g.lddot + n] * sc;
        }
        if (g.bias != nullptr) acc += g.bias[n];
        g.out[m * g.ldo + n] = acc;
      }
      if (g.dot_partial != nullptr) g.dot_partial[static_cast<int64_t>(tc.tile_n) * g.rows + m] = static_cast<float>(partial);
    }
  }
}

Dims dims_of(int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out) {
  Dims d;
  d.M = M;
  d.d_in = d_in;
  d.e_in = e_in;
  d.d_out = d_out;
  d.e_out = e_out;
  return d;
}

// The four weight blocks of forward / backward-input params.
template <typename Params>
void set_weights(Params& p, const double* w, int64_t ldw, const double* w21, int64_t ldw21, const double* w22,
                 int64_t ldw22, const double* w12, int64_t ldw12) {
  p.w = MatrixRef{w, ldw};
  p.w21 = MatrixRef{w21, ldw21};
  p.w22 = MatrixRef{w22, ldw22};
  p.w12 = MatrixRef{w12, ldw12};
}

// Builds and runs the op's plan exactly as its launcher does; returns the grid size.
template <typename Params>
int run_plan(const Params& p) {
  using Plan = plan::PlanFor<Params>;
  const plan::Problem<T> prob = Plan::template make<T>(p);
  run<typename Plan::Layout>(prob);
  return prob.num_tiles;
}

}  // namespace
}  // namespace scale_kernels

using scale_kernels::MatrixRef;
using scale_kernels::run_plan;
using scale_kernels::set_weights;

extern "C" {

// Returns the number of tiles of the launch (the grid size the GPU would use).
int emu_forward(int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out, const double* x, int64_t ldx,
                const double* w, int64_t ldw, const double* w21, int64_t ldw21, const double* w22, int64_t ldw22,
                const double* w12, int64_t ldw12, const double* bias, const double* bias_up, const float* route,
                double* y) {
  scale_kernels::ForwardParams p;
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.x = MatrixRef{x, ldx};
  set_weights(p, w, ldw, w21, ldw21, w22, ldw22, w12, ldw12);
  p.bias = bias;
  p.bias_up = bias_up;
  p.route = route;
  p.y = y;
  p.ldy = d_out + e_out;
  return run_plan(p);
}

int emu_backward_input(int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out, const double* dy,
                       int64_t lddy, const double* x, int64_t ldx, const double* w, int64_t ldw, const double* w21,
                       int64_t ldw21, const double* w22, int64_t ldw22, const double* w12, int64_t ldw12,
                       const float* route, double* dx, float* droute) {
  scale_kernels::BackwardInputParams p;
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.dy = MatrixRef{dy, lddy};
  p.x = MatrixRef{x, ldx};
  set_weights(p, w, ldw, w21, ldw21, w22, ldw22, w12, ldw12);
  p.route = route;
  p.dx = dx;
  p.lddx = d_in + e_in;
  // the binding allocates backward_input_workspace_floats() = droute_partial_tiles * M floats
  std::vector<float> workspace(static_cast<size_t>(scale_kernels::plan::droute_partial_tiles(p.dims) * M), -1e30f);
  p.droute = droute;
  p.workspace = workspace.data();
  const int tiles_launched = run_plan(p);
  if (droute != nullptr) {  // the reduction kernel: fixed order over the written partial rows
    const int tiles = scale_kernels::plan::droute_written_tiles(p);
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int t = 0; t < tiles; ++t) sum += workspace[t * M + m];
      droute[m] = sum;
    }
  }
  return tiles_launched;
}

int emu_backward_weight(int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out, const double* dy,
                        int64_t lddy, const double* x, int64_t ldx, const float* route, double* dw21, double* dw22,
                        double* dw12) {
  scale_kernels::BackwardWeightParams p;
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.dy = MatrixRef{dy, lddy};
  p.x = MatrixRef{x, ldx};
  p.route = route;
  p.dw21 = dw21;
  p.dw22 = dw22;
  p.dw12 = dw12;
  return run_plan(p);
}

}  // extern "C"
