// Torch-free argument checker of the scale_kernels_cuda ops.
//
// The binding describes every tensor argument as a TensorDesc (what torch knows about it: presence, layout,
// device, dtype, sizes, strides, data address) and runs the op's check here *before* it touches any data
// pointer; a failed check becomes a Python TypeError (dtype) or ValueError (anything else) naming the
// argument. Plain C++17 (no torch, no CUDA), so CI compiles and tests it on CPU (tests/test_csrc_compile.py).
#pragma once

#include <cstdint>
#include <string>

#include "upscaled_linear_params.h"

namespace scale_kernels {
namespace check {

enum class DeviceKind : int32_t { CPU = 0, CUDA = 1, Other = 2 };

// The element types the ops distinguish; anything else is Other (its name is still reported).
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Other = 3 };

constexpr int kMaxDims = 8;  // sizes/strides recorded per tensor (dim may be larger; only the first 8 are kept)

// What the checker needs to know about one tensor argument. Standard layout (the CPU tests fill it via ctypes).
struct TensorDesc {
  int32_t present = 0;  // 0: None, or an optional holding an undefined tensor (both mean "absent")
  int32_t dense = 0;    // strided, non-nested layout: sizes, strides and address are meaningful only then
  int32_t device_kind = static_cast<int32_t>(DeviceKind::Other);
  int32_t device_index = -1;
  int32_t dtype = static_cast<int32_t>(DType::Other);
  int32_t dim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  uint64_t address = 0;          // data pointer; 0 when the tensor has no storage
  const char* dtype_name = "?";  // for messages, e.g. "BFloat16" (a string with static lifetime)
};

enum class ErrorKind : int32_t { None = 0, Type = 1, Value = 2 };

struct CheckResult {
  ErrorKind kind = ErrorKind::None;
  std::string message;  // "<op>: <argument> must ..., got ..." when kind != None
  Dims dims;            // the block sizes, valid when kind == None
  bool ok() const { return kind == ErrorKind::None; }
};

struct ForwardArgs {
  const char* op = "forward";
  DeviceKind device = DeviceKind::CUDA;  // the device type the op implementation runs on
  TensorDesc x, w, w21, w22, w12, bias, bias_up, route;
};

struct BackwardInputArgs {
  const char* op = "backward_input";
  DeviceKind device = DeviceKind::CUDA;
  TensorDesc dy, x, w, w21, w22, w12, route;
  bool need_droute = false;
};

struct BackwardWeightArgs {
  const char* op = "backward_weight";
  DeviceKind device = DeviceKind::CUDA;
  TensorDesc dy, x, route;
  int64_t d_in = 0, d_out = 0;
};

// Each check stops at the first problem. On success, dims holds M and the four block widths.
CheckResult check_forward(const ForwardArgs& a);
CheckResult check_backward_input(const BackwardInputArgs& a);
CheckResult check_backward_weight(const BackwardWeightArgs& a);

// For a checked 1-D or 2-D tensor: can the decode kernel read it in place (unit column stride, rows that do
// not overlap)? If not, the binding hands it a contiguous copy.
bool decode_reads_in_place(const TensorDesc& t);

// The row stride the decode kernel uses for a 2-D tensor it reads in place (any value works for one row).
int64_t decode_row_stride(const TensorDesc& t);

}  // namespace check
}  // namespace scale_kernels
