// CPU emulation of the CUDA kernels: the real device code of tile_gemm.cuh, compiled by g++ against
// cuda_host_shim.h, run with one std::thread per CUDA thread (128 per block, blocks one after another),
// on the very plans the launchers build (grouped_gemm_plan.h). A test tool, not part of the extension.
//
// Covered: the plans, the global->shared loaders (vector and scalar paths, alignment checks, bounds,
// zero fill, k_scale rounding), the shared-memory layouts and WMMA/SIMT cores at the API level, the
// barriers, the fp32 staging and epilogue (route scale, bias, rounding), the droute partials and their
// reduction. Not covered (needs a GPU: tests/test_ops_cuda.py, scripts/gpu_check_cuda.sh): the binding,
// nvcc code generation, real tensor-core numerics, warp-level timing and the memory model.
//
// Built by tests/test_csrc_compile.py (g++ -std=c++20 -shared -fPIC) and called through ctypes. Matrices
// are (pointer, row stride) with unit column stride; outputs are contiguous; route is float32 or null.
#define SCALE_KERNELS_HOST_EMULATION 1

#include <thread>
#include <vector>

#include "../tile_gemm.cuh"

namespace scale_kernels {
namespace {

// Runs the op's plan through the kernel, block after block; returns the grid size.
template <typename T>
struct EmulatedLaunch {
  template <typename Params>
  static int run(const Params& p) {
    using Plan = plan::PlanFor<Params>;
    const plan::Problem<T> problem = Plan::template make<T>(p);
    scale_kernels_emu::BlockSync sync;
    scale_kernels_emu::sync = &sync;
    for (int block = 0; block < problem.num_tiles; ++block) {
      std::vector<std::thread> threads;
      for (int t = 0; t < tile::kThreads; ++t) {
        threads.emplace_back([&problem, block, t] {
          threadIdx.x = static_cast<unsigned>(t);
          blockIdx.x = static_cast<unsigned>(block);
          tile::grouped_tile_gemm_kernel<T, typename Plan::Layout>(problem);
        });
      }
      for (std::thread& th : threads) th.join();
    }
    scale_kernels_emu::sync = nullptr;
    return problem.num_tiles;
  }
};

template <typename Params>
int emulate(const Params& p) {
  return tile::dispatch_dtype<EmulatedLaunch>(p);
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

template <typename Params>
void set_weights(Params& p, const void* w, int64_t ldw, const void* w21, int64_t ldw21, const void* w22,
                 int64_t ldw22, const void* w12, int64_t ldw12) {
  p.w = MatrixRef{w, ldw};
  p.w21 = MatrixRef{w21, ldw21};
  p.w22 = MatrixRef{w22, ldw22};
  p.w12 = MatrixRef{w12, ldw12};
}

}  // namespace
}  // namespace scale_kernels

using scale_kernels::MatrixRef;
using scale_kernels::ScalarType;

extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16 (ScalarType). Each returns the number of tiles (grid size).
int emu_forward(int dtype, int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out, const void* x,
                int64_t ldx, const void* w, int64_t ldw, const void* w21, int64_t ldw21, const void* w22,
                int64_t ldw22, const void* w12, int64_t ldw12, const void* bias, const void* bias_up,
                const float* route, void* y) {
  scale_kernels::ForwardParams p;
  p.dtype = static_cast<ScalarType>(dtype);
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.x = MatrixRef{x, ldx};
  scale_kernels::set_weights(p, w, ldw, w21, ldw21, w22, ldw22, w12, ldw12);
  p.bias = bias;
  p.bias_up = bias_up;
  p.route = route;
  p.y = y;
  p.ldy = d_out + e_out;
  return scale_kernels::emulate(p);
}

int emu_backward_input(int dtype, int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out,
                       const void* dy, int64_t lddy, const void* x, int64_t ldx, const void* w, int64_t ldw,
                       const void* w21, int64_t ldw21, const void* w22, int64_t ldw22, const void* w12,
                       int64_t ldw12, const float* route, void* dx, float* droute) {
  scale_kernels::BackwardInputParams p;
  p.dtype = static_cast<ScalarType>(dtype);
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.dy = MatrixRef{dy, lddy};
  p.x = MatrixRef{x, ldx};
  scale_kernels::set_weights(p, w, ldw, w21, ldw21, w22, ldw22, w12, ldw12);
  p.route = route;
  p.dx = dx;
  p.lddx = d_in + e_in;
  // what the binding allocates: backward_input_workspace_floats() = droute_partial_tiles * M floats
  std::vector<float> workspace(static_cast<size_t>(scale_kernels::plan::droute_partial_tiles(p.dims) * M), NAN);
  p.droute = droute;
  p.workspace = workspace.data();
  const int tiles = scale_kernels::emulate(p);
  if (droute != nullptr) {  // the reduction kernel, one thread per token
    const int written = scale_kernels::plan::droute_written_tiles(p);
    for (int m = 0; m < M; ++m) droute[m] = scale_kernels::tile::sum_partials(p.workspace, written, M, m);
  }
  return tiles;
}

int emu_backward_weight(int dtype, int64_t M, int64_t d_in, int64_t e_in, int64_t d_out, int64_t e_out,
                        const void* dy, int64_t lddy, const void* x, int64_t ldx, const float* route, void* dw21,
                        void* dw22, void* dw12) {
  scale_kernels::BackwardWeightParams p;
  p.dtype = static_cast<ScalarType>(dtype);
  p.dims = scale_kernels::dims_of(M, d_in, e_in, d_out, e_out);
  p.dy = MatrixRef{dy, lddy};
  p.x = MatrixRef{x, ldx};
  p.route = route;
  p.dw21 = dw21;
  p.dw22 = dw22;
  p.dw12 = dw12;
  return scale_kernels::emulate(p);
}

}  // extern "C"
