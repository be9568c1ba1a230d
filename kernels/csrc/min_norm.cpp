// CPU implementation of mofast::min_norm: for each k x k Gram matrix G of a batch, the
// weights c on the simplex that minimise c^T G c (the min-norm point of the convex hull of
// the gradients behind G).
//
// Every problem is solved in float64 on a copy of G that is symmetrised and divided by
// its largest diagonal entry, so the weights do not depend on the gradients' scale.
// Special problems have fixed answers: k = 1 gives [1]; an all-zero G (every gradient
// zero, so every c is optimal) gives the uniform weights; a G with an inf or NaN gives
// all-NaN weights, so the caller can skip the step without reading the weights back.
//
// Two methods share one start, the best solution over all pairs of gradients:
//   frank-wolfe  the published recipe: steps towards the vertex e_t with t = argmin (G c)_t,
//                exact line search, stop once the L1 change of c falls below tol.
//   exact        Wolfe's min-norm-point algorithm (an active-set method over the support
//                of c): each step is the affine min-norm point of the support, solved by a
//                Cholesky factorisation of the support's Gram matrix taken relative to one
//                of its points. A new point that lies (to working precision) in the
//                affine hull of the support cannot lower the objective, which is also what
//                keeps the factorisation well conditioned when G is rank-deficient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace mofast {
namespace {

// A new point joins the support only if its squared distance to the support's affine hull
// exceeds this fraction of its squared distance to the reference point: below it the
// factorisation would carry no correct digits and the objective could not improve.
constexpr double kPivotRelTol = 1e-12;
// The exact method stops when the duality gap c^T G c - min_t (G c)_t is this small
// relative to the largest squared norm involved: the rounding error of (G c) itself.
constexpr double kGapRelTol = 1e-14;
// Problems per thread at least (~0.5 ms of work at k = 8): a small batch, the trainer's
// single problem above all, stays on the calling thread, where a parallel region on a
// loaded machine can cost milliseconds of waiting for a core.
constexpr int64_t kGrainProblems = 512;

enum class Method { kFrankWolfe, kExact };

// Weight of the first point at the min-norm point of the segment between two points with
// squared norms a and d and inner product b (SPEC section 2's closed form).
inline double two_point_weight(double a, double b, double d) {
  if (b >= a) return 1.0;
  if (b >= d) return 0.0;
  return std::clamp((d - b) / (a + d - 2.0 * b), 0.0, 1.0);
}

// Buffers of one thread, sized once per chunk of problems.
struct Workspace {
  explicit Workspace(int64_t k)
      : g(k * k), c(k), gc(k), w(k), saved_c(k), chol(k * k), inv_pivot(k), rhs(k),
        support(k), saved_support(k), in_support(k) {}

  std::vector<double> g;        // [k, k] normalised, symmetrised Gram matrix
  std::vector<double> c;        // [k] current weights
  std::vector<double> gc;       // [k] G c
  std::vector<double> w;        // [k] affine min-norm weights of the support
  std::vector<double> saved_c;  // [k] weights before the current major cycle
  std::vector<double> chol;     // [k, k] Cholesky factor of the support's relative Gram
  std::vector<double> inv_pivot;  // [k] 1 / its diagonal: multiplying is cheaper than dividing
  std::vector<double> rhs;      // [k] right-hand side, then solution, of the affine system
  std::vector<int64_t> support;        // indices with c > 0, in the order they joined
  std::vector<int64_t> saved_support;  // support before the current major cycle
  std::vector<char> in_support;        // [k] membership flags of `support`
};

struct Outcome {
  int32_t iterations;
  bool converged;
};

// Copies problem `src` into ws.g as (G + G^T) / (2 max_i G_ii) (or over the largest entry
// of an indefinite G, when it lies off the diagonal). Returns the largest diagonal entry,
// or NaN when an entry is not finite.
template <typename scalar_t>
double load_normalised(const scalar_t* src, int64_t k, Workspace& ws) {
  double scale = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < k * k; ++i) {
    const double v = static_cast<double>(src[i]);
    finite = finite && std::isfinite(v);
  }
  if (!finite) return std::numeric_limits<double>::quiet_NaN();
  for (int64_t i = 0; i < k; ++i) scale = std::max(scale, static_cast<double>(src[i * k + i]));
  if (!(scale > 0.0)) return scale;

