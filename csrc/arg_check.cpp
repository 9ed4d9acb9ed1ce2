// Torch-free argument checker of the scale_kernels_cuda ops (see arg_check.h).
#include "arg_check.h"

#include <climits>
#include <sstream>

namespace scale_kernels {
namespace check {
namespace {

const char* device_kind_name(int32_t kind) {
  switch (static_cast<DeviceKind>(kind)) {
    case DeviceKind::CPU:
      return "cpu";
    case DeviceKind::CUDA:
      return "cuda";
    default:
      return "non-CPU/CUDA";
  }
}

std::string device_name(const TensorDesc& t) {
  std::ostringstream s;
  s << device_kind_name(t.device_kind);
  if (static_cast<DeviceKind>(t.device_kind) == DeviceKind::CUDA) s << ":" << t.device_index;
  return s.str();
}

std::string shape_of(const TensorDesc& t) {
  std::ostringstream s;
  s << "[";
  const int shown = t.dim < kMaxDims ? t.dim : kMaxDims;
  for (int i = 0; i < shown; ++i) s << (i ? ", " : "") << t.sizes[i];
  if (t.dim > kMaxDims) s << ", ...";
  s << "]";
  return s.str();
}

bool is_float_dtype(const TensorDesc& t) { return static_cast<DType>(t.dtype) != DType::Other; }

// Records the first failed check of an op; once failed, every later check is skipped (returns false).
class Checker {
 public:
  Checker(const char* op, DeviceKind device) : op_(op), device_(device) {}

  bool failed() const { return result_.kind != ErrorKind::None; }

  // The outcome: the first error, or the block sizes once they are known to fit the kernels' int columns.
  CheckResult finish(const Dims& dims) {
    const int64_t widths[] = {dims.d_in, dims.e_in, dims.d_out, dims.e_out};
    for (int64_t v : widths) {
      if (v > INT_MAX) fail(ErrorKind::Value, "block widths must be below 2^31, got ", v);
    }
    result_.dims = dims;
    return result_;
  }

  template <typename... Parts>
  bool fail(ErrorKind kind, const Parts&... parts) {
    if (failed()) return false;
    std::ostringstream s;
    s << "scale_kernels_cuda." << op_ << ": ";
    (s << ... << parts);
    result_.kind = kind;
    result_.message = s.str();
    return false;
  }

  // A present, dense tensor with data on the op's device (on `like`'s device too, when given), of `dim`
  // dimensions. Reads nothing but the description.
  bool tensor(const char* name, const TensorDesc& t, int dim, const char* shape_meaning,
              const TensorDesc* like = nullptr) {
    if (failed()) return false;
    if (!t.present) return fail(ErrorKind::Value, name, " is required, got None (an undefined tensor)");
    if (!t.dense) return fail(ErrorKind::Value, name, " must be a dense (strided) tensor");
    if (static_cast<DeviceKind>(t.device_kind) != device_) {
      return fail(ErrorKind::Value, name, " must be a ", device_kind_name(static_cast<int32_t>(device_)),
                  " tensor, got device ", device_name(t));
    }
    if (like != nullptr && t.device_index != like->device_index) {
      return fail(ErrorKind::Value, name, " must be on ", device_name(*like), " like the other tensors, got ",
                  device_name(t));
    }
    if (t.dim != dim) return fail(ErrorKind::Value, name, " must be ", dim, "-D ", shape_meaning, ", got shape ",
                                  shape_of(t));
    for (int i = 0; i < dim; ++i) {
      if (t.sizes[i] < 0 || t.strides[i] < 0) {
        return fail(ErrorKind::Value, name, " has a negative size or stride (shape ", shape_of(t), ")");
      }
    }
    bool empty = false;
    for (int i = 0; i < dim; ++i) empty = empty || t.sizes[i] == 0;
    if (!empty && t.address == 0) return fail(ErrorKind::Value, name, " has no data (a tensor without storage)");
    return true;
  }

