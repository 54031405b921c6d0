// Micro-batch planner: groups variable-length sequences into low-padding micro-batches and builds
// the flat index arrays (position ids, supervised rows, parrot splice rows) that one micro-batch
// needs. The Python wrapper lives in sande_fast/planner.py; it converts inputs to
// contiguous int64 arrays, while every per-element check is done here in a single pass, so the
// error can name the offending sequence. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Returns the data pointer of a 1-D int64 array after checking its rank and, when expected >= 0,
// its length.
const int64_t* vec_ptr(const I64Array& a, const char* name, py::ssize_t expected) {
    if (a.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be 1-D, got " +
                                    std::to_string(a.ndim()) + " dimensions");
    }
    if (expected >= 0 && a.shape(0) != expected) {
        throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.shape(0)) +
                                    " entries, expected " + std::to_string(expected));
    }
    return a.data();
}

std::string at(const char* name, int64_t i) {
    return std::string(name) + "[" + std::to_string(i) + "]";
}

// Sorts by length (descending, stable) and fills batches greedily. The running batch's maximum
// is its first member because of the sort, so the budget test is O(1) per sequence.
// Returns the sorted order and the batch boundaries (bounds[k] .. bounds[k+1] in `order`).
void greedy_plan(const int64_t* len, int64_t n, int64_t token_budget, int64_t max_batch,
                 double max_waste, std::vector<int64_t>& order, std::vector<int64_t>& bounds) {
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [len](int64_t a, int64_t b) { return len[a] > len[b]; });
    bounds.clear();
    if (n == 0) {
        bounds.push_back(0);
        return;
    }
    bounds.push_back(0);
    int64_t start = 0;    // position in `order` where the running batch starts
    int64_t max_len = len[order[0]];
    double real_rows = static_cast<double>(max_len);  // sum of lengths in the running batch
    for (int64_t k = 1; k < n; ++k) {
        const int64_t size = k - start + 1;  // batch size if order[k] joins
        // size * max_len <= budget, written as a division so huge lengths cannot overflow.
        // max_len == 0 cannot happen (lengths are validated >= 1) but keep the guard cheap.
        const bool fits_budget = max_len == 0 || size <= token_budget / max_len;
        // Padding share if order[k] joins: a short sequence joining long ones costs more padded
        // rows than a smaller matrix multiply loses, so cap it (in double: no overflow).
        const double padded = static_cast<double>(size) * static_cast<double>(max_len);
        const double with_k = real_rows + static_cast<double>(len[order[k]]);
        const bool fits_waste = (padded - with_k) <= max_waste * padded;
        if (size > max_batch || !fits_budget || !fits_waste) {
            bounds.push_back(k);
            start = k;
            max_len = len[order[k]];
            real_rows = static_cast<double>(max_len);
        } else {
            real_rows = with_k;
        }
    }
    bounds.push_back(n);
}

py::list plan_buckets(const I64Array& lengths, int64_t token_budget, int64_t max_batch,
                      double max_waste) {
    if (!(max_waste >= 0.0 && max_waste <= 1.0)) {
        throw std::invalid_argument("max_waste must lie in [0, 1], got " +
                                    std::to_string(max_waste));
    }
    if (token_budget < 1) {
        throw std::invalid_argument("token_budget must be >= 1, got " +
                                    std::to_string(token_budget));
    }
    if (max_batch < 1) {
        throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(max_batch));
    }
    const int64_t* len = vec_ptr(lengths, "lengths", -1);
    const int64_t n = static_cast<int64_t>(lengths.shape(0));
    for (int64_t i = 0; i < n; ++i) {
        if (len[i] < 1) {
            throw std::invalid_argument(at("lengths", i) + " must be >= 1, got " +
                                        std::to_string(len[i]));
        }
    }
    std::vector<int64_t> order;
    std::vector<int64_t> bounds;
    {
        py::gil_scoped_release release;
        greedy_plan(len, n, token_budget, max_batch, max_waste, order, bounds);
    }
    py::list out;
    for (size_t k = 0; k + 1 < bounds.size(); ++k) {
        const int64_t b0 = bounds[k];
        const int64_t size = bounds[k + 1] - b0;
        py::array_t<int64_t> batch(size);
        std::memcpy(batch.mutable_data(), order.data() + b0,
                    static_cast<size_t>(size) * sizeof(int64_t));
        out.append(std::move(batch));
    }
    return out;
}

