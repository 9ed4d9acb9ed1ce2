// The scale_kernels_cuda ops, device-independent part (torch headers, no CUDA headers).
//
// Every op first describes its tensor arguments (describe(): no data pointer is read) and runs the torch-free
// checker of arg_check.h, which raises a TypeError (dtype) or ValueError naming the argument. Then:
//   forward, M <= kDecodeMaxTokens: one launch of the decode kernel (Device::run_decode);
//   forward, larger M, and both backward ops: ATen GEMMs (cuBLAS on a GPU) written straight into column slices
//   of the output with beta = 1 accumulation and the bias in the GEMM (addmm): no concatenation, no Python.
// The math mirrors scale_kernels/reference.py and the torch backend (scale_kernels/ops/torch_upscaled_linear.py).
//
// binding.cpp instantiates the ops for CUDA tensors (scale_kernels._C); emulate/cpu_ops.cpp instantiates the
// very same code for CPU tensors with the decode kernel run by the CPU emulation (the CI tests).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "arg_check.h"
#include "upscaled_linear_params.h"

namespace scale_kernels {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The op schemas (one definition for the CUDA extension and the CPU test library).
inline void define_ops(torch::Library& m) {
  m.def(
      "forward(Tensor x, Tensor w, Tensor w21, Tensor w22, Tensor? w12, Tensor? bias, Tensor? bias_up, "
      "Tensor? route) -> Tensor");
  m.def(
      "backward_input(Tensor dy, Tensor? x, Tensor w, Tensor w21, Tensor w22, Tensor? w12, Tensor? route, "
      "bool need_droute) -> (Tensor, Tensor)");
  m.def(
      "backward_weight(Tensor dy, Tensor x, Tensor? route, int d_in, int d_out, bool need_w21, bool need_w22, "
      "bool need_w12) -> Tensor[]");
}

inline check::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return check::DType::Float32;
    case at::kHalf:
      return check::DType::Float16;
    case at::kBFloat16:
      return check::DType::BFloat16;
    default:
      return check::DType::Other;
  }
}

// What the checker needs to know about a tensor; reads metadata only (never the data).
inline check::TensorDesc describe(const Tensor& t) {
  check::TensorDesc d;
  if (!t.defined()) return d;
  d.present = 1;
  d.dtype = static_cast<int32_t>(dtype_code(t.scalar_type()));
  d.dtype_name = c10::toString(t.scalar_type());
  const c10::Device device = t.device();
  d.device_kind = static_cast<int32_t>(device.is_cuda()  ? check::DeviceKind::CUDA
                                       : device.is_cpu() ? check::DeviceKind::CPU
                                                         : check::DeviceKind::Other);
  d.device_index = device.has_index() ? device.index() : -1;
  d.dim = static_cast<int32_t>(t.dim());
  d.dense = t.layout() == at::kStrided && !t.is_nested();
  if (!d.dense) return d;
  const int kept = d.dim < check::kMaxDims ? d.dim : check::kMaxDims;
  for (int i = 0; i < kept; ++i) {
    d.sizes[i] = t.size(i);
    d.strides[i] = t.stride(i);
  }
  const bool addressable = t.has_storage() && (device.is_cuda() || device.is_cpu());  // not meta / fake tensors
  d.address = addressable ? reinterpret_cast<uint64_t>(t.const_data_ptr()) : 0;
  return d;
}

// An optional holding an undefined tensor is absent, like None.
inline check::TensorDesc describe(const OptTensor& t) { return t ? describe(*t) : check::TensorDesc{}; }

// The checked block sizes; a failed check raises a TypeError (dtype) or ValueError naming the argument.
inline Dims checked(const check::CheckResult& r) {
  if (r.kind == check::ErrorKind::Type) TORCH_CHECK_TYPE(false, r.message);
  TORCH_CHECK_VALUE(r.ok(), r.message);
  return r.dims;
}

// The tensor itself if present and defined, else nullopt.
inline OptTensor defined(const OptTensor& t) { return t && t->defined() ? t : std::nullopt; }

// A view the decode kernel can read in place (unit column stride, separate rows), else a contiguous copy.
inline Tensor decode_readable(const Tensor& t) {
  return check::decode_reads_in_place(describe(t)) ? t : t.contiguous();
}

