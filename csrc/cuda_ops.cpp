// torch bindings of the pure-CUDA launchers in csrc/cuda/*.cu (compiled only in CUDA builds,
// see setup.py; registered into megafast._C by bindings.cpp).
//
// Only CPU-side torch headers are used (and few of them: ATen's Tensor and empty, torch's pybind11
// casters): the caller passes the CUDA stream as an integer (torch.cuda.current_stream().cuda_stream)
// and makes the tensors' device current, so this file also compiles (and is syntax-checked in CI,
// tests/test_kernels_cuda_build.py) against a CPU-only torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "cuda/launchers.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return MEGAFAST_F32;
    case at::kBFloat16: return MEGAFAST_BF16;
    case at::kHalf: return MEGAFAST_F16;
    default: TORCH_CHECK(false, "megafast CUDA kernels support float32, bfloat16 and float16, got ", t.scalar_type());
  }
  return MEGAFAST_NONE;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA launch failed with cudaError_t ", err);
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, int64_t stream) {
  TORCH_CHECK(x.is_cuda() && cos.is_cuda() && sin.is_cuda(), "rope: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x must be [s, b, h, d] with a contiguous last dimension");
  const int64_t s = x.size(0), b = x.size(1), h = x.size(2), d = x.size(3);
  TORCH_CHECK(d % 2 == 0, "rope: head dim must be even, got ", d);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope: cos/sin must be float32");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == s && t->size(1) == b && t->size(2) == d && t->stride(2) == 1,
                "rope: cos/sin must be [s, b, d] (batch stride 0 when shared) with a contiguous last dimension");
  }
  at::Tensor y = at::empty({s, b, h, d}, x.options());
  check_launch(megafast_rope(x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr(), dtype_code(x), s,
                             b, h, d, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                             cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), backward ? 1 : 0,
                             as_stream(stream)),
               "rope");
  return y;
}

// The device metadata of a multi-tensor launch (layout in launchers.h); returns (meta, num_chunks).
std::pair<at::Tensor, int64_t> build_meta(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                          const std::vector<at::Tensor>& exp_avgs,
                                          const std::vector<at::Tensor>& exp_avg_sqs,
                                          const std::vector<std::optional<at::Tensor>>& model_params,
                                          int64_t chunk_size, int* grad_dtype, int* model_dtype) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  (exp_avg_sqs.empty() || exp_avg_sqs.size() == params.size()) &&
                  model_params.size() == params.size(),
              "multi-tensor step: tensor lists of different lengths");
  TORCH_CHECK(chunk_size > 0, "multi-tensor step: chunk_size must be > 0");
  at::Tensor meta = at::empty({7 * n + 1}, at::TensorOptions().dtype(at::kLong)).pin_memory();
  int64_t* m = meta.data_ptr<int64_t>();
  *grad_dtype = n ? dtype_code(grads[0]) : MEGAFAST_F32;
  *model_dtype = MEGAFAST_NONE;
  int64_t chunks = 0;
  auto check_state = [&](const at::Tensor& t, const at::Tensor& p, const char* what) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.numel() == p.numel() && t.device() == p.device(), what,
                " must be contiguous CUDA tensors like the parameters");
  };
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda() && p.is_contiguous() && p.scalar_type() == at::kFloat,
                "multi-tensor step: master parameters must be contiguous float32 CUDA tensors");
    check_state(grads[i], p, "gradients");
    TORCH_CHECK(dtype_code(grads[i]) == *grad_dtype, "multi-tensor step: gradients of mixed dtypes");
    check_state(exp_avgs[i], p, "exp_avg");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat, "exp_avg must be float32");
    m[i] = reinterpret_cast<int64_t>(p.data_ptr());
    m[n + i] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    m[2 * n + i] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
    m[3 * n + i] = 0;
    if (!exp_avg_sqs.empty()) {
      check_state(exp_avg_sqs[i], p, "exp_avg_sq");
      TORCH_CHECK(exp_avg_sqs[i].scalar_type() == at::kFloat, "exp_avg_sq must be float32");
      m[3 * n + i] = reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr());
    }
    m[4 * n + i] = 0;
    if (model_params[i].has_value()) {
      const at::Tensor& w = *model_params[i];
      check_state(w, p, "model parameters");
      const int code = dtype_code(w);
      TORCH_CHECK(code != MEGAFAST_F32, "model parameters written by the step must be bfloat16 or float16");
      TORCH_CHECK(*model_dtype == MEGAFAST_NONE || *model_dtype == code, "model parameters of mixed dtypes");
      *model_dtype = code;
      m[4 * n + i] = reinterpret_cast<int64_t>(w.data_ptr());
    }
    m[5 * n + i] = p.numel();
    m[6 * n + i] = chunks;
    chunks += (p.numel() + chunk_size - 1) / chunk_size;
  }
  m[7 * n] = chunks;
  if (n == 0) return {meta, 0};
  return {meta.to(params[0].device(), /*non_blocking=*/true), chunks};
}

void multi_tensor_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<std::optional<at::Tensor>>& model_params, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2_sqrt, double grad_scale, int64_t chunk_size, int64_t stream) {
  TORCH_CHECK(exp_avg_sqs.size() == params.size(), "multi_tensor_adamw: exp_avg_sqs needed for every parameter");
  int grad_dtype = 0, model_dtype = 0;
  auto [meta, chunks] =
      build_meta(params, grads, exp_avgs, exp_avg_sqs, model_params, chunk_size, &grad_dtype, &model_dtype);
  check_launch(megafast_multi_tensor_adamw(meta.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), chunks,
                                           chunk_size, grad_dtype, model_dtype, static_cast<float>(lr),
                                           static_cast<float>(beta1), static_cast<float>(beta2),
                                           static_cast<float>(eps), static_cast<float>(weight_decay),
                                           static_cast<float>(bias_correction1),
                                           static_cast<float>(bias_correction2_sqrt), static_cast<float>(grad_scale),
                                           as_stream(stream)),
               "multi_tensor_adamw");
}

void multi_tensor_lion(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avgs,
                       const std::vector<std::optional<at::Tensor>>& model_params, double lr, double beta1,
                       double beta2, double weight_decay, double grad_scale, int64_t chunk_size, int64_t stream) {
  int grad_dtype = 0, model_dtype = 0;
  auto [meta, chunks] = build_meta(params, grads, exp_avgs, {}, model_params, chunk_size, &grad_dtype, &model_dtype);
  check_launch(megafast_multi_tensor_lion(meta.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), chunks,
                                          chunk_size, grad_dtype, model_dtype, static_cast<float>(lr),
                                          static_cast<float>(beta1), static_cast<float>(beta2),
                                          static_cast<float>(weight_decay), static_cast<float>(grad_scale),
                                          as_stream(stream)),
               "multi_tensor_lion");
}

}  // namespace

void register_cuda_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rope", &rope, "RoPE (half-split) of x [s, b, h, d] with fp32 cos/sin [s, b, d]; backward=True: transpose",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("backward"), py::arg("stream"));
  m.def("multi_tensor_adamw", &multi_tensor_adamw,
        "In-place AdamW step over lists of fp32 masters/states, writing bf16/fp16 model params where given",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("model_params"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("bias_correction1"), py::arg("bias_correction2_sqrt"), py::arg("grad_scale"),
        py::arg("chunk_size"), py::arg("stream"));
  m.def("multi_tensor_lion", &multi_tensor_lion,
        "In-place Lion step over lists of fp32 masters/states, writing bf16/fp16 model params where given",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("model_params"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"), py::arg("grad_scale"), py::arg("chunk_size"),
        py::arg("stream"));
}
