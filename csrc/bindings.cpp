// The only PYBIND11_MODULE of megafast: everything in megafast._C is registered here.
#include <pybind11/pybind11.h>

#include "dataset_helpers.h"

#ifdef MEGAFAST_WITH_CUDA
void register_cuda_ops(pybind11::module_& m);  // csrc/cuda_ops.cpp
#endif

namespace py = pybind11;

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
#ifdef MEGAFAST_WITH_CUDA
  register_cuda_ops(m);
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
