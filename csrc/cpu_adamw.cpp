// Fused AdamW on the CPU, element for element the arithmetic of torch.optim.AdamW's multi-tensor
// (foreach) update on fp32 tensors, so both give the same bits (torch 2.13; tests/test_cpu_adamw.py):
//
//   g  = g * grad_scale                       (clipping: _foreach_mul_, skipped when grad_scale == 1)
//   m  = lerp(m, g, 1 - beta1)                (ATen's vectorised lerp: fma(w, g - m, m) for w < 0.5,
//                                              fma(w - 1, g - m, g) otherwise)
//   v  = v * beta2;  v = fma((1 - beta2) * g, g, v)       (_foreach_mul_; ATen's addcmul is an fma)
//   ---- pass 1 ends; the caller takes d = torch.sqrt(v) (ATen's sqrt is not the correctly rounded
//        one on every build, so it is not redone here) ----
//   d  = d / sqrt(1 - beta2^t) + eps          (_foreach_div_, _foreach_add_)
//   p  = p * (1 - lr * wd)                    (_foreach_mul_, skipped when wd == 0)
//   p  = p + (step_size * m) / d              (_foreach_addcdiv_, step_size = -lr / (1 - beta1^t))
//
// Other than the two fused multiply-adds that ATen itself uses, every operation is one IEEE-rounded
// fp32 operation; the file is compiled with -ffp-contract=off so that the compiler adds no fma.
// Memory traffic per element: pass 1 reads g, m, v and writes m, v; pass 2 reads d, m, p and writes
// p (with the sqrt: 11 x 4 bytes, against ~20 x 4 for the eight multi-tensor passes).
#include "cpu_adamw.h"

#include <algorithm>
#include <cmath>
#include <thread>

namespace megafast {
namespace {

template <bool kScaleGrad>
__attribute__((always_inline)) inline void moments(const AdamWTensor& t, int64_t lo, int64_t hi,
                                                   const AdamWScalars& s) {
  const bool small = std::fabs(s.lerp_weight) < 0.5f;
  const float coeff = small ? s.lerp_weight : s.lerp_weight - 1.0f;
  const float* __restrict g = t.grad;
  float* __restrict m = t.exp_avg;
  float* __restrict v = t.exp_avg_sq;
  for (int64_t i = lo; i < hi; ++i) {
    float gi = g[i];
    if (kScaleGrad) gi = gi * s.grad_scale;
    const float mi = m[i];
    m[i] = std::fma(coeff, gi - mi, small ? mi : gi);
    v[i] = std::fma(s.one_minus_beta2 * gi, gi, v[i] * s.beta2);
  }
}

template <bool kDecay>
__attribute__((always_inline)) inline void update(const AdamWTensor& t, int64_t lo, int64_t hi,
                                                  const AdamWScalars& s) {
  float* __restrict p = t.param;
  const float* __restrict m = t.exp_avg;
  const float* __restrict d = t.denom;
  const float step_size = t.step_size, bc2 = t.bias_correction2_sqrt;
  for (int64_t i = lo; i < hi; ++i) {
    const float di = d[i] / bc2 + s.eps;
    float pi = p[i];
    if (kDecay) pi = pi * s.decay;
    p[i] = pi + (step_size * m[i]) / di;
  }
}

using Body = void (*)(const AdamWTensor&, int64_t, int64_t, const AdamWScalars&);

template <Body kBody>
__attribute__((always_inline)) inline void run_range(const std::vector<AdamWTensor>& tensors, int64_t begin,
                                                     int64_t end, const AdamWScalars& s) {
  int64_t offset = 0;  // of the current tensor in the concatenation of all tensors
  for (const AdamWTensor& t : tensors) {
    const int64_t lo = std::max<int64_t>(begin - offset, 0), hi = std::min<int64_t>(end - offset, t.numel);
    if (lo < hi) kBody(t, lo, hi, s);
    offset += t.numel;
    if (offset >= end) break;
  }
}

using RangeFn = void (*)(const std::vector<AdamWTensor>&, int64_t, int64_t, const AdamWScalars&);

#if defined(__x86_64__) && defined(__GNUC__)
// The same loops compiled for AVX2 + FMA (8 floats per instruction, hardware fma), picked at run
// time; the generic build is the fallback (and the only one on other machines). The loops are
// always_inline so that they are compiled inside this target, not called as generic code.
template <Body kBody>
__attribute__((target("avx2,fma"))) void run_range_avx2(const std::vector<AdamWTensor>& tensors, int64_t begin,
                                                         int64_t end, const AdamWScalars& s) {
  run_range<kBody>(tensors, begin, end, s);
}

bool has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

template <Body kBody>
RangeFn pick() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2_fma()) return run_range_avx2<kBody>;
#endif
  return run_range<kBody>;
}

// fn over the concatenated elements, in contiguous ranges of whole 64-element blocks, one per thread
void parallel(RangeFn fn, const std::vector<AdamWTensor>& tensors, const AdamWScalars& s, int num_threads) {
  int64_t total = 0;
  for (const AdamWTensor& t : tensors) total += t.numel;
  if (total == 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, total / 32768));
  const int64_t per = ((total + threads - 1) / threads + 63) / 64 * 64;
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < threads; ++k) {
    const int64_t b = k * per, e = std::min(total, (k + 1) * per);
    if (b < e) pool.emplace_back(fn, std::cref(tensors), b, e, std::cref(s));
  }
  fn(tensors, 0, std::min(total, per), s);
  for (std::thread& th : pool) th.join();
}

}  // namespace

void adamw_moments(const std::vector<AdamWTensor>& tensors, const AdamWScalars& s, int num_threads) {
  parallel(s.grad_scale != 1.0f ? pick<moments<true>>() : pick<moments<false>>(), tensors, s, num_threads);
}

void adamw_update(const std::vector<AdamWTensor>& tensors, const AdamWScalars& s, int num_threads) {
  parallel(s.decay != 1.0f ? pick<update<true>>() : pick<update<false>>(), tensors, s, num_threads);
}

}  // namespace megafast