  // The divisor is the largest diagonal entry, or a larger |entry| of (G + G^T) / 2: that
  // only happens for an indefinite G, whose quotients would otherwise overflow to inf.
  // Halving before adding keeps that sum finite for entries near the largest double.
  double divisor = scale;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j) {
      const double half_sum = 0.5 * static_cast<double>(src[i * k + j]) +
                              0.5 * static_cast<double>(src[j * k + i]);
      divisor = std::max(divisor, std::abs(half_sum));
    }
  }

  // A division, not a product with the reciprocal: rounded once, it keeps entries that
  // differ by one unit apart (a = d = b + 1 ulp stays a symmetric problem, whose weights
  // are 1/2 each), and a subnormal divisor needs no special case. A symmetric pair is
  // taken as it is; an asymmetric one is averaged as quotients, which lie near [-1, 1],
  // where halves are exact (halves of subnormal entries round: 1.5 tiny becomes 2 tiny).
  // Only an antisymmetric part that dwarfs the divisor overflows the quotients: that pair
  // is averaged first.
  for (int64_t i = 0; i < k; ++i) {
    ws.g[i * k + i] = static_cast<double>(src[i * k + i]) / divisor;
    for (int64_t j = i + 1; j < k; ++j) {
      const double x = static_cast<double>(src[i * k + j]);
      const double y = static_cast<double>(src[j * k + i]);
      const double qx = x / divisor;
      const double qy = y / divisor;
      double sym = qx;
      if (x != y) {
        sym = std::isfinite(qx) && std::isfinite(qy) ? 0.5 * qx + 0.5 * qy
                                                     : (0.5 * x + 0.5 * y) / divisor;
      }
      ws.g[i * k + j] = sym;
      ws.g[j * k + i] = sym;
    }
  }
  return scale;
}

// c <- the best two-point solution over all pairs (i < j); the first pair wins ties.
// Also sets G c.
void best_pair(int64_t k, Workspace& ws) {
  const double* g = ws.g.data();
  double best = std::numeric_limits<double>::infinity();
  int64_t bi = 0, bj = 1;
  double bw = 1.0;
  for (int64_t i = 0; i < k; ++i) {
    const double a = g[i * k + i];
    for (int64_t j = i + 1; j < k; ++j) {
      const double b = g[i * k + j];
      const double d = g[j * k + j];
      const double wi = two_point_weight(a, b, d);
      const double wj = 1.0 - wi;
      const double value = wi * wi * a + 2.0 * wi * wj * b + wj * wj * d;
      if (value < best) {
        best = value;
        bi = i;
        bj = j;
        bw = wi;
      }
    }
  }

  std::fill(ws.c.begin(), ws.c.end(), 0.0);
  ws.c[bi] = bw;
  ws.c[bj] = 1.0 - bw;
  for (int64_t t = 0; t < k; ++t) ws.gc[t] = bw * g[t * k + bi] + (1.0 - bw) * g[t * k + bj];
}

inline int64_t argmin(const double* x, int64_t k) {
  int64_t best = 0;
  for (int64_t t = 1; t < k; ++t) {
    if (x[t] < x[best]) best = t;
  }
  return best;
}

inline double dot(const double* x, const double* y, int64_t k) {
  double s = 0.0;
  for (int64_t t = 0; t < k; ++t) s += x[t] * y[t];
  return s;
}

Outcome frank_wolfe(int64_t k, int64_t max_iters, double tol, Workspace& ws) {
  const double* g = ws.g.data();
  double* c = ws.c.data();
  double* gc = ws.gc.data();
  double value = dot(c, gc, k);

  for (int64_t it = 0; it < max_iters; ++it) {
    const int64_t t = argmin(gc, k);
    const double keep = two_point_weight(value, gc[t], g[t * k + t]);
    const double step = 1.0 - keep;

    double change = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const double next = keep * c[i] + (i == t ? step : 0.0);
      change += std::abs(next - c[i]);
      c[i] = next;
      gc[i] = keep * gc[i] + step * g[i * k + t];
    }
    value = dot(c, gc, k);

    if (change < tol) return {static_cast<int32_t>(it + 1), true};
  }
  return {static_cast<int32_t>(max_iters), false};
}

