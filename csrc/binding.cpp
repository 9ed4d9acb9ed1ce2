// The CUDA instantiation of the scale_kernels_cuda ops (ops.h) and the module scale_kernels._C.
//
// `import scale_kernels._C` loads this library, which registers torch.ops.scale_kernels_cuda.{forward,
// backward_input, backward_weight} for CUDA tensors. What is CUDA-specific lives here: the sm_80+ check, the
// device guard, the current stream and the decode kernel launch; the argument checks, the ATen GEMM paths and
// the schemas are shared with the CPU test library (emulate/cpu_ops.cpp).
#include <Python.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "upscaled_linear.h"

namespace scale_kernels {
namespace {

struct CudaDevice {
  static constexpr check::DeviceKind kind = check::DeviceKind::CUDA;

  // Called once the arguments are checked (t is a CUDA tensor): sm_80+, then run on t's device.
  static c10::cuda::CUDAGuard prepare(const at::Tensor& t) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
    TORCH_CHECK_VALUE(major >= 8, "scale_kernels_cuda: needs a GPU of compute capability 8.0 or newer (sm_80+), ",
                      t.device(), " is ", major, ".x");
    return c10::cuda::CUDAGuard(t.device());
  }

  static void run_decode(const DecodeParams& p, const at::Tensor& x) {
    const cudaError_t err = upscaled_linear_decode(p, c10::cuda::getCurrentCUDAStream(x.get_device()));
    TORCH_CHECK(err == cudaSuccess, "scale_kernels_cuda.forward: decode kernel launch failed: ",
                cudaGetErrorString(err));
  }
};

}  // namespace
}  // namespace scale_kernels

TORCH_LIBRARY(scale_kernels_cuda, m) { scale_kernels::ops::define_ops(m); }

TORCH_LIBRARY_IMPL(scale_kernels_cuda, CUDA, m) { scale_kernels::ops::impl_ops<scale_kernels::CudaDevice>(m); }

// The Python module is empty: importing it runs the registrations above.
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
