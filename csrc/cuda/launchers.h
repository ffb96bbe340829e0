// extern "C" launchers of megafast's CUDA kernels: raw pointers, sizes, a dtype code and a stream
// (cudaStream_t passed as void*), returning a cudaError_t as int (0 = success). Plain C: included by
// the .cu files and by csrc/cuda_ops.cpp, which binds them to torch without any torch CUDA header.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types: 0 none (no such tensor), 1 float32, 2 bfloat16, 3 float16.
enum { MEGAFAST_NONE = 0, MEGAFAST_F32 = 1, MEGAFAST_BF16 = 2, MEGAFAST_F16 = 3 };

// Multi-tensor optimizer steps. `meta` is a device int64 array for n tensors:
//   [0,n) fp32 master params, [n,2n) grads, [2n,3n) exp_avg, [3n,4n) exp_avg_sq (AdamW only),
//   [4n,5n) model params written in model_dtype (0 where none), [5n,6n) numel,
//   [6n,7n+1) prefix sums of chunks per tensor (chunk c of the launch belongs to tensor i when
//   starts[i] <= c < starts[i+1]); `num_chunks` = starts[n]. Every grad is multiplied by grad_scale
//   first (unscaling and global-norm clipping folded into the update).
//
// AdamW (torch.optim.AdamW's maths):   p <- p (1 - lr wd);  m <- m + (1 - b1)(g - m);
//   v <- b2 v + (1 - b2) g^2;  p <- p - (lr / bc1) m / (sqrt(v) / bc2_sqrt + eps)
int megafast_multi_tensor_adamw(const int64_t* meta, int64_t num_tensors, int64_t num_chunks, int64_t chunk_size,
                                int grad_dtype, int model_dtype, float lr, float beta1, float beta2, float eps,
                                float weight_decay, float bias_correction1, float bias_correction2_sqrt,
                                float grad_scale, void* stream);

// Lion:   c = b1 m + (1 - b1) g;  p <- p - lr (sign(c) + wd p);  m <- b2 m + (1 - b2) g
int megafast_multi_tensor_lion(const int64_t* meta, int64_t num_tensors, int64_t num_chunks, int64_t chunk_size,
                               int grad_dtype, int model_dtype, float lr, float beta1, float beta2,
                               float weight_decay, float grad_scale, void* stream);

// Rotary embedding (half-split): x [s, b, h, d] with strides (xs, xb, xh, 1), cos and sin fp32
// [s, b, d] with strides (cs, cb, 1) and (ss, sb, 1) (cb = sb = 0: one table for every sequence),
// y [s, b, h, d] with strides (ys, yb, yh, 1); backward != 0 applies the transpose.
int megafast_rope(const void* x, const float* cos, const float* sin, void* y, int dtype, int64_t s, int64_t b,
                  int64_t h, int64_t d, int64_t xs, int64_t xb, int64_t xh, int64_t ys, int64_t yb, int64_t yh,
                  int64_t cs, int64_t cb, int64_t ss, int64_t sb, int backward, void* stream);

#ifdef __cplusplus
}
#endif
