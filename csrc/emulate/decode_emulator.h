// CPU emulation of the decode kernel (a test tool, not part of the extension): see decode_emulator.cpp.
#pragma once

#include "../upscaled_linear_params.h"

namespace scale_kernels {
namespace emulate {

// Runs decode_kernel.cuh's device code for `p` on CPU threads, exactly as upscaled_linear_decode would launch
// it on a GPU (same launch shape and kernel instantiation); returns the number of CTAs run (0 for an empty
// output or M = 0). p.dims.M must be at most kDecodeMaxTokens.
int run_decode(const DecodeParams& p);

}  // namespace emulate
}  // namespace scale_kernels
