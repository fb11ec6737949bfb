// molf's CPU kernels for MoLFAdamW(impl="compiled"). Built on first use by molf/_compiled.py with
// torch.utils.cpp_extension.load_inline, which puts `#define MOLF_TERM(m, u) <the score's cpp_term>`
// above this file (the score's per-element term, e.g. `m * u` for EPD, `u * u` for PFN).
//
// Three functions over lists of contiguous CPU tensors (float32, bfloat16 or float64). Each checks a
// gradient before it writes anything, by the optimizer's rule: a gradient whose sum of squares, in the
// compute dtype, is NaN or inf is skipped whole (its module's whole step, for MoLF experts). The check
// reads a gradient just before the update reads it again, so the second read comes from the cache.
//   advance_and_score(g, m, v, module_of)  pass 1, one module after another (modules shared among the
//       threads): check every gradient of the module, then advance both Adam moments in place and
//       return, per tensor, the float64 sum of MOLF_TERM(m, u), u = m / (sqrt(v) + eps), over the
//       advanced moments (NaN for a skipped module, whose tensors stay as they were)
//   adamw_from_moments(p, m, v)  pass 2, winners only: the decoupled AdamW update from the advanced
//       moments: p <- p (1 - lr wd) - lr / bias1 * m / (sqrt(v) / bias2_sqrt + eps)
//   gated_adamw(p, g, m, v)  plain parameters, one after another (each split in chunks that the threads
//       share): check the gradient, then the whole AdamW step; returns the skipped ones
// Every element-wise op rounds to the tensor's dtype where torch's foreach AdamW ops do (the compute
// dtype is float for float32 and bfloat16, double for float64), so results differ from the eager
// path only where a multiply-add or a sum is ordered differently. Per-tensor sums are added in a fixed
// order, so nothing depends on the number of threads.
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

// Adam's hyper-parameters in the compute dtype, as torch's foreach ops apply them.
template <typename O>
struct Moments {
  O w, beta2, w2, eps;
  bool near_start;  // torch's lerp: two formulas, chosen by the weight
  Moments(double b1, double b2, double e)
      : w(O(1 - b1)), beta2(O(b2)), w2(O(1 - b2)), eps(O(e)), near_start(std::abs(1 - b1) < 0.5) {}
};

// One element's moments, advanced as m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, 1 - b2) advance them.
template <typename T, typename O>
inline void advance(const Moments<O>& h, O g, O& m, O& v) {
  m = rounded<T, O>(h.near_start ? m + h.w * (g - m) : g - (g - m) * (O(1) - h.w));
  v = rounded<T, O>(rounded<T, O>(v * h.beta2) + h.w2 * g * g);
}

// One element's decoupled AdamW update from advanced moments, as p.mul_(decay);
// p.addcdiv_(m, sqrt(v) / bias2_sqrt + eps, value=step) applies it.
template <typename T, typename O>
inline T updated(O p, O m, O v, O decay, O step, O bias2_sqrt, O eps) {
  const O denom = rounded<T, O>(rounded<T, O>(rounded<T, O>(std::sqrt(v)) / bias2_sqrt) + eps);
  return static_cast<T>(rounded<T, O>(p * decay) + step * (m / denom));
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

// The optimizer's rule: skip a gradient whose sum of squares overflows (or is NaN) in the compute dtype.
bool nonfinite(double sum_of_squares, at::ScalarType dtype) {
  return dtype == at::kDouble ? !std::isfinite(sum_of_squares) : !std::isfinite(static_cast<float>(sum_of_squares));
}

template <typename T>
double advance_and_sum(const T* g, T* m, T* v, int64_t n, double b1, double b2, double eps) {
  using O = at::opmath_type<T>;
  const Moments<O> h(b1, b2, eps);
  double total = 0;
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t stop = std::min(b + BLOCK, n);
    O acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = b; j < stop; ++j) {
      O mj = O(m[j]), vj = O(v[j]);
      advance<T, O>(h, O(g[j]), mj, vj);
      m[j] = static_cast<T>(mj);
      v[j] = static_cast<T>(vj);
      const O u = rounded<T, O>(mj / rounded<T, O>(rounded<T, O>(std::sqrt(vj)) + h.eps));
      acc += rounded<T, O>(MOLF_TERM(mj, u));
    }
    total += static_cast<double>(acc);
  }
  return total;
}

template <typename T>
void update_range(T* p, const T* m, const T* v, int64_t n, double decay, double step, double bias2_sqrt, double eps) {
  using O = at::opmath_type<T>;
  const O d = O(decay), s = O(step), c2 = O(bias2_sqrt), e = O(eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] = updated<T, O>(O(p[j]), O(m[j]), O(v[j]), d, s, c2, e);
}

template <typename T>
void adamw_range(T* p, const T* g, T* m, T* v, int64_t n, double b1, double b2, double eps, double decay,
                 double step, double bias2_sqrt) {
  using O = at::opmath_type<T>;
  const Moments<O> h(b1, b2, eps);
  const O d = O(decay), s = O(step), c2 = O(bias2_sqrt);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    O mj = O(m[j]), vj = O(v[j]);
    advance<T, O>(h, O(g[j]), mj, vj);
    m[j] = static_cast<T>(mj);
    v[j] = static_cast<T>(vj);
    p[j] = updated<T, O>(O(p[j]), rounded<T, O>(mj), rounded<T, O>(vj), d, s, c2, h.eps);
  }
}