  // The 2-D activations (x, dy) whose dtype every other floating operand must have.
  bool activations(const char* name, const TensorDesc& t, const char* meaning) {
    if (!tensor(name, t, 2, meaning)) return false;
    if (is_float_dtype(t)) return true;
    return fail(ErrorKind::Type, name, " must be float32, float16 or bfloat16, got ", t.dtype_name);
  }

  bool same_dtype(const char* name, const TensorDesc& t, const char* like_name, const TensorDesc& like) {
    if (failed()) return false;
    if (t.dtype == like.dtype && is_float_dtype(t)) return true;
    return fail(ErrorKind::Type, name, " must have dtype ", like.dtype_name, " like ", like_name, ", got ",
                t.dtype_name);
  }

  bool shape(const char* name, const TensorDesc& t, int64_t rows, int64_t cols, const char* meaning) {
    if (failed()) return false;
    if (t.sizes[0] == rows && t.sizes[1] == cols) return true;
    return fail(ErrorKind::Value, name, " must have shape (", rows, ", ", cols, ") = ", meaning, ", got ",
                shape_of(t));
  }

  bool length(const char* name, const TensorDesc& t, int64_t n, const char* meaning) {
    if (failed()) return false;
    if (t.sizes[0] == n) return true;
    return fail(ErrorKind::Value, name, " must have shape (", n, ",) = ", meaning, ", got ", shape_of(t));
  }

  // An optional per-token float32 gate (M,).
  bool route(const TensorDesc& r, const TensorDesc& like, int64_t M) {
    if (failed() || !r.present) return !failed();
    if (!tensor("route", r, 1, "(M,)", &like)) return false;
    if (static_cast<DType>(r.dtype) != DType::Float32) {
      return fail(ErrorKind::Type, "route must have dtype Float (float32), got ", r.dtype_name);
    }
    return length("route", r, M, "(M,), one gate per token");
  }

  // An optional bias vector of the weights' dtype.
  bool bias(const char* name, const TensorDesc& b, const TensorDesc& like, int64_t n, const char* meaning) {
    if (failed() || !b.present) return !failed();
    return tensor(name, b, 1, meaning, &like) && same_dtype(name, b, "x", like) && length(name, b, n, meaning);
  }

  // A 2-D weight block of the activations' dtype; returns false (error recorded) unless it is one.
  bool weight(const char* name, const TensorDesc& t, const char* like_name, const TensorDesc& like,
              const char* meaning) {
    return tensor(name, t, 2, meaning, &like) && same_dtype(name, t, like_name, like);
  }

  // The weight blocks w (d_out, d_in), w21 (e_out, d_in), w22 (e_out, e_in) and the optional w12 (d_out, e_in),
  // of `like`'s dtype and device. d_out, d_in, e_out are read off w and w21; e_in is in_width - d_in (x's
  // width), or w22's width when in_width < 0.
  bool weight_blocks(const TensorDesc& w, const TensorDesc& w21, const TensorDesc& w22, const TensorDesc& w12,
                     const char* like_name, const TensorDesc& like, int64_t in_width, Dims& d) {
    if (!(weight("w", w, like_name, like, "(d_out, d_in)") && weight("w21", w21, like_name, like, "(e_out, d_in)") &&
          weight("w22", w22, like_name, like, "(e_out, e_in)"))) {
      return false;
    }
    d.d_out = w.sizes[0];
    d.d_in = w.sizes[1];
    d.e_out = w21.sizes[0];
    d.e_in = in_width >= 0 ? in_width - d.d_in : w22.sizes[1];
    if (d.e_in < 0) return fail(ErrorKind::Value, "w has d_in = ", d.d_in, " columns, more than x's width ", in_width);
    if (!(shape("w21", w21, d.e_out, d.d_in, "(e_out, d_in)") && shape("w22", w22, d.e_out, d.e_in, "(e_out, e_in)"))) {
      return false;
    }
    const char* w12_shape = "(d_out, e_in)";
    if (!w12.present) return true;
    return weight("w12", w12, like_name, like, w12_shape) && shape("w12", w12, d.d_out, d.e_in, w12_shape);
  }


