// Fused AdamW step over fp32 CPU tensors in two passes around torch's own sqrt, with the same
// per-element arithmetic as torch.optim.AdamW's multi-tensor (foreach) update (see cpu_adamw.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace megafast {

struct AdamWTensor {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* denom;  // pass 1 leaves exp_avg_sq here for the caller's sqrt; pass 2 reads sqrt(exp_avg_sq)
  int64_t numel;
  float step_size;  // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

struct AdamWScalars {
  float grad_scale;  // gradients are multiplied by this first (clipping); 1 leaves them as they are
  float decay;  // 1 - lr * weight_decay (decoupled weight decay); 1 when weight_decay == 0
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
};

// pass 1: exp_avg and exp_avg_sq from the (scaled) gradients
void adamw_moments(const std::vector<AdamWTensor>& tensors, const AdamWScalars& s, int num_threads);
// pass 2 (denom = sqrt(exp_avg_sq), computed by the caller with torch.sqrt): the parameters
void adamw_update(const std::vector<AdamWTensor>& tensors, const AdamWScalars& s, int num_threads);

}  // namespace megafast
