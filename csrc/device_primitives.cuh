// The few device primitives decode_kernel.cuh builds on (nvcc only). csrc/emulate/cuda_host_shim.h provides
// the same names for the CPU emulation, so everything else in the kernel is compiled and tested on CPU too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace scale_kernels {
namespace prim {

// 16 bytes of a weight row: read once per launch, so it bypasses L1 (keeps L1 for the tokens' x) and asks
// L2 to fetch the surrounding 256 bytes, which the next loads of the same warp use.
__device__ __forceinline__ uint4 load_streaming_16B(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// 16 bytes of x: every block re-reads the tokens' x, so it goes through the read-only L1 path.
__device__ __forceinline__ uint4 load_cached_16B(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

__device__ __forceinline__ uint16_t load_scalar(const uint16_t* p) { return __ldg(p); }
__device__ __forceinline__ float load_scalar(const float* p) { return __ldg(p); }

// D = A B + D on one warp: A 16x16 (row-major fragments), B 16x8 (column-major), fp32 accumulators, in the
// register layout of the PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating point type".
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             __nv_bfloat16 /*element type tag*/) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             __half /*element type tag*/) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The value of lane (this lane ^ lane_mask), all 32 lanes taking part.
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace prim
}  // namespace scale_kernels
