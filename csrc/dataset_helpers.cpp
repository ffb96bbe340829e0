#include "dataset_helpers.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <stdexcept>
#include <vector>

namespace megafast {

template <typename T>
py::array_t<T> build_sample_idx(const py::array_t<int32_t, py::array::c_style>& sizes,
                                const py::array_t<int32_t, py::array::c_style>& document_index,
                                int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                bool drop_last_partial_sequence, int32_t add_extra_token) {
  // Megatron asserts seq_length > 1 and tokens_per_epoch > 1, but its extension is compiled with
  // NDEBUG, so seq_length == 1 and a one-token epoch work there; accept them the same way.
  if (seq_length < 1) throw std::invalid_argument("build_sample_idx: seq_length must be >= 1");
  if (num_epochs <= 0) throw std::invalid_argument("build_sample_idx: num_epochs must be > 0");
  if (tokens_per_epoch < 1)
    throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be >= 1");
  if (add_extra_token != 0 && add_extra_token != 1)
    throw std::invalid_argument("build_sample_idx: add_extra_token must be 0 or 1");
  if (sizes.ndim() != 1 || document_index.ndim() != 1 || document_index.shape(0) == 0)
    throw std::invalid_argument("build_sample_idx: sizes and document_index must be non-empty 1-D arrays");

  // Samples that fit in the token stream; each needs seq_length new tokens plus the shared extra one.
  const int64_t usable = int64_t(num_epochs) * tokens_per_epoch - add_extra_token;
  const int64_t num_samples = drop_last_partial_sequence
                                  ? usable / seq_length
                                  : int64_t(std::ceil(float(usable) / float(seq_length)));

  py::array_t<T> out({num_samples + 1, int64_t(2)});
  T* idx = out.mutable_data();
  const int32_t* size = sizes.data();
  const int32_t* doc = document_index.data();
  const int64_t num_docs = document_index.shape(0);
  const int64_t num_sizes = sizes.shape(0);
  for (int64_t i = 0; i < num_docs; ++i)
    if (doc[i] < 0 || doc[i] >= num_sizes)
      throw std::invalid_argument("build_sample_idx: document_index holds an id outside sizes");

  {
    py::gil_scoped_release release;
    int64_t pos = 0;    // position in document_index
    int64_t offset = 0; // token offset inside document doc[pos]
    idx[0] = T(pos);
    idx[1] = T(offset);
    for (int64_t s = 1; s <= num_samples; ++s) {
      // Walk forward until seq_length + extra tokens are covered; the sample's last token is the
      // next sample's first, hence the "- add_extra_token" when we stop inside a document.
      int64_t remaining = int64_t(seq_length) + add_extra_token;
      while (remaining != 0) {
        const int64_t left_in_doc = int64_t(size[doc[pos]]) - offset;
        remaining -= left_in_doc;
        if (remaining <= 0) {
          offset += remaining + left_in_doc - add_extra_token;
          remaining = 0;
        } else if (pos == num_docs - 1) {
          // Ran out of documents: only possible for the last, partial sample.
          offset = int64_t(size[doc[pos]]) - add_extra_token;
          break;
        } else {
          ++pos;
          offset = 0;
        }
      }
      idx[2 * s] = T(pos);
      idx[2 * s + 1] = T(offset);
    }
  }
  return out;
}

void build_blending_indices(py::array_t<int16_t, py::array::c_style>& dataset_index,
                            py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                            const py::array_t<double, py::array::c_style>& weights, int32_t num_datasets,
                            int64_t size, bool verbose) {
  if (num_datasets <= 0 || weights.ndim() != 1 || weights.shape(0) != num_datasets)
    throw std::invalid_argument("build_blending_indices: weights must be 1-D with num_datasets entries");
  if (dataset_index.ndim() != 1 || dataset_sample_index.ndim() != 1 || dataset_index.shape(0) < size ||
      dataset_sample_index.shape(0) < size)
    throw std::invalid_argument("build_blending_indices: output arrays are shorter than size");

  int16_t* which = dataset_index.mutable_data();
  int64_t* nth = dataset_sample_index.mutable_data();
  const double* w = weights.data();
  std::vector<int64_t> taken(num_datasets, 0);
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < size; ++i) {
      // The dataset furthest behind its target share takes sample i (first one wins ties).
      const double target = std::max(double(i), 1.0);
      int32_t best = 0;
      double best_error = w[0] * target - double(taken[0]);
      for (int32_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * target - double(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[i] = int16_t(best);
      nth[i] = taken[best]++;
    }
  }
  if (verbose) {
    for (int32_t d = 0; d < num_datasets; ++d)
      std::cout << "  dataset " << d << ": weight " << w[d] << ", achieved "
                << (size > 0 ? double(taken[d]) / double(size) : 0.0) << std::endl;
  }
}

template py::array_t<int32_t> build_sample_idx<int32_t>(const py::array_t<int32_t, py::array::c_style>&,
                                                        const py::array_t<int32_t, py::array::c_style>&,
                                                        int32_t, int32_t, int64_t, bool, int32_t);
template py::array_t<int64_t> build_sample_idx<int64_t>(const py::array_t<int32_t, py::array::c_style>&,
                                                        const py::array_t<int32_t, py::array::c_style>&,
                                                        int32_t, int32_t, int64_t, bool, int32_t);

}  // namespace megafast