 private:
  const char* op_;
  DeviceKind device_;
  CheckResult result_;
};

}  // namespace

CheckResult check_forward(const ForwardArgs& a) {
  Checker c(a.op, a.device);
  Dims d;
  if (c.activations("x", a.x, "(M, d_in + e_in)")) {
    d.M = a.x.sizes[0];
    c.weight_blocks(a.w, a.w21, a.w22, a.w12, "x", a.x, a.x.sizes[1], d);
  }
  c.bias("bias", a.bias, a.x, d.d_out, "(d_out,)");
  c.bias("bias_up", a.bias_up, a.x, d.e_out, "(e_out,)");
  c.route(a.route, a.x, d.M);
  return c.finish(d);
}

CheckResult check_backward_input(const BackwardInputArgs& a) {
  Checker c(a.op, a.device);
  Dims d;
  if (c.activations("dy", a.dy, "(M, d_out + e_out)") &&
      c.weight_blocks(a.w, a.w21, a.w22, a.w12, "dy", a.dy, -1, d)) {
    d.M = a.dy.sizes[0];
    c.shape("dy", a.dy, d.M, d.d_out + d.e_out, "(M, d_out + e_out)");
  }
  c.route(a.route, a.dy, d.M);
  if (a.x.present && c.weight("x", a.x, "dy", a.dy, "(M, d_in + e_in)")) {
    c.shape("x", a.x, d.M, d.d_in + d.e_in, "(M, d_in + e_in)");
  }
  if (a.need_droute && !a.w12.present) c.fail(ErrorKind::Value, "need_droute=True requires w12 (got None)");
  if (a.need_droute && !a.x.present) c.fail(ErrorKind::Value, "need_droute=True requires x (got None)");
  return c.finish(d);
}

CheckResult check_backward_weight(const BackwardWeightArgs& a) {
  Checker c(a.op, a.device);
  Dims d;
  if (c.activations("dy", a.dy, "(M, d_out + e_out)") && c.weight("x", a.x, "dy", a.dy, "(M, d_in + e_in)")) {
    d.M = a.dy.sizes[0];
    d.d_in = a.d_in;
    d.d_out = a.d_out;
    d.e_in = a.x.sizes[1] - a.d_in;
    d.e_out = a.dy.sizes[1] - a.d_out;
    if (a.x.sizes[0] != d.M) {
      c.fail(ErrorKind::Value, "x must have M = ", d.M, " rows like dy, got shape ", shape_of(a.x));
    }
    if (a.d_in < 0 || d.e_in < 0) {
      c.fail(ErrorKind::Value, "d_in must be in [0, ", a.x.sizes[1], "] (x's width), got ", a.d_in);
    }
    if (a.d_out < 0 || d.e_out < 0) {
      c.fail(ErrorKind::Value, "d_out must be in [0, ", a.dy.sizes[1], "] (dy's width), got ", a.d_out);
    }
  }
  c.route(a.route, a.dy, d.M);
  return c.finish(d);
}

bool decode_reads_in_place(const TensorDesc& t) {
  if (t.dim == 1) return t.sizes[0] <= 1 || t.strides[0] == 1;
  const int64_t rows = t.sizes[0], cols = t.sizes[1];
  const bool unit_columns = cols <= 1 || t.strides[1] == 1;
  const bool separate_rows = rows <= 1 || t.strides[0] >= cols;
  return unit_columns && separate_rows;
}

int64_t decode_row_stride(const TensorDesc& t) { return t.sizes[0] <= 1 ? t.sizes[1] : t.strides[0]; }

}  // namespace check
}  // namespace scale_kernels
