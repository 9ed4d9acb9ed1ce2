// Forward launch: every output tile of [y | y_up] in one grouped launch (plan: forward_problem).
#include "tile_gemm.cuh"
#include "upscaled_linear.h"

namespace scale_kernels {
namespace {

template <typename T>
struct Forward {
  static cudaError_t run(const ForwardParams& p, cudaStream_t stream) {
    return tile::launch<T, plan::ForwardLayout>(plan::forward_problem<T>(p), stream);
  }
};

}  // namespace

cudaError_t upscaled_linear_forward(const ForwardParams& p, cudaStream_t stream) {
  return tile::dispatch_dtype<Forward>(p, stream);
}

}  // namespace scale_kernels