py::tuple layout(const I64Array& lengths, const I64Array& splice, int64_t n_parrot,
                 const I64Array& sup_start, const I64Array& sup_len, int64_t padded_len) {
    if (n_parrot < 0) {
        throw std::invalid_argument("n_parrot must be >= 0, got " + std::to_string(n_parrot));
    }
    if (padded_len < 0) {
        throw std::invalid_argument("padded_len must be >= 0 (0 = packed), got " +
                                    std::to_string(padded_len));
    }
    const int64_t* len = vec_ptr(lengths, "lengths", -1);
    const py::ssize_t n_seq = lengths.shape(0);
    const int64_t* spl = vec_ptr(splice, "splice", n_seq);
    const int64_t* s0 = vec_ptr(sup_start, "sup_start", n_seq);
    const int64_t* sl = vec_ptr(sup_len, "sup_len", n_seq);
    const int64_t B = static_cast<int64_t>(n_seq);
    const bool padded = padded_len > 0;
    constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

    // Pass 1 (no Python objects touched): validate every sequence and size the outputs.
    int64_t total_rows = 0;
    int64_t n_sup = 0;
    int64_t n_splice = 0;
    {
        py::gil_scoped_release release;
        for (int64_t b = 0; b < B; ++b) {
            const int64_t L = len[b];
            if (L < 1) {
                throw std::invalid_argument(at("lengths", b) + " must be >= 1, got " +
                                            std::to_string(L));
            }
            if (padded && L > padded_len) {
                throw std::invalid_argument(at("lengths", b) + " = " + std::to_string(L) +
                                            " exceeds padded_len = " +
                                            std::to_string(padded_len));
            }
            if (spl[b] < -1) {
                throw std::invalid_argument(at("splice", b) +
                                            " must be -1 (no parrot) or >= 0, got " +
                                            std::to_string(spl[b]));
            }
            if (spl[b] >= 0) {
                // A splice with an empty parrot would name a row one past the sequence.
                if (n_parrot < 1) {
                    throw std::invalid_argument(at("splice", b) +
                                                " >= 0 needs n_parrot >= 1, got n_parrot = " +
                                                std::to_string(n_parrot));
                }
                if (spl[b] > L - n_parrot) {
                    throw std::invalid_argument(
                        at("splice", b) + " + n_parrot = " + std::to_string(spl[b]) + " + " +
                        std::to_string(n_parrot) + " exceeds " + at("lengths", b) + " = " +
                        std::to_string(L));
                }
                ++n_splice;
            }
            if (s0[b] < 0) {
                throw std::invalid_argument(at("sup_start", b) + " must be >= 0, got " +
                                            std::to_string(s0[b]));
            }
            if (sl[b] < 0) {
                throw std::invalid_argument(at("sup_len", b) + " must be >= 0, got " +
                                            std::to_string(sl[b]));
            }
            if (sl[b] > L - s0[b]) {
                throw std::invalid_argument(at("sup_start", b) + " + " + at("sup_len", b) +
                                            " = " + std::to_string(s0[b]) + " + " +
                                            std::to_string(sl[b]) + " exceeds " +
                                            at("lengths", b) + " = " + std::to_string(L));
            }
            n_sup += sl[b];
            // Bounded by int32 at every step (far beyond any micro-batch), so the sum cannot
            // overflow.
            total_rows += padded ? padded_len : L;
            if (total_rows > kInt32Max) {
                throw std::invalid_argument("total rows exceed the int32 range (" +
                                            std::to_string(kInt32Max) + ")");
            }
        }
    }

    py::array_t<int64_t> pos(total_rows);
    py::array_t<int64_t> sup_rows(n_sup);
    py::array_t<int64_t> spl_rows(n_splice);
    int64_t* pos_p = pos.mutable_data();
    int64_t* sup_p = sup_rows.mutable_data();
    int64_t* spl_p = spl_rows.mutable_data();

    // Pass 2: fill. Padding rows get position 0, hence the memset in padded mode.
    {
        py::gil_scoped_release release;
        if (padded && total_rows > 0) {
            std::memset(pos_p, 0, static_cast<size_t>(total_rows) * sizeof(int64_t));
        }
        int64_t off = 0;
        for (int64_t b = 0; b < B; ++b) {
            const int64_t L = len[b];
            int64_t* p = pos_p + off;
            for (int64_t t = 0; t < L; ++t) p[t] = t;
            const int64_t first = off + s0[b];
            for (int64_t t = 0; t < sl[b]; ++t) *sup_p++ = first + t;
            if (spl[b] >= 0) *spl_p++ = off + spl[b];
            off += padded ? padded_len : L;
        }
    }
    return py::make_tuple(pos, sup_rows, spl_rows);
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
    m.doc() = "C++ micro-batch planner for sande_fast (see sande_fast/planner.py).";
    m.def("plan_buckets", &plan_buckets, py::arg("lengths"), py::arg("token_budget"),
          py::arg("max_batch"), py::arg("max_waste") = 1.0,
          "Greedy length-sorted bucketing; returns a list of int64 index arrays.");
    m.def("layout", &layout, py::arg("lengths"), py::arg("splice"), py::arg("n_parrot"),
          py::arg("sup_start"), py::arg("sup_len"), py::arg("padded_len"),
          "Flat layout of one micro-batch: (position_ids, supervised_rows, splice_rows).");
}
