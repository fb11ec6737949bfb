// molf's CPU kernels for MoLFAdamW(impl="compiled"). Built on first use by molf/_compiled.py with
// torch.utils.cpp_extension.load_inline, which puts `#define MOLF_TERM(m, u) <the score's cpp_term>`
// above this file (the score's per-element term, e.g. `m * u` for EPD, `u * u` for PFN).
//
// Three functions over lists of contiguous CPU tensors (float32, bfloat16 or float64), each split into
// chunks that OpenMP threads share; per-tensor results are combined in chunk order, so they do not
// depend on the number of threads:
//   nonfinite(g)                  per tensor: is its sum of g^2, in the compute dtype, NaN or inf?
//   advance_and_score(g, m, v)    pass 1: advance both Adam moments in place and return, per tensor,
//                                 the float64 sum of MOLF_TERM(m, u), u = m / (sqrt(v) + eps), over
//                                 the advanced moments: one read of g, m, v and one write of m, v
//   adamw_from_moments(p, m, v)   pass 2, winners only: the decoupled AdamW update from the advanced
//                                 moments: p <- p (1 - lr wd) - lr / bias1 * m / (sqrt(v) / bias2_sqrt + eps)
// Every element-wise op rounds to the tensor's dtype where torch's foreach AdamW ops do (the compute
// dtype is float for float32 and bfloat16, double for float64), so for float32 the results differ
// from the eager path only where the compiler orders a sum differently.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t CHUNK = 1 << 16;  // elements per work item shared among threads
constexpr int64_t BLOCK = 2048;     // elements summed in the compute dtype before joining a double total

struct Work {
  int64_t tensor, start, end;
};

std::vector<Work> split(const std::vector<torch::Tensor>& ts) {
  std::vector<Work> work;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i)
    for (int64_t s = 0; s < ts[i].numel(); s += CHUNK) work.push_back({i, s, std::min(s + CHUNK, ts[i].numel())});
  return work;
}

void check(const std::vector<torch::Tensor>& like, const std::vector<torch::Tensor>& other, const char* what) {
  TORCH_CHECK(like.size() == other.size(), "molf kernels: ", what, " has ", other.size(), " tensors, expected ",
              like.size());
  for (size_t i = 0; i < like.size(); ++i) {
    TORCH_CHECK(other[i].device().is_cpu() && other[i].is_contiguous(), "molf kernels: ", what, "[", i,
                "] must be a contiguous CPU tensor");
    TORCH_CHECK(other[i].scalar_type() == like[i].scalar_type() && other[i].numel() == like[i].numel(),
                "molf kernels: ", what, "[", i, "] does not match the first list in dtype or size");
  }
}

// The value `x` takes once stored in a T tensor, back in the compute dtype O.
template <typename T, typename O>
inline O rounded(O x) {
  return static_cast<O>(static_cast<T>(x));
}

template <typename T>
double advance_chunk(const T* g, T* m, T* v, int64_t n, double b1, double b2, double eps) {
  using O = at::opmath_type<T>;
  const O w = O(1 - b1), beta2 = O(b2), w2 = O(1 - b2), e = O(eps);
  const bool near_start = std::abs(w) < O(0.5);  // torch's lerp: two formulas, chosen by the weight
  double total = 0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t stop = std::min(b + BLOCK, n);
    O acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = b; j < stop; ++j) {
      const O gj = O(g[j]), mo = O(m[j]);
      const O mj = rounded<T, O>(near_start ? mo + w * (gj - mo) : gj - (gj - mo) * (O(1) - w));
      const O vj = rounded<T, O>(rounded<T, O>(O(v[j]) * beta2) + w2 * gj * gj);
      m[j] = static_cast<T>(mj);
      v[j] = static_cast<T>(vj);
      const O u = rounded<T, O>(mj / rounded<T, O>(rounded<T, O>(std::sqrt(vj)) + e));
      acc += rounded<T, O>(MOLF_TERM(mj, u));
    }
    total += static_cast<double>(acc);
  }
  return total;
}

