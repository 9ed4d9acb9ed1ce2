// The CPU test library (a test tool, not part of the extension): the very ops of scale_kernels._C (ops.h:
// argument checks, decode kernel for M <= 64, ATen GEMMs otherwise, both backward ops) registered as
// torch.ops.scale_kernels_cuda_emu for CPU tensors, with the decode kernel's device code run by the CPU
// emulation. Plus C entry points for ctypes: the torch-free checker on hand-made tensor descriptions (devices
// and storage a CPU cannot produce) and a count of the emulated decode launches.
//
// Built by scripts.check_cuda_compile (build_cpu_test_library) for tests/test_csrc_compile.py.
#include <algorithm>
#include <cstring>

#include "../ops.h"
#include "decode_emulator.h"

namespace scale_kernels {
namespace {

int decode_ctas = 0;  // CTAs of the emulated decode launches since the last reset

struct EmulatedCpuDevice {
  static constexpr check::DeviceKind kind = check::DeviceKind::CPU;
  struct NoGuard {};
  static NoGuard prepare(const at::Tensor&) { return {}; }
  static void run_decode(const DecodeParams& p, const at::Tensor&) { decode_ctas += emulate::run_decode(p); }
};

int report(const check::CheckResult& r, char* message, int capacity) {
  if (capacity > 0) {
    const size_t n = std::min(r.message.size(), static_cast<size_t>(capacity - 1));
    std::memcpy(message, r.message.data(), n);
    message[n] = '\0';
  }
  return static_cast<int>(r.kind);
}

}  // namespace
}  // namespace scale_kernels

TORCH_LIBRARY(scale_kernels_cuda_emu, m) { scale_kernels::ops::define_ops(m); }

TORCH_LIBRARY_IMPL(scale_kernels_cuda_emu, CPU, m) {
  scale_kernels::ops::impl_ops<scale_kernels::EmulatedCpuDevice>(m);
}

extern "C" {

// CTAs the emulated decode kernel ran since the previous call (and resets the count).
int scale_kernels_emu_take_decode_ctas() {
  const int n = scale_kernels::decode_ctas;
  scale_kernels::decode_ctas = 0;
  return n;
}

// check_forward on descriptions x, w, w21, w22, w12, bias, bias_up, route (in that order) for an op running on
// `device` (a check::DeviceKind); returns the check::ErrorKind and writes the message.
int scale_kernels_emu_check_forward(int device, const scale_kernels::check::TensorDesc* descs, char* message,
                                    int capacity) {
  scale_kernels::check::ForwardArgs a;
  a.device = static_cast<scale_kernels::check::DeviceKind>(device);
  scale_kernels::check::TensorDesc* fields[] = {&a.x, &a.w, &a.w21, &a.w22, &a.w12, &a.bias, &a.bias_up, &a.route};
  for (int i = 0; i < 8; ++i) *fields[i] = descs[i];
  return scale_kernels::report(scale_kernels::check::check_forward(a), message, capacity);
}

}  // extern "C"