inline MatrixRef matrix_ref(const Tensor& t) {
  return MatrixRef{t.const_data_ptr(), check::decode_row_stride(describe(t))};
}

// The decode kernel's dtype enum has the checker's values, so one is a cast of the other.
static_assert(static_cast<int32_t>(ScalarType::Float32) == static_cast<int32_t>(check::DType::Float32) &&
                  static_cast<int32_t>(ScalarType::Float16) == static_cast<int32_t>(check::DType::Float16) &&
                  static_cast<int32_t>(ScalarType::BFloat16) == static_cast<int32_t>(check::DType::BFloat16),
              "ScalarType (upscaled_linear_params.h) and check::DType (arg_check.h) must agree");

// Never DType::Other: the checker admits nothing else.
inline ScalarType kernel_dtype(const Tensor& t) { return static_cast<ScalarType>(dtype_code(t.scalar_type())); }

// y (M, d_out + e_out) = [x0 W^T + r * (x1 W12^T) + b ; x0 W21^T + x1 W22^T + b_up] with ATen GEMMs writing
// into column slices of y (beta = 1 accumulation, bias as addmm's input).
inline void compose_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor& w21, const Tensor& w22,
                            const OptTensor& w12, const OptTensor& bias, const OptTensor& bias_up,
                            const OptTensor& route, const Dims& d) {
  const Tensor x0 = x.narrow(1, 0, d.d_in), x1 = x.narrow(1, d.d_in, d.e_in);
  Tensor y0 = y.narrow(1, 0, d.d_out), y1 = y.narrow(1, d.d_out, d.e_out);
  if (d.d_out > 0) {
    bias ? at::addmm_out(y0, *bias, x0, w.t()) : at::mm_out(y0, x0, w.t());
    if (w12 && d.e_in > 0) {
      if (route) {
        y0.addcmul_(at::mm(x1, w12->t()), route->unsqueeze(1));  // fp32 gate, one rounding into y's dtype
      } else {
        y0.addmm_(x1, w12->t());
      }
    }
  }
  if (d.e_out > 0) {
    bias_up ? at::addmm_out(y1, *bias_up, x0, w21.t()) : at::mm_out(y1, x0, w21.t());
    if (d.e_in > 0) y1.addmm_(x1, w22.t());
  }
}

// Device: kind (check::DeviceKind), prepare(x) (device guard / capability check, returns a guard object),
// run_decode(params, x) (launch and error check).
template <typename Device>
Tensor forward(const Tensor& x, const Tensor& w, const Tensor& w21, const Tensor& w22, const OptTensor& w12_in,
               const OptTensor& bias_in, const OptTensor& bias_up_in, const OptTensor& route_in) {
  const Dims d = checked(check::check_forward({"forward", Device::kind, describe(x), describe(w), describe(w21),
                                                describe(w22), describe(w12_in), describe(bias_in),
                                                describe(bias_up_in), describe(route_in)}));
  const OptTensor w12 = defined(w12_in), bias = defined(bias_in), bias_up = defined(bias_up_in);
  const OptTensor route = w12 ? defined(route_in) : std::nullopt;  // the route only gates the W12 term
  [[maybe_unused]] const auto guard = Device::prepare(x);

  Tensor y = at::empty({d.M, d.d_out + d.e_out}, x.options());
  if (y.numel() == 0) return y;
  if (d.M > kDecodeMaxTokens) {
    compose_forward(y, x, w, w21, w22, w12, bias, bias_up, route, d);
    return y;
  }
  // the decode kernel reads (pointer, row stride) views with unit column stride; others are copied
  const Tensor xs = decode_readable(x), ws = decode_readable(w), w21s = decode_readable(w21);
  const Tensor w22s = decode_readable(w22);
  const OptTensor w12s = w12 ? OptTensor(decode_readable(*w12)) : std::nullopt;
  const OptTensor bs = bias ? OptTensor(decode_readable(*bias)) : std::nullopt;
  const OptTensor bus = bias_up ? OptTensor(decode_readable(*bias_up)) : std::nullopt;
  const OptTensor rs = route ? OptTensor(decode_readable(*route)) : std::nullopt;
  DecodeParams p;
  p.dtype = kernel_dtype(x);
  p.dims = d;
  p.x = matrix_ref(xs);
  p.w = matrix_ref(ws);
  p.w21 = matrix_ref(w21s);
  p.w22 = matrix_ref(w22s);
  p.w12 = w12s ? matrix_ref(*w12s) : MatrixRef{};
  p.bias = bs ? bs->const_data_ptr() : nullptr;
  p.bias_up = bus ? bus->const_data_ptr() : nullptr;
  p.route = rs ? rs->const_data_ptr<float>() : nullptr;
  p.y = y.mutable_data_ptr();
  p.ldy = y.stride(0);
  Device::run_decode(p, x);
  return y;
}

