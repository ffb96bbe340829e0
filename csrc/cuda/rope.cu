// Rotary position embedding, half-split (rotate_half) layout, forward and backward. Pure CUDA: no
// torch headers (bound in csrc/cuda_ops.cpp). With x = [x1, x2], cos = [c1, c2], sin = [s1, s2]:
//   forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
//   backward: y1 = x1 c1 + x2 s2,   y2 = x2 c2 - x1 s1      (x is then the output gradient)
// One block per (position, batch) row; its threads walk the (head, pair) grid of that row, so the
// row's cos/sin (fp32 [s, b, d], batch stride 0 when shared) are read from L1 once per head.
// Arithmetic in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                                                       const float* __restrict__ sin, T* __restrict__ y, int64_t b,
                                                       int64_t h, int64_t half, int64_t xs, int64_t xb, int64_t xh,
                                                       int64_t ys, int64_t yb, int64_t yh, int64_t cs, int64_t cb,
                                                       int64_t ss, int64_t sb, bool backward) {
  const int64_t row = blockIdx.x;
  const int64_t si = row / b, bi = row % b;
  const float* c = cos + si * cs + bi * cb;
  const float* s = sin + si * ss + bi * sb;
  const T* xr = x + si * xs + bi * xb;
  T* yr = y + si * ys + bi * yb;
  for (int64_t idx = threadIdx.x; idx < h * half; idx += kThreads) {
    const int64_t head = idx / half, j = idx % half;
    const float x1 = to_float(xr[head * xh + j]);
    const float x2 = to_float(xr[head * xh + half + j]);
    const float c1 = c[j], c2 = c[half + j], s1 = s[j], s2 = s[half + j];
    float y1, y2;
    if (backward) {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    } else {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    }
    yr[head * yh + j] = from_float<T>(y1);
    yr[head * yh + half + j] = from_float<T>(y2);
  }
}

template <typename T>
int launch(const void* x, const float* cos, const float* sin, void* y, int64_t s, int64_t b, int64_t h, int64_t d,
           int64_t xs, int64_t xb, int64_t xh, int64_t ys, int64_t yb, int64_t yh, int64_t cs, int64_t cb, int64_t ss,
           int64_t sb, int backward, cudaStream_t stream) {
  rope_kernel<T><<<static_cast<unsigned>(s * b), kThreads, 0, stream>>>(static_cast<const T*>(x), cos, sin,
                                                                         static_cast<T*>(y), b, h, d / 2, xs, xb, xh,
                                                                         ys, yb, yh, cs, cb, ss, sb, backward != 0);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int megafast_rope(const void* x, const float* cos, const float* sin, void* y, int dtype, int64_t s,
                             int64_t b, int64_t h, int64_t d, int64_t xs, int64_t xb, int64_t xh, int64_t ys,
                             int64_t yb, int64_t yh, int64_t cs, int64_t cb, int64_t ss, int64_t sb, int backward,
                             void* stream) {
  if (s * b == 0 || h == 0) return 0;
  if (d % 2 != 0 || s * b > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case MEGAFAST_F32:
      return launch<float>(x, cos, sin, y, s, b, h, d, xs, xb, xh, ys, yb, yh, cs, cb, ss, sb, backward, st);
    case MEGAFAST_BF16:
      return launch<__nv_bfloat16>(x, cos, sin, y, s, b, h, d, xs, xb, xh, ys, yb, yh, cs, cb, ss, sb, backward, st);
    case MEGAFAST_F16:
      return launch<__half>(x, cos, sin, y, s, b, h, d, xs, xb, xh, ys, yb, yh, cs, cb, ss, sb, backward, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
