// The only PYBIND11_MODULE of megafast: everything in megafast._C is registered here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cpu_adamw.h"
#include "dataset_helpers.h"

#ifdef MEGAFAST_WITH_CUDA
void register_cuda_ops(pybind11::module_& m);  // csrc/cuda_ops.cpp
#endif

namespace py = pybind11;

namespace {

// Tensors arrive as data pointers from Python (torch.Tensor.data_ptr()): the CPU build does not
// link against torch. megafast.training.cpu_adamw checks dtype (fp32), device (CPU) and contiguity.
void adamw_cpu_pass(bool update, const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
                    const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
                    const std::vector<uintptr_t>& denoms, const std::vector<int64_t>& numels,
                    const std::vector<double>& step_sizes, const std::vector<double>& bias_correction2_sqrts,
                    double grad_scale, double decay, double lerp_weight, double beta2, double one_minus_beta2,
                    double eps, int num_threads) {
  const size_t n = numels.size();
  for (size_t size : {params.size(), grads.size(), exp_avgs.size(), exp_avg_sqs.size(), denoms.size(),
                      step_sizes.size(), bias_correction2_sqrts.size()}) {
    if (size != n) throw std::invalid_argument("adamw_cpu: every list needs one entry per parameter");
  }
  std::vector<megafast::AdamWTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = {reinterpret_cast<float*>(params[i]), reinterpret_cast<const float*>(grads[i]),
                  reinterpret_cast<float*>(exp_avgs[i]), reinterpret_cast<float*>(exp_avg_sqs[i]),
                  reinterpret_cast<float*>(denoms[i]), numels[i], static_cast<float>(step_sizes[i]),
                  static_cast<float>(bias_correction2_sqrts[i])};
  }
  const megafast::AdamWScalars s{static_cast<float>(grad_scale), static_cast<float>(decay),
                                 static_cast<float>(lerp_weight), static_cast<float>(beta2),
                                 static_cast<float>(one_minus_beta2), static_cast<float>(eps)};
  py::gil_scoped_release release;
  if (update) {
    megafast::adamw_update(tensors, s, num_threads);
  } else {
    megafast::adamw_moments(tensors, s, num_threads);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megafast C++/CUDA extension";
  const char* sample_doc =
      "build_sample_idx(sizes: int32[D], document_index: int32[K], seq_length, num_epochs, "
      "tokens_per_epoch, drop_last_partial_sequence=True, add_extra_token=1) -> (N+1, 2) array of "
      "(position in document_index, offset in document) per sample start, as Megatron-LM builds it.";
  m.def("build_sample_idx_int32", &megafast::build_sample_idx<int32_t>, sample_doc, py::arg("sizes"),
        py::arg("document_index"), py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token") = 1);
  m.def("build_sample_idx_int64", &megafast::build_sample_idx<int64_t>, sample_doc, py::arg("sizes"),
        py::arg("document_index"), py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token") = 1);
  m.def("build_blending_indices", &megafast::build_blending_indices,
        "Fill dataset_index (int16[size]) and dataset_sample_index (int64[size]) greedily so each "
        "dataset's share follows weights (float64[num_datasets]), as Megatron-LM does.",
        py::arg("dataset_index"), py::arg("dataset_sample_index"), py::arg("weights"),
        py::arg("num_datasets"), py::arg("size"), py::arg("verbose") = false);
  m.def("adamw_cpu_pass", &adamw_cpu_pass,
        "One pass of the fused CPU AdamW step, in place, over contiguous fp32 tensors given as data "
        "pointers (csrc/cpu_adamw.cpp): update=False updates exp_avg/exp_avg_sq from the gradients, "
        "update=True the parameters from denoms = sqrt(exp_avg_sq). Scalars are cast to fp32 as torch "
        "casts them.",
        py::arg("update"), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("denoms"), py::arg("numels"), py::arg("step_sizes"), py::arg("bias_correction2_sqrts"),
        py::arg("grad_scale"), py::arg("decay"), py::arg("lerp_weight"), py::arg("beta2"),
        py::arg("one_minus_beta2"), py::arg("eps"), py::arg("num_threads"));
#ifdef MEGAFAST_WITH_CUDA
  register_cuda_ops(m);
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
