// linear(x, w, bias, f32_out) -> x @ w.T (+ bias) for bf16/fp16/fp32 x [M, K] and w [N, K] (one
// dtype), in x's dtype or, with f32_out, in float32.
//
// For the few rows of a decode step (the model uses it up to 8 rows): a matrix-vector product is
// bound by reading w, and torch's bf16 CPU matmul reads it at well under the memory's speed (one
// row through a 49152 x 576 head: 3.2 ms against 1.3 ms here, 2 threads).
// f32_out is for the output head of a bf16 model: bf16 output rounds each logit to 8 bits (a step
// of 0.125 at a logit of 20), which ties or swaps the top tokens greedy decoding picks between.
// Products of bf16 values are exact in float32, so this is the float32 result of the bf16 weights,
// as llama.cpp's logits are. With AVX-512 BF16, vdpbf16ps multiplies 32 pairs per instruction.
// Rows of w are split across threads in blocks that stay in cache while up to 8 rows of x pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <vector>
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

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                  bool f32_out) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "linear: x must be [M, K] and w [N, K], got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "linear: x and w must share one dtype");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "linear: bias must be [N]");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  // NOTE: the float32 result first; rounded to x's dtype once at the end (a small copy next to w)
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return f32_out ? out : out.to(x.scalar_type());
  MISTRALRS_DISPATCH(x.scalar_type(), "linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    float* op = out.data_ptr<float>();
    // NOTE: a block of ~64 KB of weight rows per task: it stays in L2 while every row tile of x passes
    const int64_t block = std::max<int64_t>(1, 65536 / (K * static_cast<int64_t>(sizeof(scalar_t))));
    // NOTE: under ~256k multiply-adds (an adapter's tiny matrices) one thread beats waking the pool
    const int64_t blocks = (N + block - 1) / block, grain = M * N * K < (1 << 18) ? blocks : 1;
    at::parallel_for(0, blocks, grain, [&](int64_t a, int64_t e) {
      for (int64_t blk = a; blk < e; ++blk) {
        const int64_t n0 = blk * block, n1 = std::min(N, n0 + block);
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int mt = static_cast<int>(std::min<int64_t>(kRows, M - m0));
          for (int64_t n = n0; n < n1; ++n) dot_rows(xp + m0 * K, K, mt, wp + n * K, K, op + m0 * N + n, N);
        }
      }
    });
  });
  if (bias.defined()) out.add_(bias);
  return f32_out || x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}


// lora_add_(y, x, a, bt, lam, constant): y[m] += (scale[m] * (a @ x[m])) @ bt for each row m, in float32,
// where scale[m] is lam[m] ([M, 1 or P, R], broadcast over the P parts of a fused projection) or
// `constant` when lam is None. a: [P*R, K], bt: [P*R, N] float32 or bfloat16 (B transposed: the update is P*R
// whole-row multiply-adds); x: [M, K]; y: [M, N], updated in place and rounded once.
// X-LoRA's adapters in one op: torch needs ~7 (cast, two tiny matmuls, the scaling, the add).
template <typename T, typename Y, typename W>
void lora_rows(Y* y, const T* x, const W* a, const W* bt, const at::Tensor& lam, float constant, int64_t M,
               int64_t N, int64_t K, int64_t PR, int64_t R) {
  std::vector<float> xf(K), h(PR), yf(N);
  // NOTE: the adapters are read from memory each token (float32, up to ~1 MB a layer): both stages
  // are split across the threads when there is enough of them to share
  const int64_t grain_a = std::max<int64_t>(1, 16384 / K), grain_b = std::max<int64_t>(64, 16384 / PR);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xf[k] = to_float(x[m * K + k]);
    at::parallel_for(0, PR, grain_a, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) h[j] = dot(xf.data(), a + j * K, K);
    });
    if (lam.defined()) {
      const float* lp = lam.data_ptr<float>();
      const int64_t s0 = lam.stride(0), s1 = lam.size(1) == 1 ? 0 : lam.stride(1), s2 = lam.stride(2);
      for (int64_t j = 0; j < PR; ++j) h[j] *= lp[m * s0 + (j / R) * s1 + (j % R) * s2];
    } else {
      for (int64_t j = 0; j < PR; ++j) h[j] *= constant;
    }
    Y* yr = y + m * N;
    at::parallel_for(0, N, grain_b, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) yf[n] = to_float(yr[n]);
      for (int64_t j = 0; j < PR; ++j) axpy(yf.data() + n0, h[j], bt + j * N + n0, n1 - n0);
      for (int64_t n = n0; n < n1; ++n) yr[n] = static_cast<Y>(yf[n]);
    });
  }
}

void lora_add_(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt,
               const std::optional<at::Tensor>& lam_in, double constant) {
  for (const at::Tensor* t : {&x_in, &a, &bt}) TORCH_CHECK(t->device().is_cpu(), "lora_add_: CPU tensors only");
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.is_contiguous(), "lora_add_: y must be a contiguous [M, N]");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == M, "lora_add_: x must be [M, K]");
  const int64_t K = x_in.size(1);
  TORCH_CHECK(a.dim() == 2 && a.size(1) == K && a.is_contiguous() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
              "lora_add_: a must be a contiguous float32 or bfloat16 [P*R, K]");
  const int64_t PR = a.size(0);
  TORCH_CHECK(bt.dim() == 2 && bt.size(0) == PR && bt.size(1) == N && bt.is_contiguous() &&
                  bt.scalar_type() == a.scalar_type(),
              "lora_add_: bt must be a contiguous [P*R, N] of a's dtype");
  at::Tensor lam;
  int64_t R = PR;
  if (lam_in.has_value() && lam_in->defined()) {
    lam = lam_in->to(at::kFloat);
    TORCH_CHECK(lam.dim() == 3 && lam.size(0) == M && lam.size(2) > 0 && PR % lam.size(2) == 0 &&
                    (lam.size(1) == 1 || lam.size(1) * lam.size(2) == PR),
                "lora_add_: lam must be [M, 1 or P, R] for ", PR, " adapter rows, got ", lam.sizes());
    R = lam.size(2);
  }
  if (M == 0 || N == 0) return;
  const at::Tensor x = x_in.contiguous();
  MISTRALRS_DISPATCH(x.scalar_type(), "lora_add_x", [&] {
    using xt = scalar_t;
    MISTRALRS_DISPATCH(y.scalar_type(), "lora_add_y", [&] {
      // NOTE: bf16 adapters halve the bytes read a token (X-LoRA under a bf16 base); float32 otherwise
      if (a.scalar_type() == at::kBFloat16)
        lora_rows<xt, scalar_t, c10::BFloat16>(y.data_ptr<scalar_t>(), x.data_ptr<xt>(), a.data_ptr<c10::BFloat16>(),
                                               bt.data_ptr<c10::BFloat16>(), lam, static_cast<float>(constant), M, N,
                                               K, PR, R);
      else
        lora_rows<xt, scalar_t, float>(y.data_ptr<scalar_t>(), x.data_ptr<xt>(), a.data_ptr<float>(),
                                       bt.data_ptr<float>(), lam, static_cast<float>(constant), M, N, K, PR, R);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, bool f32_out=False) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor? lam, float constant) -> ()");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("linear", &linear);
  m.impl("lora_add_", &lora_add_);
}
