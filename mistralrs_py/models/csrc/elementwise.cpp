// Row-wise CPU ops of the decoder, each one op where torch needs several (on a decode step of a
// small model, per-op overhead costs as much as the arithmetic):
//   rms_norm(x, w, eps):  x * rsqrt(mean(x^2) + eps) * w, float32 inside, rounded once
//   silu_mul(x):          silu(x[..., :I]) * x[..., I:] for x [..., 2I] (SwiGLU's gate and up halves)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec.h"

namespace {

using namespace mistralrs;

template <typename T, typename W>
void rms_norm_row(const T* x, const W* w, T* y, int64_t D, float eps) {
  int64_t i = 0;
  float ss = 0.f;
#ifdef MISTRALRS_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + kLanes <= D; i += kLanes) {
    const __m512 v = load16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < D; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  i = 0;
#ifdef MISTRALRS_AVX512
  const __m512 rv = _mm512_set1_ps(r);
  for (; i + kLanes <= D; i += kLanes) store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), rv), load16(w + i)));
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
#ifdef MISTRALRS_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 gv = load16(g + i);
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    store16(y + i, _mm512_mul_ps(s, load16(u + i)));
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
