// Thin torch binding of the fused upscaled-linear CUDA kernels: argument checks, output allocation, the
// current CUDA stream, and TORCH_LIBRARY registration of torch.ops.scale_kernels_cuda.{forward,
// backward_input, backward_weight}. All arithmetic lives in the torch-free *.cu files.
//
// Layout handling: every matrix is passed as (pointer, row stride) with unit column stride. x and dy may
// have any row stride (e.g. a column slice of a wider tensor); a matrix whose last-dim stride is not 1
// (a transposed view, say) is copied to a contiguous tensor first. route must be a contiguous float32 (M,)
// vector (the Python layer normalises it) and is ignored when w12 is absent.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <vector>

#include "upscaled_linear.h"

namespace scale_kernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

ScalarType scalar_type_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarType::Float32;
    case at::kHalf:
      return ScalarType::Float16;
    case at::kBFloat16:
      return ScalarType::BFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "scale_kernels_cuda: ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// A CUDA matrix of the reference dtype/device and the expected shape, with unit column stride.
Tensor as_matrix(const Tensor& t, const char* name, const Tensor& ref, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "scale_kernels_cuda: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "scale_kernels_cuda: ", name, " must be on ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "scale_kernels_cuda: ", name, " must have dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  if (t.stride(1) == 1 && t.stride(0) >= cols) return t;
  return t.contiguous();  // documented copy: the kernels need a unit column stride
}

Tensor as_vector(const Tensor& t, const char* name, const Tensor& ref, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "scale_kernels_cuda: ", name, " must have shape (", n,
              ",), got ", t.sizes());
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "scale_kernels_cuda: ", name, " must be on ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "scale_kernels_cuda: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  return t.contiguous();
}

MatrixRef ref_of(const Tensor& t) { return MatrixRef{t.data_ptr(), t.stride(0)}; }
MatrixRef ref_of(const OptTensor& t) { return t ? ref_of(*t) : MatrixRef{}; }

const void* ptr_of(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }
const float* float_ptr_of(const OptTensor& t) { return t ? t->data_ptr<float>() : nullptr; }

void check_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "scale_kernels_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  TORCH_CHECK(major >= 8, "scale_kernels_cuda: needs a GPU of compute capability 8.0 or newer (sm_80+), ",
              t.device(), " is ", major, ".x");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "scale_kernels_cuda.", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

void check_rows(int64_t M) {
  TORCH_CHECK(M <= INT_MAX, "scale_kernels_cuda: at most ", INT_MAX, " tokens per call, got ", M);
}

// The four weight blocks, checked against w's shape and x's width.
struct Weights {
  Tensor w, w21, w22;
  OptTensor w12;
  Dims dims;
};

Weights check_weights(const Tensor& ref, int64_t M, int64_t in_width, const Tensor& w, const Tensor& w21,
                      const Tensor& w22, const OptTensor& w12) {
  TORCH_CHECK(w.dim() == 2, "scale_kernels_cuda: w must be 2-D (d_out, d_in), got ", w.sizes());
  TORCH_CHECK(w21.dim() == 2, "scale_kernels_cuda: w21 must be 2-D (e_out, d_in), got ", w21.sizes());
  Weights out;
  Dims& d = out.dims;
  d.M = M;
  d.d_out = w.size(0);
  d.d_in = w.size(1);
  d.e_out = w21.size(0);
  d.e_in = in_width - d.d_in;
  TORCH_CHECK(d.e_in >= 0, "scale_kernels_cuda: x width ", in_width, " is smaller than d_in = ", d.d_in);
  out.w = as_matrix(w, "w", ref, d.d_out, d.d_in);
  out.w21 = as_matrix(w21, "w21", ref, d.e_out, d.d_in);
  out.w22 = as_matrix(w22, "w22", ref, d.e_out, d.e_in);
  if (w12) out.w12 = as_matrix(*w12, "w12", ref, d.d_out, d.e_in);
  return out;
}

