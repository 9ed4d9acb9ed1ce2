// CPU emulation of the decode kernel: the real device code of decode_kernel.cuh, compiled by g++ against
// cuda_host_shim.h, run with one std::thread per CUDA thread (128 per CTA, CTAs one after another), on the
// launch shape and kernel instantiation the CUDA launcher (decode.cu) uses. A test tool, not part of the
// extension: tests/test_csrc_compile.py builds it into the CPU test library with emulate/cpu_ops.cpp.
//
// Covered: the launch shape, 128-bit and scalar loads (alignment asserted), edges and zero fill, the mma
// operand packing against the PTX fragment layout, the fp32 core and its quad reduce-scatter, route, bias,
// the cross-warp reduction and its barrier, rounding and the stores. Not covered (GPU only:
// tests/test_ops_cuda_extension.py and compute-sanitizer in scripts/gpu_check_cuda.sh): nvcc code generation, the
// tensor cores' own summation order, the memory model and timing.
#define SCALE_KERNELS_HOST_EMULATION 1

#include "decode_emulator.h"

#include <cassert>
#include <thread>
#include <vector>

#include "../decode_kernel.cuh"

namespace scale_kernels {
namespace emulate {
namespace {

static_assert(decode::kThreads == scale_kernels_emu::kBlockThreads, "the shim's barriers are sized for one CTA");

struct EmulatedLaunch {
  template <typename T, int NT>
  static int run(const DecodeParams& p, const decode::LaunchShape& s) {
    scale_kernels_emu::BlockSync sync;
    scale_kernels_emu::sync = &sync;
    for (int by = 0; by < s.grid_y; ++by) {
      for (int bx = 0; bx < s.grid_x; ++bx) {
        std::vector<std::thread> threads;
        for (int t = 0; t < decode::kThreads; ++t) {
          threads.emplace_back([&p, &s, bx, by, t] {
            threadIdx.x = static_cast<unsigned>(t);
            blockIdx.x = static_cast<unsigned>(bx);
            blockIdx.y = static_cast<unsigned>(by);
            decode::decode_kernel<T, NT>(p, s);
          });
        }
        for (std::thread& th : threads) th.join();
      }
    }
    scale_kernels_emu::sync = nullptr;
    return s.grid_x * s.grid_y;
  }
};

}  // namespace

int run_decode(const DecodeParams& p) {
  assert(p.dims.M >= 0 && p.dims.M <= kDecodeMaxTokens);
  const decode::LaunchShape s = decode::launch_shape(p);
  if (p.dims.M == 0 || s.grid_x == 0) return 0;
  return decode::dispatch<EmulatedLaunch>(p, s);
}

}  // namespace emulate
}  // namespace scale_kernels
