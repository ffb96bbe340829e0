// Hot loops of the data path, with Megatron-LM's semantics (see DESIGN.md, "GPT dataset semantics").
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace megafast {

namespace py = pybind11;

// Rows (position in document_index, token offset in that document) marking where each sample of
// `seq_length + extra` tokens starts; consecutive samples share `extra` tokens. Shape (N + 1, 2).
template <typename T>
py::array_t<T> build_sample_idx(const py::array_t<int32_t, py::array::c_style>& sizes,
                                const py::array_t<int32_t, py::array::c_style>& document_index,
                                int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                bool drop_last_partial_sequence, int32_t add_extra_token);

// Greedy blending: sample i goes to the dataset with the largest weight * max(i, 1) - count.
void build_blending_indices(py::array_t<int16_t, py::array::c_style>& dataset_index,
                            py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                            const py::array_t<double, py::array::c_style>& weights, int32_t num_datasets,
                            int64_t size, bool verbose);

}  // namespace megafast
