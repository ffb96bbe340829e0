// Multi-tensor fused AdamW and Lion steps: fp32 master weights and optimizer states, the model's
// bf16/fp16 weights written in the same pass, gradient scaling (loss-scale unscale and global-norm
// clipping) folded in. One launch updates every tensor of a parameter group: block c processes
// chunk c (chunk_size elements) of the tensor found by binary search in the chunk prefix sums.
// Pure CUDA: no torch headers (bound in csrc/cuda_ops.cpp). See launchers.h for the maths.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;

__device__ __forceinline__ float load_as_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_as_float(const __half* p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store_from_float(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store_from_float(__half* p, int64_t i, float v) { p[i] = __float2half(v); }

struct NoModel {};  // model_dtype == none: nothing to write

struct Tensors {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* model;
  int64_t begin, end;  // element range of this block's chunk
};

__device__ __forceinline__ Tensors locate(const int64_t* meta, int64_t n, int64_t chunk_size) {
  const int64_t* starts = meta + 6 * n;
  const int64_t c = blockIdx.x;
  int64_t lo = 0, hi = n - 1;  // largest i with starts[i] <= c
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= c) lo = mid; else hi = mid - 1;
  }
  const int64_t i = lo;
  Tensors t;
  t.param = reinterpret_cast<float*>(meta[i]);
  t.grad = reinterpret_cast<const void*>(meta[n + i]);
  t.exp_avg = reinterpret_cast<float*>(meta[2 * n + i]);
  t.exp_avg_sq = reinterpret_cast<float*>(meta[3 * n + i]);
  t.model = reinterpret_cast<void*>(meta[4 * n + i]);
  const int64_t numel = meta[5 * n + i];
  t.begin = (c - starts[i]) * chunk_size;
  t.end = t.begin + chunk_size < numel ? t.begin + chunk_size : numel;
  return t;
}

template <typename M>
__device__ __forceinline__ void write_model(void* model, int64_t i, float v) {
  if (model != nullptr) store_from_float(reinterpret_cast<M*>(model), i, v);
}
template <>
__device__ __forceinline__ void write_model<NoModel>(void*, int64_t, float) {}

template <typename G, typename M>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const int64_t* meta, int64_t n, int64_t chunk_size, float lr,
                                                        float beta1, float beta2, float eps, float weight_decay,
                                                        float bias_correction1, float bias_correction2_sqrt,
                                                        float grad_scale) {
  const Tensors t = locate(meta, n, chunk_size);
  const G* grad = reinterpret_cast<const G*>(t.grad);
  const float decay = 1.0f - lr * weight_decay;
  const float step_size = lr / bias_correction1;
  for (int64_t base = t.begin + threadIdx.x; base < t.end; base += int64_t(kThreads) * kIlp) {
    float p[kIlp], g[kIlp], m[kIlp], v[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < t.end) {
        p[k] = t.param[i];
        g[k] = load_as_float(grad, i) * grad_scale;
        m[k] = t.exp_avg[i];
        v[k] = t.exp_avg_sq[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < t.end) {
        p[k] *= decay;
        m[k] = fmaf(1.0f - beta1, g[k] - m[k], m[k]);  // lerp, as torch
        v[k] = fmaf(beta2, v[k], (1.0f - beta2) * g[k] * g[k]);
        const float denom = sqrtf(v[k]) / bias_correction2_sqrt + eps;
        p[k] -= step_size * m[k] / denom;
        t.param[i] = p[k];
        t.exp_avg[i] = m[k];
        t.exp_avg_sq[i] = v[k];
        write_model<M>(t.model, i, p[k]);
      }
    }
  }
}

template <typename G, typename M>
__global__ void __launch_bounds__(kThreads) lion_kernel(const int64_t* meta, int64_t n, int64_t chunk_size, float lr,
                                                       float beta1, float beta2, float weight_decay,
                                                       float grad_scale) {
  const Tensors t = locate(meta, n, chunk_size);
  const G* grad = reinterpret_cast<const G*>(t.grad);
  for (int64_t base = t.begin + threadIdx.x; base < t.end; base += int64_t(kThreads) * kIlp) {
    float p[kIlp], g[kIlp], m[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < t.end) {
        p[k] = t.param[i];
        g[k] = load_as_float(grad, i) * grad_scale;
        m[k] = t.exp_avg[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < t.end) {
        const float c = beta1 * m[k] + (1.0f - beta1) * g[k];
        const float sign = (c > 0.0f) ? 1.0f : ((c < 0.0f) ? -1.0f : 0.0f);
        p[k] = p[k] - lr * (sign + weight_decay * p[k]);
        m[k] = beta2 * m[k] + (1.0f - beta2) * g[k];
        t.param[i] = p[k];
        t.exp_avg[i] = m[k];
        write_model<M>(t.model, i, p[k]);
      }
    }
  }
}

// Calls f.template operator()<G, M>() for the runtime dtype codes; returns cudaErrorInvalidValue
// for unsupported ones.
template <typename F>
int dispatch(int grad_dtype, int model_dtype, F&& f) {
  auto by_model = [&](auto grad_tag) -> int {
    using G = decltype(grad_tag);
    switch (model_dtype) {
      case MEGAFAST_NONE: return f(G{}, NoModel{});
      case MEGAFAST_BF16: return f(G{}, __nv_bfloat16{});
      case MEGAFAST_F16: return f(G{}, __half{});
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  };
  switch (grad_dtype) {
    case MEGAFAST_F32: return by_model(float{});
    case MEGAFAST_BF16: return by_model(__nv_bfloat16{});
    case MEGAFAST_F16: return by_model(__half{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

extern "C" int megafast_multi_tensor_adamw(const int64_t* meta, int64_t num_tensors, int64_t num_chunks,
                                           int64_t chunk_size, int grad_dtype, int model_dtype, float lr, float beta1,
                                           float beta2, float eps, float weight_decay, float bias_correction1,
                                           float bias_correction2_sqrt, float grad_scale, void* stream) {
  if (num_tensors == 0 || num_chunks == 0) return 0;
  if (chunk_size <= 0 || num_chunks > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(grad_dtype, model_dtype, [&](auto g, auto m) -> int {
    adamw_kernel<decltype(g), decltype(m)><<<static_cast<unsigned>(num_chunks), kThreads, 0, s>>>(
        meta, num_tensors, chunk_size, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
        grad_scale);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int megafast_multi_tensor_lion(const int64_t* meta, int64_t num_tensors, int64_t num_chunks,
                                          int64_t chunk_size, int grad_dtype, int model_dtype, float lr, float beta1,
                                          float beta2, float weight_decay, float grad_scale, void* stream) {
  if (num_tensors == 0 || num_chunks == 0) return 0;
  if (chunk_size <= 0 || num_chunks > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(grad_dtype, model_dtype, [&](auto g, auto m) -> int {
    lion_kernel<decltype(g), decltype(m)><<<static_cast<unsigned>(num_chunks), kThreads, 0, s>>>(
        meta, num_tensors, chunk_size, lr, beta1, beta2, weight_decay, grad_scale);
    return static_cast<int>(cudaGetLastError());
  });
}
