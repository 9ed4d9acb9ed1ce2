// Plain parameter structs of the fused upscaled-linear kernels: no torch, no CUDA headers, so the host-side
// tile plan (grouped_gemm_plan.h) and its CPU emulation can be compiled by any C++17 compiler.
//
// Shapes (token-major, "ld" = row stride in elements, column stride is always 1):
//   x  (M, d_in + e_in)    dy (M, d_out + e_out)    route (M,) float32 or null
//   w  (d_out, d_in)  w21 (e_out, d_in)  w22 (e_out, e_in)  w12 (d_out, e_in) or null
// Math: y0 = x0 W^T + r*(x1 W12^T) + b            y1 = x0 W21^T + x1 W22^T + b_up
//       g = dy0 W12   dx0 = dy0 W + dy1 W21        dx1 = r*g + dy1 W22     droute[m] = <x1[m], g[m]>
//       dW21 = dy1^T x0   dW22 = dy1^T x1   dW12 = (r*dy0)^T x1            (dW is never computed)
#pragma once

#include <cstdint>

namespace scale_kernels {

enum class ScalarType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// A row-major matrix view: element (i, j) is ptr[i * ld + j]. ptr may be null for an absent operand.
struct MatrixRef {
  const void* ptr = nullptr;
  int64_t ld = 0;
};

struct Dims {
  int64_t M = 0;  // tokens
  int64_t d_in = 0, e_in = 0, d_out = 0, e_out = 0;
};

struct ForwardParams {
  ScalarType dtype = ScalarType::Float32;
  Dims dims;
  MatrixRef x, w, w21, w22, w12;  // w12.ptr null = no W12 term
  const void* bias = nullptr;     // (d_out,) or null
  const void* bias_up = nullptr;  // (e_out,) or null
  const float* route = nullptr;   // (M,) or null (= all ones); ignored without w12
  void* y = nullptr;              // (M, d_out + e_out)
  int64_t ldy = 0;
};

struct BackwardInputParams {
  ScalarType dtype = ScalarType::Float32;
  Dims dims;
  MatrixRef dy;                   // (M, d_out + e_out)
  MatrixRef x;                    // (M, d_in + e_in); only read when droute is requested
  MatrixRef w, w21, w22, w12;     // w12.ptr null = no W12 term
  const float* route = nullptr;   // (M,) or null
  void* dx = nullptr;             // (M, d_in + e_in)
  int64_t lddx = 0;
  float* droute = nullptr;        // (M,) or null = not requested (then x may be null)
  float* workspace = nullptr;     // backward_input_workspace_floats() floats when droute is requested
};

struct BackwardWeightParams {
  ScalarType dtype = ScalarType::Float32;
  Dims dims;
  MatrixRef dy;                   // (M, d_out + e_out)
  MatrixRef x;                    // (M, d_in + e_in)
  const float* route = nullptr;   // (M,) or null; scales dy0 rows for dW12
  void* dw21 = nullptr;           // (e_out, d_in) contiguous, or null = not needed
  void* dw22 = nullptr;           // (e_out, e_in) contiguous, or null
  void* dw12 = nullptr;           // (d_out, e_in) contiguous, or null
};

}  // namespace scale_kernels