// The dims and weight blocks of forward / backward-input params.
template <typename Params>
void set_weights(Params& p, const Weights& wt) {
  p.dims = wt.dims;
  p.w = ref_of(wt.w);
  p.w21 = ref_of(wt.w21);
  p.w22 = ref_of(wt.w22);
  p.w12 = ref_of(wt.w12);
}

OptTensor check_route(const OptTensor& route, const OptTensor& w12, const Tensor& ref, int64_t M) {
  if (!route || !w12) return std::nullopt;  // the route only gates the W12 term
  return as_vector(*route, "route", ref, M, at::kFloat);
}

Tensor forward(const Tensor& x, const Tensor& w, const Tensor& w21, const Tensor& w22, const OptTensor& w12,
               const OptTensor& bias, const OptTensor& bias_up, const OptTensor& route) {
  check_device(x, "x");
  TORCH_CHECK(x.dim() == 2, "scale_kernels_cuda.forward: x must be 2-D (M, d_in + e_in), got ", x.sizes());
  const ScalarType dtype = scalar_type_of(x, "x");
  const int64_t M = x.size(0);
  check_rows(M);
  const Weights wt = check_weights(x, M, x.size(1), w, w21, w22, w12);
  const Dims& d = wt.dims;
  const Tensor xm = as_matrix(x, "x", x, M, d.d_in + d.e_in);
  const OptTensor b = bias ? OptTensor(as_vector(*bias, "bias", x, d.d_out, x.scalar_type())) : std::nullopt;
  const OptTensor bu =
      bias_up ? OptTensor(as_vector(*bias_up, "bias_up", x, d.e_out, x.scalar_type())) : std::nullopt;
  const OptTensor r = check_route(route, w12, x, M);

  Tensor y = at::empty({M, d.d_out + d.e_out}, x.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  ForwardParams p;
  p.dtype = dtype;
  set_weights(p, wt);
  p.x = ref_of(xm);
  p.bias = ptr_of(b);
  p.bias_up = ptr_of(bu);
  p.route = float_ptr_of(r);
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  check_launch(upscaled_linear_forward(p, c10::cuda::getCurrentCUDAStream()), "forward");
  return y;
}

std::tuple<Tensor, Tensor> backward_input(const Tensor& dy, const OptTensor& x, const Tensor& w,
                                          const Tensor& w21, const Tensor& w22, const OptTensor& w12,
                                          const OptTensor& route, bool need_droute) {
  check_device(dy, "dy");
  TORCH_CHECK(dy.dim() == 2, "scale_kernels_cuda.backward_input: dy must be 2-D (M, d_out + e_out), got ",
              dy.sizes());
  const ScalarType dtype = scalar_type_of(dy, "dy");
  const int64_t M = dy.size(0);
  check_rows(M);
  TORCH_CHECK(w.dim() == 2 && w22.dim() == 2, "scale_kernels_cuda.backward_input: w and w22 must be 2-D");
  const Weights wt = check_weights(dy, M, w.size(1) + w22.size(1), w, w21, w22, w12);
  const Dims& d = wt.dims;
  const Tensor dym = as_matrix(dy, "dy", dy, M, d.d_out + d.e_out);
  const OptTensor r = check_route(route, w12, dy, M);
  TORCH_CHECK(!need_droute || w12, "scale_kernels_cuda.backward_input: need_droute=True requires w12");
  TORCH_CHECK(!need_droute || x, "scale_kernels_cuda.backward_input: need_droute=True requires x");
  const OptTensor xm = (need_droute && x) ? OptTensor(as_matrix(*x, "x", dy, M, d.d_in + d.e_in)) : std::nullopt;

  Tensor dx = at::empty({M, d.d_in + d.e_in}, dy.options());
  Tensor droute = at::empty({need_droute ? M : 0}, dy.options().dtype(at::kFloat));
  if (M == 0) return {dx, droute};
  const c10::cuda::CUDAGuard guard(dy.device());
  Tensor workspace;
  BackwardInputParams p;
  p.dtype = dtype;
  set_weights(p, wt);
  p.dy = ref_of(dym);
  p.x = ref_of(xm);
  p.route = float_ptr_of(r);
  p.dx = dx.data_ptr();
  p.lddx = dx.stride(0);
  if (need_droute) {
    workspace = at::empty({static_cast<int64_t>(backward_input_workspace_floats(d))}, droute.options());
    p.droute = droute.data_ptr<float>();
    p.workspace = workspace.data_ptr<float>();
  }
  check_launch(upscaled_linear_backward_input(p, c10::cuda::getCurrentCUDAStream()), "backward_input");
  return {dx, droute};
}

std::vector<Tensor> backward_weight(const Tensor& dy, const Tensor& x, const OptTensor& route, int64_t d_in,
                                    int64_t d_out, bool need_w21, bool need_w22, bool need_w12) {
  check_device(dy, "dy");
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2, "scale_kernels_cuda.backward_weight: dy (M, d_out + e_out) and ",
              "x (M, d_in + e_in) must be 2-D, got ", dy.sizes(), " and ", x.sizes());
  const ScalarType dtype = scalar_type_of(dy, "dy");
  Dims d;
  d.M = dy.size(0);
  d.d_in = d_in;
  d.d_out = d_out;
  d.e_in = x.size(1) - d_in;
  d.e_out = dy.size(1) - d_out;
  check_rows(d.M);
  TORCH_CHECK(d_in >= 0 && d_out >= 0 && d.e_in >= 0 && d.e_out >= 0, "scale_kernels_cuda.backward_weight: ",
              "d_in = ", d_in, " / d_out = ", d_out, " exceed x width ", x.size(1), " / dy width ", dy.size(1));
  const Tensor dym = as_matrix(dy, "dy", dy, d.M, d.d_out + d.e_out);
  const Tensor xm = as_matrix(x, "x", dy, d.M, d.d_in + d.e_in);
  // dW12's route: here (unlike the forward) it is present exactly when it scales dy0's rows
  const OptTensor r = route ? OptTensor(as_vector(*route, "route", dy, d.M, at::kFloat)) : std::nullopt;

  std::vector<Tensor> grads;
  auto new_grad = [&](int64_t rows, int64_t cols) {
    grads.push_back(at::empty({rows, cols}, dy.options()));
    return grads.back().data_ptr();
  };
  BackwardWeightParams p;
  p.dtype = dtype;
  p.dims = d;
  p.dy = ref_of(dym);
  p.x = ref_of(xm);
  p.route = float_ptr_of(r);
  if (need_w21) p.dw21 = new_grad(d.e_out, d.d_in);
  if (need_w22) p.dw22 = new_grad(d.e_out, d.e_in);
  if (need_w12) p.dw12 = new_grad(d.d_out, d.e_in);
  if (grads.empty()) return grads;
  const c10::cuda::CUDAGuard guard(dy.device());
  check_launch(upscaled_linear_backward_weight(p, c10::cuda::getCurrentCUDAStream()), "backward_weight");
  return grads;
}

}  // namespace
}  // namespace scale_kernels

TORCH_LIBRARY(scale_kernels_cuda, m) {
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

TORCH_LIBRARY_IMPL(scale_kernels_cuda, CUDA, m) {
  m.impl("forward", &scale_kernels::forward);
  m.impl("backward_input", &scale_kernels::backward_input);
  m.impl("backward_weight", &scale_kernels::backward_weight);
}

// `import scale_kernels._C` loads this library (running the registrations above); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                                   "_C",
                                   "scale_kernels CUDA ops (torch.ops.scale_kernels_cuda)",
                                   -1,
                                   nullptr,
                                   nullptr,
                                   nullptr,
                                   nullptr,
                                   nullptr};
  return PyModule_Create(&module_def);
}