// Calls f(T{}) with T the tensor's element type (float, double or c10::BFloat16).
template <typename F>
void dispatch(const torch::Tensor& t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "molf_cpu_step", [&] { f(scalar_t{}); });
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> advance_and_score(const std::vector<torch::Tensor>& g,
                                                           const std::vector<torch::Tensor>& m,
                                                           const std::vector<torch::Tensor>& v,
                                                           const std::vector<int64_t>& module_of, double b1,
                                                           double b2, double eps) {
  check(g, g, "g");
  check(g, m, "m");
  check(g, v, "v");
  TORCH_CHECK(module_of.size() == g.size(), "molf kernels: one module index per tensor");
  std::vector<std::vector<int64_t>> modules;  // tensor indices per module, modules in order of first use
  std::vector<int64_t> slot;
  for (size_t i = 0; i < g.size(); ++i) {
    const int64_t k = module_of[i];
    TORCH_CHECK(k >= 0, "molf kernels: module indices must be >= 0");
    if (k >= static_cast<int64_t>(slot.size())) slot.resize(k + 1, -1);
    if (slot[k] < 0) {
      slot[k] = static_cast<int64_t>(modules.size());
      modules.emplace_back();
    }
    modules[slot[k]].push_back(static_cast<int64_t>(i));
  }
  auto sums = torch::zeros({static_cast<int64_t>(g.size())}, torch::kDouble);
  auto skipped = torch::zeros({static_cast<int64_t>(modules.size())}, torch::kBool);
  double* out = sums.data_ptr<double>();
  bool* skip = skipped.data_ptr<bool>();
  at::parallel_for(0, static_cast<int64_t>(modules.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      bool bad = false;
      for (int64_t i : modules[k])
        dispatch(g[i], [&](auto tag) {
          using T = decltype(tag);
          bad |= nonfinite(sum_squares<T>(g[i].data_ptr<T>(), g[i].numel()), g[i].scalar_type());
        });
      skip[k] = bad;
      for (int64_t i : modules[k]) {
        if (bad) {
          out[i] = std::nan("");
          continue;
        }
        dispatch(g[i], [&](auto tag) {
          using T = decltype(tag);
          out[i] = advance_and_sum<T>(g[i].data_ptr<T>(), m[i].data_ptr<T>(), v[i].data_ptr<T>(), g[i].numel(), b1,
                                      b2, eps);
        });
      }
    }
  });
  return {sums, skipped};
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
      dispatch(p[i], [&](auto tag) {
        using T = decltype(tag);
        update_range<T>(p[i].data_ptr<T>() + w.start, m[i].data_ptr<T>() + w.start, v[i].data_ptr<T>() + w.start,
                        w.end - w.start, 1 - lr[i] * wd[i], -lr[i] / bias1[i], bias2_sqrt[i], eps[i]);
      });
    }
  });
}

torch::Tensor gated_adamw(const std::vector<torch::Tensor>& p, const std::vector<torch::Tensor>& g,
                          const std::vector<torch::Tensor>& m, const std::vector<torch::Tensor>& v,
                          const std::vector<double>& lr, const std::vector<double>& wd, const std::vector<double>& b1,
                          const std::vector<double>& b2, const std::vector<double>& eps,
                          const std::vector<double>& bias1, const std::vector<double>& bias2_sqrt) {
  check(p, g, "g");
  check(p, m, "m");
  check(p, v, "v");
  for (const auto* xs : {&lr, &wd, &b1, &b2, &eps, &bias1, &bias2_sqrt})
    TORCH_CHECK(xs->size() == p.size(), "molf kernels: one lr, wd, b1, b2, eps, bias1 and bias2_sqrt per tensor");
  auto skipped = torch::zeros({static_cast<int64_t>(p.size())}, torch::kBool);
  bool* skip = skipped.data_ptr<bool>();
  for (size_t i = 0; i < p.size(); ++i) {
    const int64_t n = p[i].numel(), chunks = (n + CHUNK - 1) / CHUNK;
    dispatch(p[i], [&](auto tag) {
      using T = decltype(tag);
      std::vector<double> partial(chunks, 0.0);
      const T* gi = g[i].data_ptr<T>();
      at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) partial[c] = sum_squares<T>(gi + c * CHUNK, std::min(CHUNK, n - c * CHUNK));
      });
      double total = 0;
      for (double x : partial) total += x;
      skip[i] = nonfinite(total, p[i].scalar_type());
      if (skip[i]) return;
      at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) {
          const int64_t o = c * CHUNK;
          adamw_range<T>(p[i].data_ptr<T>() + o, gi + o, m[i].data_ptr<T>() + o, v[i].data_ptr<T>() + o,
                         std::min(CHUNK, n - o), b1[i], b2[i], eps[i], 1 - lr[i] * wd[i], -lr[i] / bias1[i],
                         bias2_sqrt[i]);
        }
      });
    });
  }
  return skipped;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("advance_and_score", &advance_and_score);
  module.def("adamw_from_moments", &adamw_from_moments);
  module.def("gated_adamw", &gated_adamw);
}
