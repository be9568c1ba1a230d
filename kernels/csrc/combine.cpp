// CPU implementation of mofast::combine: out[p] = sum_i w_i * grads[i, p], in one pass.
//
// Each thread takes blocks of P and keeps the block's running sum in a small fp32 buffer
// (fp64 when the gradients are fp64), adding one gradient row at a time, then writes the
// block once in out's dtype. Every gradient element is read once and every output element
// written once. `out` may alias a row of `grads`: an output element is written only after
// every row's value at that position has been read.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mofast {
namespace {

constexpr int64_t kBlock = 4096;

template <typename src_t, typename acc_t>
inline acc_t load(src_t v) {
  if constexpr (std::is_same_v<src_t, c10::BFloat16>) {
    return static_cast<acc_t>(bf16_to_float(v));
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename acc_t, typename dst_t>
inline dst_t store(acc_t v) {
  if constexpr (std::is_same_v<dst_t, c10::BFloat16>) {
    return float_to_bf16(static_cast<float>(v));
  } else {
    return static_cast<dst_t>(v);
  }
}

// Adds w * row to acc (or stores it, for the first row), converting the row on the fly.
template <typename grad_t, typename acc_t>
inline void accumulate_row(const grad_t* row, acc_t w, int64_t n, bool first, acc_t* acc,
                           float* tmp) {
  if constexpr (std::is_same_v<grad_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_to_float(row, tmp, n);
    if (first) {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) acc[p] = w * tmp[p];
    } else {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) acc[p] += w * tmp[p];
    }
  } else {
    if (first) {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) acc[p] = w * load<grad_t, acc_t>(row[p]);
    } else {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) acc[p] += w * load<grad_t, acc_t>(row[p]);
    }
  }
}

template <typename grad_t, typename out_t>
void combine_typed(const at::Tensor& grads, const std::vector<double>& weights,
                   const at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<grad_t, double>, double, float>;
  const int64_t k = grads.size(0);
  const int64_t P = grads.size(1);
  const int64_t row_stride = grads.stride(0);
  const grad_t* g = grads.const_data_ptr<grad_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  std::vector<acc_t> w(weights.begin(), weights.end());

  const int64_t nblocks = (P + kBlock - 1) / kBlock;
  const int nthreads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks)));

#pragma omp parallel num_threads(nthreads)
  {
    std::vector<acc_t> buf(static_cast<size_t>(kBlock));
    std::vector<float> tmp(static_cast<size_t>(kBlock));
    acc_t* acc = buf.data();

#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * kBlock;
      const int64_t n = std::min(kBlock, P - start);

      for (int64_t i = 0; i < k; ++i) {
        accumulate_row<grad_t, acc_t>(g + i * row_stride + start, w[i], n, i == 0, acc,
                                      tmp.data());
      }

      out_t* dst = o + start;
      if constexpr (std::is_same_v<out_t, c10::Half> && std::is_same_v<acc_t, float>) {
        float_to_half(acc, dst, n);
      } else {
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) dst[p] = store<acc_t, out_t>(acc[p]);
      }
    }
  }
}

template <typename grad_t>
void combine_out_dtype(const at::Tensor& grads, const std::vector<double>& w,
                       const at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat:
      return combine_typed<grad_t, float>(grads, w, out);
    case at::kDouble:
      return combine_typed<grad_t, double>(grads, w, out);
    case at::kHalf:
      return combine_typed<grad_t, c10::Half>(grads, w, out);
    default:
      return combine_typed<grad_t, c10::BFloat16>(grads, w, out);
  }
}

bool is_supported_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

void combine_cpu(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& out) {
  TORCH_CHECK(grads.device().is_cpu() && weights.device().is_cpu() && out.device().is_cpu(),
              "mofast::combine (CPU): grads, weights and out must all be CPU tensors, got ",
              grads.device(), ", ", weights.device(), " and ", out.device());
  TORCH_CHECK(grads.dim() == 2, "mofast::combine: grads must be 2-D [k, P], got shape ",
              grads.sizes());
  TORCH_CHECK(grads.size(0) >= 1, "mofast::combine: needs k >= 1 gradient rows");
  TORCH_CHECK(grads.size(1) <= 1 || grads.stride(1) == 1,
              "mofast::combine: grads must have unit column stride (rows may be strided), "
              "got strides ",
              grads.strides());
  TORCH_CHECK(is_supported_float(grads.scalar_type()), "mofast::combine: grads has dtype ",
              grads.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == grads.size(0),
              "mofast::combine: weights must have shape [k] = [", grads.size(0), "], got ",
              weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()),
              "mofast::combine: weights must be floating point, got ", weights.scalar_type());
  TORCH_CHECK(out.dim() == 1 && out.size(0) == grads.size(1),
              "mofast::combine: out must have shape [P] = [", grads.size(1), "], got ",
              out.sizes());
  TORCH_CHECK(out.size(0) <= 1 || out.stride(0) == 1,
              "mofast::combine: out must be contiguous, got stride ", out.stride(0));
  TORCH_CHECK(is_supported_float(out.scalar_type()), "mofast::combine: out has dtype ",
              out.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
  // Blocks are written as soon as they are summed: an out that only partly covers a row
  // would overwrite gradients that a later block still reads.
  for (int64_t i = 0; i < grads.size(0); ++i) {
    TORCH_CHECK(at::get_overlap_status(out, grads.select(0, i)) != at::MemOverlapStatus::Partial,
                "mofast::combine: out overlaps gradient row ", i,
                " without being that row; it must be exactly one row of grads or apart from them");
  }

  // k is small; reading the weights here costs nothing on the CPU, where there is no
  // device to wait for.
  const at::Tensor wd = weights.to(at::kDouble).contiguous();
  const double* wp = wd.const_data_ptr<double>();
  std::vector<double> w(wp, wp + wd.numel());

  switch (grads.scalar_type()) {
    case at::kFloat:
      return combine_out_dtype<float>(grads, w, out);
    case at::kDouble:
      return combine_out_dtype<double>(grads, w, out);
    case at::kHalf:
      return combine_out_dtype<c10::Half>(grads, w, out);
    default:
      return combine_out_dtype<c10::BFloat16>(grads, w, out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mofast, CPU, m) { m.impl("combine", &combine_cpu); }

}  // namespace mofast
