// Torch-free host API of the CUDA kernels behind scale_kernels._C.
//
// The torch binding (binding.cpp, ops.h) turns at::Tensors into the plain structs of upscaled_linear_params.h;
// the kernels (*.cu) never see a torch header, so `nvcc -c` of them takes seconds and CI compile-checks them
// without a CUDA build of torch.
#pragma once

#include <cuda_runtime_api.h>

#include "upscaled_linear_params.h"

namespace scale_kernels {

// Enqueues the one-launch decode forward (1 <= M <= kDecodeMaxTokens) on `stream`; returns the launch status.
// Nothing is launched for an empty output; M outside [0, kDecodeMaxTokens] is cudaErrorInvalidValue.
cudaError_t upscaled_linear_decode(const DecodeParams& p, cudaStream_t stream);

}  // namespace scale_kernels
