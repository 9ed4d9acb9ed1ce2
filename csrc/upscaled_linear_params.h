// Plain parameter structs of the fused upscaled-linear CUDA kernel: no torch, no CUDA headers, so the argument
// checker (arg_check.h), the launch shape and the CPU emulation compile with any C++17 compiler.
//
// Shapes (token-major, "ld" = row stride in elements, column stride is always 1):
//   x  (M, d_in + e_in)    route (M,) float32 or null      y (M, d_out + e_out)
//   w  (d_out, d_in)  w21 (e_out, d_in)  w22 (e_out, e_in)  w12 (d_out, e_in) or null
// Math: y0 = x0 W^T + r*(x1 W12^T) + b            y1 = x0 W21^T + x1 W22^T + b_up
#pragma once

#include <cstdint>

namespace scale_kernels {

enum class ScalarType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline int element_size(ScalarType t) { return t == ScalarType::Float32 ? 4 : 2; }

// A row-major matrix view: element (i, j) is ptr[i * ld + j]. ptr may be null for an absent operand.
struct MatrixRef {
  const void* ptr = nullptr;
  int64_t ld = 0;
};

struct Dims {
  int64_t M = 0;  // tokens
  int64_t d_in = 0, e_in = 0, d_out = 0, e_out = 0;
};

// The one-launch decode kernel (decode_kernel.cuh): M <= kDecodeMaxTokens tokens, every output column.
constexpr int64_t kDecodeMaxTokens = 64;

struct DecodeParams {
  ScalarType dtype = ScalarType::Float32;
  Dims dims;
  MatrixRef x, w, w21, w22, w12;  // w12.ptr null = no W12 term
  const void* bias = nullptr;     // (d_out,) contiguous, or null
  const void* bias_up = nullptr;  // (e_out,) contiguous, or null
  const float* route = nullptr;   // (M,) contiguous, or null (= all ones); ignored without w12
  void* y = nullptr;              // (M, d_out + e_out)
  int64_t ldy = 0;
};

}  // namespace scale_kernels