// dx = [dy0 W + dy1 W21 ; r * (dy0 W12) + dy1 W22], droute[m] = <x1[m], (dy0 W12)[m]> (float32), like the
// torch backend; droute is an empty tensor unless need_droute.
template <typename Device>
std::tuple<Tensor, Tensor> backward_input(const Tensor& dy, const OptTensor& x_in, const Tensor& w,
                                          const Tensor& w21, const Tensor& w22, const OptTensor& w12_in,
                                          const OptTensor& route_in, bool need_droute) {
  const Dims d = checked(check::check_backward_input({"backward_input", Device::kind, describe(dy), describe(x_in),
                                                       describe(w), describe(w21), describe(w22), describe(w12_in),
                                                       describe(route_in), need_droute}));
  const OptTensor w12 = defined(w12_in), route = defined(route_in), x = defined(x_in);
  [[maybe_unused]] const auto guard = Device::prepare(dy);

  const Tensor dy0 = dy.narrow(1, 0, d.d_out), dy1 = dy.narrow(1, d.d_out, d.e_out);
  Tensor dx = at::empty({d.M, d.d_in + d.e_in}, dy.options());
  Tensor dx0 = dx.narrow(1, 0, d.d_in), dx1 = dx.narrow(1, d.d_in, d.e_in);
  at::mm_out(dx0, dy0, w).addmm_(dy1, w21);
  at::mm_out(dx1, dy1, w22);
  Tensor droute = at::empty({need_droute ? d.M : 0}, dy.options().dtype(at::kFloat));
  if (w12) {
    Tensor g = at::mm(dy0, *w12);
    if (need_droute) {  // an empty W12 term (d_out == 0) gives exactly 0, even for a NaN x_up
      droute = d.d_out > 0 ? g.to(at::kFloat).mul(x->narrow(1, d.d_in, d.e_in).to(at::kFloat)).sum(1)
                           : at::zeros({d.M}, droute.options());
    }
    if (route) g = g.mul(route->unsqueeze(1)).to(dy.scalar_type());
    dx1.add_(g);
  }
  return {dx, droute};
}

// dW21 = dy1^T x0, dW22 = dy1^T x1, dW12 = (r * dy0)^T x1: the requested ones, in that order. Never dW.
template <typename Device>
std::vector<Tensor> backward_weight(const Tensor& dy, const Tensor& x, const OptTensor& route_in, int64_t d_in,
                                    int64_t d_out, bool need_w21, bool need_w22, bool need_w12) {
  const Dims d = checked(check::check_backward_weight(
      {"backward_weight", Device::kind, describe(dy), describe(x), describe(route_in), d_in, d_out}));
  const OptTensor route = defined(route_in);
  [[maybe_unused]] const auto guard = Device::prepare(dy);

  const Tensor dy0 = dy.narrow(1, 0, d.d_out), dy1 = dy.narrow(1, d.d_out, d.e_out);
  const Tensor x0 = x.narrow(1, 0, d.d_in), x1 = x.narrow(1, d.d_in, d.e_in);
  std::vector<Tensor> grads;
  if (need_w21) grads.push_back(at::mm(dy1.t(), x0));
  if (need_w22) grads.push_back(at::mm(dy1.t(), x1));
  if (need_w12) {
    const Tensor scaled = route ? dy0.mul(route->unsqueeze(1)).to(dy.scalar_type()) : dy0;
    grads.push_back(at::mm(scaled.t(), x1));
  }
  return grads;
}

template <typename Device>
void impl_ops(torch::Library& m) {
  m.impl("forward", &forward<Device>);
  m.impl("backward_input", &backward_input<Device>);
  m.impl("backward_weight", &backward_weight<Device>);
}

}  // namespace ops
}  // namespace scale_kernels
