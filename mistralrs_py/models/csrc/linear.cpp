// linear_f32(x, w) -> x @ w.T in float32 for bf16/fp16/fp32 x [M, K] and w [N, K] (same dtype).
//
// The output head of a bf16 model: torch's bf16 matmul rounds each logit to bf16 (8 bits: a step of
// 0.125 at a logit of 20), which ties or swaps the top tokens that greedy decoding picks between.
// Products of bf16 values are exact in float32, so this is the float32 result of the bf16 weights,
// as llama.cpp's logits are. With AVX-512 BF16, vdpbf16ps multiplies 32 pairs per instruction.
// Rows of w are split across threads in blocks that stay in cache while up to 8 rows of x pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace {

using namespace mistralrs;
constexpr int kRows = 8;  // rows of x per pass over a weight row

// out[r * ldo] = dot(x[r], w) for r < mt (mt <= kRows)
template <typename T>
inline void dot_rows(const T* x, int64_t ldx, int mt, const T* w, int64_t K, float* out, int64_t ldo) {
  int64_t k = 0;
  float acc_s[kRows] = {};
#ifdef MISTRALRS_AVX512
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; k + 32 <= K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
      for (int r = 0; r < mt; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + r * ldx + k), wv);
    }
  }
#endif
  for (; k + kLanes <= K; k += kLanes) {
    const __m512 wv = load16(w + k);
    for (int r = 0; r < mt; ++r) acc[r] = _mm512_fmadd_ps(load16(x + r * ldx + k), wv, acc[r]);
  }
  for (int r = 0; r < mt; ++r) acc_s[r] = _mm512_reduce_add_ps(acc[r]);
#endif
  for (; k < K; ++k) {
    const float wk = to_float(w[k]);
    for (int r = 0; r < mt; ++r) acc_s[r] += to_float(x[r * ldx + k]) * wk;
  }
  for (int r = 0; r < mt; ++r) out[r * ldo] = acc_s[r];
}

at::Tensor linear_f32(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "linear_f32: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "linear_f32: x must be [M, K] and w [N, K], got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "linear_f32: x and w must share one dtype");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  MISTRALRS_DISPATCH(x.scalar_type(), "linear_f32", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    float* op = out.data_ptr<float>();
    // NOTE: a block of ~64 KB of weight rows per task: it stays in L2 while every row tile of x passes
    const int64_t block = std::max<int64_t>(1, 65536 / (K * static_cast<int64_t>(sizeof(scalar_t))));
    at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t a, int64_t e) {
      for (int64_t blk = a; blk < e; ++blk) {
        const int64_t n0 = blk * block, n1 = std::min(N, n0 + block);
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int mt = static_cast<int>(std::min<int64_t>(kRows, M - m0));
          for (int64_t n = n0; n < n1; ++n) dot_rows(xp + m0 * K, K, mt, wp + n * K, K, op + m0 * N + n, N);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("linear_f32", &linear_f32);
}