template <typename T>
void update_chunk(T* p, const T* m, const T* v, int64_t n, double decay, double step, double bias2_sqrt, double eps) {
  using O = at::opmath_type<T>;
  const O d = O(decay), s = O(step), c2 = O(bias2_sqrt), e = O(eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const O denom = rounded<T, O>(rounded<T, O>(rounded<T, O>(std::sqrt(O(v[j]))) / c2) + e);
    const O pj = rounded<T, O>(O(p[j]) * d);
    p[j] = static_cast<T>(pj + s * (O(m[j]) / denom));
  }
}

template <typename T>
double sum_squares(const T* x, int64_t n) {
  using O = at::opmath_type<T>;
  double total = 0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t stop = std::min(b + BLOCK, n);
    O acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = b; j < stop; ++j) acc += O(x[j]) * O(x[j]);
    total += static_cast<double>(acc);
  }
  return total;
}

}  // namespace

torch::Tensor nonfinite(const std::vector<torch::Tensor>& g) {
  check(g, g, "g");
  const auto work = split(g);
  std::vector<double> partial(work.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Work& w = work[c];
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g[w.tensor].scalar_type(), "molf_nonfinite", [&] {
        partial[c] = sum_squares<scalar_t>(g[w.tensor].data_ptr<scalar_t>() + w.start, w.end - w.start);
      });
    }
  });
  std::vector<double> sums(g.size(), 0.0);
  for (size_t c = 0; c < work.size(); ++c) sums[work[c].tensor] += partial[c];
  auto out = torch::zeros({static_cast<int64_t>(g.size())}, torch::kBool);
  auto* flag = out.data_ptr<bool>();
  for (size_t i = 0; i < g.size(); ++i)  // overflow judged in the compute dtype (float for float32, bfloat16)
    flag[i] = g[i].scalar_type() == at::kDouble ? !std::isfinite(sums[i]) : !std::isfinite(static_cast<float>(sums[i]));
  return out;
}

torch::Tensor advance_and_score(const std::vector<torch::Tensor>& g, const std::vector<torch::Tensor>& m,
                                const std::vector<torch::Tensor>& v, double b1, double b2, double eps) {
  check(g, g, "g");
  check(g, m, "m");
  check(g, v, "v");
  const auto work = split(g);
  std::vector<double> partial(work.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Work& w = work[c];
      const auto i = w.tensor;
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g[i].scalar_type(), "molf_advance_and_score", [&] {
        partial[c] = advance_chunk<scalar_t>(g[i].data_ptr<scalar_t>() + w.start, m[i].data_ptr<scalar_t>() + w.start,
                                             v[i].data_ptr<scalar_t>() + w.start, w.end - w.start, b1, b2, eps);
      });
    }
  });
  auto out = torch::zeros({static_cast<int64_t>(g.size())}, torch::kDouble);
  auto* sums = out.data_ptr<double>();
  for (size_t c = 0; c < work.size(); ++c) sums[work[c].tensor] += partial[c];
  return out;
}

void adamw_from_moments(const std::vector<torch::Tensor>& p, const std::vector<torch::Tensor>& m,
                        const std::vector<torch::Tensor>& v, const std::vector<double>& lr,
                        const std::vector<double>& wd, const std::vector<double>& bias1,
                        const std::vector<double>& bias2_sqrt, const std::vector<double>& eps) {
  check(p, m, "m");
  check(p, v, "v");
  for (const auto* xs : {&lr, &wd, &bias1, &bias2_sqrt, &eps})
    TORCH_CHECK(xs->size() == p.size(), "molf kernels: one lr, wd, bias1, bias2_sqrt and eps per tensor");
  const auto work = split(p);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Work& w = work[c];
      const auto i = w.tensor;
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p[i].scalar_type(), "molf_adamw_from_moments", [&] {
        update_chunk<scalar_t>(p[i].data_ptr<scalar_t>() + w.start, m[i].data_ptr<scalar_t>() + w.start,
                               v[i].data_ptr<scalar_t>() + w.start, w.end - w.start, 1 - lr[i] * wd[i],
                               -lr[i] / bias1[i], bias2_sqrt[i], eps[i]);
      });
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("nonfinite", &nonfinite);
  module.def("advance_and_score", &advance_and_score);
  module.def("adamw_from_moments", &adamw_from_moments);
}
