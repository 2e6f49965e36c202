// Row-wise CPU ops of the decoder, each one op where torch needs several (on a decode step of a
// small model, per-op overhead costs as much as the arithmetic):
//   rms_norm(x, w, eps):  x * rsqrt(mean(x^2) + eps) * w, float32 inside, rounded once
//   silu_mul(x):          silu(x[..., :I]) * x[..., I:] for x [..., 2I] (SwiGLU's gate and up halves)
//   argmax_rows(x):       torch.argmax(x, -1) of a float32 [S, V] (greedy sampling's pass over the
//                         logits; torch's CPU argmax is not vectorised: ~20x its amax here)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace mistralrs;

template <typename T, typename W>
void rms_norm_row(const T* x, const W* w, T* y, int64_t D, float eps) {
  int64_t i = 0;
  float ss = 0.f;
#ifdef MISTRALRS_VEC
  vfloat acc = vzero();
  for (; i + kVec <= D; i += kVec) {
    const vfloat v = vload(x + i);
    acc = vfma(v, v, acc);
  }
  ss = vsum(acc);
#endif
  for (; i < D; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  i = 0;
#ifdef MISTRALRS_VEC
  const vfloat rv = vset1(r);
  for (; i + kVec <= D; i += kVec) vstore(y + i, vmul(vmul(vload(x + i), rv), vload(w + i)));
#endif
  for (; i < D; ++i) y[i] = static_cast<T>(to_float(x[i]) * r * to_float(w[i]));
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 1 && w_in.size(0) == x_in.size(-1),
              "rms_norm: weight must be [D] for x [..., D]; got ", w_in.sizes(), " and ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.to(x.scalar_type()).contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t D = x.size(-1), M = D ? x.numel() / D : 0;
  if (M == 0) return y;
  MISTRALRS_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / D), [&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) rms_norm_row(xp + m * D, wp, yp + m * D, D, static_cast<float>(eps));
    });
  });
  return y;
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* y, int64_t n) {
  int64_t i = 0;
#ifdef MISTRALRS_VEC
  const vfloat one = vset1(1.f), minus = vset1(-1.f);
  for (; i + kVec <= n; i += kVec) {
    const vfloat gv = vload(g + i);
    const vfloat s = vdiv(gv, vadd(one, vexp(vmul(minus, gv))));
    vstore(y + i, vmul(s, vload(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float gv = to_float(g[i]);
    y[i] = static_cast<T>(gv / (1.f + std::exp(-gv)) * to_float(u[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, "silu_mul: the last dim must be even, got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t I = x.size(-1) / 2, M = I ? x.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0) return y;
  MISTRALRS_DISPATCH(x.scalar_type(), "silu_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / I), [&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) silu_mul_row(xp + m * 2 * I, xp + m * 2 * I + I, yp + m * I, I);
    });
  });
  return y;
}

// torch.argmax's answer for one row: the first maximum, or the first NaN when there is one
int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef MISTRALRS_HAS_AVX2
  __m256 mv = _mm256_set1_ps(m), un = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mv = _mm256_max_ps(mv, v);
  }
  nan = _mm256_movemask_ps(un) != 0;
  m = hmax8(mv);
#endif
  for (; i < n; ++i) {
    nan = nan || std::isnan(x[i]);
    m = std::max(m, x[i]);
  }
  int64_t j = 0;
#ifdef MISTRALRS_HAS_AVX2
  if (!nan) {  // NOTE: stops at the first hit, so about half a row on average
    const __m256 target = _mm256_set1_ps(m);
    for (; j + 8 <= n; j += 8)
      if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ)))
        return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == m) return j;
  return 0;
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) > 0,
              "argmax_rows: x must be a float32 CPU [S, V] with V > 0, got ", x_in.sizes(), " ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const int64_t S = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({S}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, S, std::max<int64_t>(1, 65536 / V), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) op[r] = argmax_row(xp + r * V, V);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
}