// The affine min-norm point of the support: weights w (summing to 1, any sign) minimising
// w^T G_SS w. With r = support[0] and x = p_r + sum_a mu_a (p_a - p_r), the normal
// equations read A mu = b with A_ab = <p_a - p_r, p_b - p_r> and b_a = <p_r, p_r - p_a>.
// Rows of the Cholesky factor of A before `valid_rows` are kept: a row depends only on the
// points before it, so a point that joins at the end costs one new row.
// Returns false when a point is affinely dependent on the ones before it.
bool affine_min_norm(int64_t k, int64_t m, int64_t valid_rows, Workspace& ws) {
  const double* g = ws.g.data();
  const int64_t* s = ws.support.data();
  double* chol = ws.chol.data();
  double* inv = ws.inv_pivot.data();
  double* mu = ws.rhs.data();
  const int64_t r = s[0];
  const double grr = g[r * k + r];
  const int64_t n = m - 1;

  for (int64_t a = valid_rows; a < n; ++a) {
    const int64_t pa = s[a + 1];
    const double gar = g[pa * k + r];
    for (int64_t b = 0; b <= a; ++b) {
      const int64_t pb = s[b + 1];
      double v = g[pa * k + pb] - gar - g[r * k + pb] + grr;
      for (int64_t l = 0; l < b; ++l) v -= chol[a * k + l] * chol[b * k + l];
      if (b < a) {
        chol[a * k + b] = v * inv[b];
      } else {
        const double own = g[pa * k + pa] - 2.0 * gar + grr;
        if (!(v > kPivotRelTol * own)) return false;
        chol[a * k + a] = std::sqrt(v);
        inv[a] = 1.0 / chol[a * k + a];
      }
    }
  }
  for (int64_t a = 0; a < n; ++a) mu[a] = grr - g[s[a + 1] * k + r];

  // Forward then backward substitution.
  for (int64_t a = 0; a < n; ++a) {
    double v = mu[a];
    for (int64_t l = 0; l < a; ++l) v -= chol[a * k + l] * mu[l];
    mu[a] = v * inv[a];
  }
  for (int64_t a = n - 1; a >= 0; --a) {
    double v = mu[a];
    for (int64_t l = a + 1; l < n; ++l) v -= chol[l * k + a] * mu[l];
    mu[a] = v * inv[a];
  }

  double rest = 1.0;
  for (int64_t a = 0; a < n; ++a) {
    ws.w[s[a + 1]] = mu[a];
    rest -= mu[a];
  }
  ws.w[r] = rest;
  return true;
}

// G c as a dense product: for the small k of alignment work it vectorises better than a
// gather over the support.
void refresh_gc(int64_t k, Workspace& ws) {
  const double* g = ws.g.data();
  for (int64_t t = 0; t < k; ++t) ws.gc[t] = dot(g + t * k, ws.c.data(), k);
}

// Wolfe's algorithm from the best-pair start. One iteration is one affine solve (a major
// cycle that adds a point, or a minor cycle that drops the points whose weight hits zero).
Outcome wolfe(int64_t k, int64_t budget, Workspace& ws) {
  const double* g = ws.g.data();
  double* c = ws.c.data();
  double* w = ws.w.data();
  int64_t m = 0;
  std::fill(ws.in_support.begin(), ws.in_support.end(), 0);
  for (int64_t i = 0; i < k; ++i) {
    if (c[i] > 0.0) {
      ws.support[m++] = i;
      ws.in_support[i] = 1;
    }
  }
  double value = dot(c, ws.gc.data(), k);
  int64_t steps = 0;
  int64_t valid_rows = 0;

  while (steps < budget) {
    const int64_t t = argmin(ws.gc.data(), k);
    double largest = g[t * k + t];
    for (int64_t a = 0; a < m; ++a) largest = std::max(largest, g[ws.support[a] * (k + 1)]);
    if (ws.in_support[t] || value - ws.gc[t] <= kGapRelTol * largest) {
      return {static_cast<int32_t>(steps), true};
    }

    std::copy(c, c + k, ws.saved_c.begin());
    std::copy(ws.support.begin(), ws.support.begin() + m, ws.saved_support.begin());
    const int64_t saved_m = m;
    ws.support[m++] = t;
    ws.in_support[t] = 1;

    bool stuck = false;
    bool settled = false;
    while (!settled && steps < budget) {
      ++steps;
      if (!affine_min_norm(k, m, valid_rows, ws)) {
        stuck = true;
        break;
      }
      valid_rows = m - 1;

      double theta = 1.0;
      int64_t leaving = -1;
      for (int64_t a = 0; a < m; ++a) {
        const int64_t p = ws.support[a];
        if (w[p] <= 0.0) {
          const double ratio = c[p] / (c[p] - w[p]);
          if (leaving < 0 || ratio < theta) {
            theta = ratio;
            leaving = p;
          }
        }
      }
      if (leaving < 0) {
        for (int64_t a = 0; a < m; ++a) c[ws.support[a]] = w[ws.support[a]];
        settled = true;
        continue;
      }

      // Move towards the affine minimiser until the first weight reaches zero, then drop
      // every point whose weight did.
      int64_t kept = 0;
      double total = 0.0;
      for (int64_t a = 0; a < m; ++a) {
        const int64_t p = ws.support[a];
        const double next = p == leaving ? 0.0 : c[p] + theta * (w[p] - c[p]);
        if (next > 0.0) {
          c[p] = next;
          total += next;
          ws.support[kept++] = p;
        } else {
          c[p] = 0.0;
          ws.in_support[p] = 0;
          // Dropping the reference point changes every row; dropping point a, row a - 1 on.
          valid_rows = std::min(valid_rows, std::max<int64_t>(a - 1, 0));
        }
      }
      m = kept;
      for (int64_t a = 0; a < m; ++a) c[ws.support[a]] /= total;
    }

    refresh_gc(k, ws);
    const double next_value = dot(c, ws.gc.data(), k);
    // Rounding can leave a cycle that does not lower the objective; the previous point is
    // then optimal to working precision.
    if (stuck || !(next_value < value)) {
      const bool done = stuck || settled;
      std::copy(ws.saved_c.begin(), ws.saved_c.end(), c);
      std::fill(ws.in_support.begin(), ws.in_support.end(), 0);
      m = saved_m;
      for (int64_t a = 0; a < m; ++a) {
        ws.support[a] = ws.saved_support[a];
        ws.in_support[ws.support[a]] = 1;
      }
      return {static_cast<int32_t>(steps), done};
    }
    value = next_value;
  }
  return {static_cast<int32_t>(steps), false};
}

