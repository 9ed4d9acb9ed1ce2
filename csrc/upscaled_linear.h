// Torch-free host API of the fused upscaled-linear CUDA kernels (the launchers behind scale_kernels._C).
//
// The torch binding (binding.cpp) turns at::Tensors into the plain structs of upscaled_linear_params.h;
// the kernels (*.cu) never see a torch header, so `nvcc -c` of them takes seconds and they can be
// compile-checked without a CUDA build of torch.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "upscaled_linear_params.h"

namespace scale_kernels {

// Floats of scratch the droute reduction needs: one partial sum per (expansion-input column tile, token).
size_t backward_input_workspace_floats(const Dims& dims);

// Each launcher enqueues its kernels on `stream` and returns the launch status (cudaSuccess or the error
// of the first failing launch). Nothing is launched for empty outputs.
cudaError_t upscaled_linear_forward(const ForwardParams& p, cudaStream_t stream);
cudaError_t upscaled_linear_backward_input(const BackwardInputParams& p, cudaStream_t stream);
cudaError_t upscaled_linear_backward_weight(const BackwardWeightParams& p, cudaStream_t stream);

}  // namespace scale_kernels
