// Host launcher of the one-launch decode kernel (decode_kernel.cuh).
#include <cuda_runtime.h>

#include "decode_kernel.cuh"
#include "upscaled_linear.h"

namespace scale_kernels {
namespace {

struct CudaLaunch {
  template <typename T, int NT>
  static cudaError_t run(const DecodeParams& p, const decode::LaunchShape& s, cudaStream_t stream) {
    decode::decode_kernel<T, NT><<<dim3(s.grid_x, s.grid_y), decode::kThreads, 0, stream>>>(p, s);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t upscaled_linear_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.dims.M < 0 || p.dims.M > kDecodeMaxTokens) return cudaErrorInvalidValue;
  const decode::LaunchShape s = decode::launch_shape(p);
  if (p.dims.M == 0 || s.grid_x == 0) return cudaSuccess;
  return decode::dispatch<CudaLaunch>(p, s, stream);
}

}  // namespace scale_kernels