template <typename scalar_t>
void solve_batch(const scalar_t* gram, scalar_t* weights, int32_t* iterations, bool* converged,
                 int64_t batch, int64_t k, int64_t max_iters, double tol, Method method) {
  at::parallel_for(0, batch, kGrainProblems, [&](int64_t begin, int64_t end) {
    Workspace ws(k);
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* out = weights + p * k;
      const double scale = load_normalised(gram + p * k * k, k, ws);
      Outcome outcome{0, true};

      if (std::isnan(scale)) {
        std::fill(out, out + k, std::numeric_limits<scalar_t>::quiet_NaN());
        iterations[p] = 0;
        converged[p] = false;
        continue;
      }
      if (k == 1) {
        ws.c[0] = 1.0;
      } else if (!(scale > 0.0)) {
        std::fill(ws.c.begin(), ws.c.end(), 1.0 / static_cast<double>(k));
      } else {
        best_pair(k, ws);
        outcome = method == Method::kExact ? wolfe(k, max_iters, ws)
                                           : frank_wolfe(k, max_iters, tol, ws);
      }

      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<scalar_t>(ws.c[i]);
      iterations[p] = outcome.iterations;
      converged[p] = outcome.converged;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> min_norm_cpu(const at::Tensor& gram,
                                                            int64_t max_iters, double tol,
                                                            c10::string_view method) {
  TORCH_CHECK(gram.device().is_cpu(), "mofast::min_norm (CPU): gram is on ", gram.device());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2),
              "mofast::min_norm: gram must be [B, k, k], got ", gram.sizes());
  TORCH_CHECK(gram.size(1) >= 1, "mofast::min_norm: k must be at least 1");
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "mofast::min_norm: gram must be float32 or float64, got ", gram.scalar_type());
  // Iterations are reported as int32.
  TORCH_CHECK(max_iters >= 0 && max_iters <= std::numeric_limits<int32_t>::max(),
              "mofast::min_norm: max_iters must be in [0, 2147483647], got ", max_iters);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0,
              "mofast::min_norm: tol must be finite and >= 0, got ", tol);
  Method kind;
  if (method == "frank-wolfe") {
    kind = Method::kFrankWolfe;
  } else if (method == "exact") {
    kind = Method::kExact;
  } else {
    TORCH_CHECK(false, "mofast::min_norm: method must be 'frank-wolfe' or 'exact', got '",
                std::string(method), "'");
  }

  const at::Tensor input = gram.contiguous();
  const int64_t batch = input.size(0);
  const int64_t k = input.size(1);
  at::Tensor weights = at::empty({batch, k}, input.options());
  at::Tensor iterations = at::empty({batch}, input.options().dtype(at::kInt));
  at::Tensor converged = at::empty({batch}, input.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "mofast_min_norm", [&] {
    solve_batch<scalar_t>(input.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                          iterations.data_ptr<int32_t>(), converged.data_ptr<bool>(), batch,
                          k, max_iters, tol, kind);
  });
  return {weights, iterations, converged};
}

}  // namespace

TORCH_LIBRARY_IMPL(mofast, CPU, m) { m.impl("min_norm", &min_norm_cpu); }

}  // namespace mofast
