// CPU implementation of mofast::gram: the k x k Gram matrix of k gradient rows, summed
// over any number of [k, P_j] shards, in one pass over memory.
//
// Each thread takes blocks of P. A block of the k rows is small enough to stay in cache,
// so the k(k+1)/2 dot products of the block read it from cache and every element is read
// from memory once. Products inside a block are summed in fp32 (a few thousand terms, so
// the rounding stays near fp32's epsilon); block results go into per-thread float64
// accumulators, so the error does not grow with P. A plain fp32 GEMM over P = 20M was
// measured losing 0.6% on the diagonal. fp64 input is multiplied in fp64 throughout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "convert.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mofast {
namespace {

// The block buffer holds k rows of this many fp32 values, at most: it should sit in L1/L2.
constexpr int64_t kBufferElems = 8192;
constexpr int64_t kMinBlock = 256;
constexpr int64_t kMaxBlock = 4096;
// Pad each thread's accumulators to a cache line of doubles so threads do not share one.
constexpr int64_t kLineDoubles = 8;

struct Block {
  int64_t shard;
  int64_t start;
  int64_t len;
};

// Converts n values of one row to the compute type; fp32 and fp64 rows need no copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) buf[p] = bf16_to_float(src[p]);
    return buf;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_to_float(src, buf, n);
    return buf;
  } else {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) buf[p] = static_cast<acc_t>(src[p]);
    return buf;
  }
}

// Adds the k(k+1)/2 products of one block of rows to `acc` (upper triangle, row major).
// Four columns at a time so each value of row i is loaded once per four products.
template <typename acc_t>
void block_products(const acc_t* const* rows, int64_t k, int64_t n, double* acc) {
  int64_t pair = 0;
  for (int64_t i = 0; i < k; ++i) {
    const acc_t* a = rows[i];
    int64_t j = i;

    for (; j + 4 <= k; j += 4) {
      const acc_t* b0 = rows[j];
      const acc_t* b1 = rows[j + 1];
      const acc_t* b2 = rows[j + 2];
      const acc_t* b3 = rows[j + 3];
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t p = 0; p < n; ++p) {
        s0 += a[p] * b0[p];
        s1 += a[p] * b1[p];
        s2 += a[p] * b2[p];
        s3 += a[p] * b3[p];
      }
      acc[pair] += s0;
      acc[pair + 1] += s1;
      acc[pair + 2] += s2;
      acc[pair + 3] += s3;
      pair += 4;
    }

    for (; j < k; ++j) {
      const acc_t* b = rows[j];
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < n; ++p) s += a[p] * b[p];
      acc[pair] += s;
      pair += 1;
    }
  }
}

template <typename scalar_t>
void shard_block(const at::Tensor& shard, const Block& blk, int64_t k, double* acc,
                 float* fbuf, std::vector<const float*>& frows,
                 std::vector<const double*>& drows) {
  const scalar_t* base = shard.const_data_ptr<scalar_t>();
  const int64_t row_stride = shard.stride(0);

  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < k; ++i) drows[i] = base + i * row_stride + blk.start;
    block_products<double>(drows.data(), k, blk.len, acc);
  } else {
    for (int64_t i = 0; i < k; ++i) {
      const scalar_t* src = base + i * row_stride + blk.start;
      frows[i] = row_block<scalar_t, float>(src, blk.len, fbuf + i * blk.len);
    }
    block_products<float>(frows.data(), k, blk.len, acc);
  }
}

void check_shards(const std::vector<at::Tensor>& shards, int64_t& k) {
  TORCH_CHECK(!shards.empty(), "mofast::gram: needs at least one [k, P] shard, got none");
  k = -1;
  for (size_t s = 0; s < shards.size(); ++s) {
    const at::Tensor& t = shards[s];
    TORCH_CHECK(t.device().is_cpu(), "mofast::gram (CPU): shard ", s, " is on ", t.device());
    TORCH_CHECK(t.dim() == 2, "mofast::gram: shard ", s, " must be 2-D [k, P], got shape ",
                t.sizes());
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                "mofast::gram: shard ", s, " has dtype ", dt,
                "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "mofast::gram: shard ", s,
                " must have unit column stride (rows may be strided), got strides ",
                t.strides());
    if (k < 0) k = t.size(0);
    TORCH_CHECK(t.size(0) == k, "mofast::gram: all shards need the same k; shard 0 has ", k,
                " rows, shard ", s, " has ", t.size(0));
  }
  TORCH_CHECK(k >= 1, "mofast::gram: needs k >= 1 gradient rows, got ", k);
}

at::Tensor gram_cpu(at::TensorList shard_list) {
  std::vector<at::Tensor> shards(shard_list.begin(), shard_list.end());
  int64_t k = 0;
  check_shards(shards, k);

  const int64_t block = std::clamp<int64_t>((kBufferElems / k) / 64 * 64, kMinBlock, kMaxBlock);
  std::vector<Block> blocks;
  for (size_t s = 0; s < shards.size(); ++s) {
    const int64_t P = shards[s].size(1);
    for (int64_t start = 0; start < P; start += block) {
      blocks.push_back({static_cast<int64_t>(s), start, std::min(block, P - start)});
    }
  }

  const int64_t pairs = k * (k + 1) / 2;
  const int64_t padded = (pairs + kLineDoubles - 1) / kLineDoubles * kLineDoubles;
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  const int nthreads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks)));
  std::vector<double> partial(static_cast<size_t>(nthreads * padded), 0.0);

#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    double* acc = partial.data() + tid * padded;
    std::vector<float> fbuf(static_cast<size_t>(k * block));
    std::vector<const float*> frows(static_cast<size_t>(k));
    std::vector<const double*> drows(static_cast<size_t>(k));

#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const Block& blk = blocks[b];
      const at::Tensor& shard = shards[blk.shard];
      switch (shard.scalar_type()) {
        case at::kFloat:
          shard_block<float>(shard, blk, k, acc, fbuf.data(), frows, drows);
          break;
        case at::kDouble:
          shard_block<double>(shard, blk, k, acc, fbuf.data(), frows, drows);
          break;
        case at::kHalf:
          shard_block<c10::Half>(shard, blk, k, acc, fbuf.data(), frows, drows);
          break;
        default:
          shard_block<c10::BFloat16>(shard, blk, k, acc, fbuf.data(), frows, drows);
          break;
      }
    }
  }

  // Threads are summed in a fixed order, so the result depends only on the thread count.
  std::vector<double> total(static_cast<size_t>(pairs), 0.0);
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t q = 0; q < pairs; ++q) total[q] += partial[t * padded + q];
  }

  at::Tensor out = at::empty({k, k}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  int64_t pair = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j) {
      const float v = static_cast<float>(total[pair++]);
      o[i * k + j] = v;
      o[j * k + i] = v;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mofast, CPU, m) { m.impl("gram", &gram_cpu); }

}  // namespace mofast
