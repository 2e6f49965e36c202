// Dense projections of decode steps, alone or with X-LoRA's adapters (bf16/fp16/fp32; w of x's dtype):
//
//   linear(x, w, bias, f32_out)            -> x @ w.T (+ bias)
//   lora_linear(x, w, bias, a, bt, parts, lam, constant, f32_out)
//                                          -> x @ w.T (+ bias) + the adapters' update (below)
//   lora_add_(y, x, a, bt, parts, lam, constant)
//                                          y += the adapters' update, in place (any base: quantized ones)
//
// Results are in x's dtype or, with f32_out, float32, rounded once from float32 accumulators.
//
// For the few rows of a decode step (the model uses these up to 8 rows): a matrix-vector product
// is bound by reading w, and torch's bf16 CPU matmul reads it at well under the memory's speed (one
// row through a 49152 x 576 head: 3.2 ms against 1.3 ms here, 2 threads). Each pass over the weight
// keeps 8 independent accumulators (8 weight rows for one x row, 2 x 4, 4 x 2, 8 x 1) so the loads
// are not serialised behind one add chain, and prefetches the rows ahead (see tile()): together
// about twice the bytes a second of one accumulator, on a decode step's matrices.
// f32_out is for the output head of a bf16 model: bf16 output rounds each logit to 8 bits (a step
// of 0.125 at a logit of 20), which ties or swaps the top tokens greedy decoding picks between. Products of bf16 values are exact in float32,
// so this is the float32 result of the bf16 weights, as llama.cpp's logits are. With AVX-512 BF16,
// vdpbf16ps multiplies 32 pairs per instruction. Rows of w are split across threads in blocks that
// stay in cache while the rows of x pass.
//
// The adapters' update, in the compact layout (X-LoRA's stacked experts; P = 1, or the parts of a
// fused q/k/v or gate/up projection):
//   a  [P*R, K]: part p's stacked A in rows [p*R, (p+1)*R)
//   bt [R, N]:   B transposed; column n holds B's row n of the part whose output rows contain n
//   parts [P, 3] int64: part p covers output rows [parts[p][0], parts[p][1]) (ordered, disjoint;
//                other columns of bt are unused) and reads row parts[p][2] of lam
//   lam [M, L, R] float32: row m of part p is scaled by lam[m, parts[p][2], :] (X-LoRA's per-token
//                scalings in rank space), or by `constant` when lam is None
//   update[m, n] = sum_i (lam[m, parts[p][2], i] * (a[p*R + i] . x[m])) * bt[i, n]   for n in part p
// NOTE: compact, not block-diagonal: a fused projection's B reads only its parts' own columns
// (a third of a [P*R, N] block matrix for q/k/v), and the adapters are read from memory every token.
// `parts` is a tensor, made once per projection: torch's op binding parses a Python int list
// ~2.5 us slower than a tensor, and ~100 projections run per X-LoRA token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace mistralrs;

// out[r * ldo + j] = dot(x[r], w[j]) over K for r < MT, j < NW (x and w rows contiguous, K apart)
template <int MT, int NW, typename T>
inline void tile(const T* x, const T* w, int64_t K, float* out, int64_t ldo) {
  float s[MT][NW] = {};
  int64_t k = 0;
#ifdef MISTRALRS_VEC
  // NOTE: each weight row's next cache line is prefetched 8 rows ahead (~9 KB for K = 576): the
  // hardware prefetcher alone left a decode step's small matrices at about half the memory's speed
  constexpr int PF = 8;
  vfloat acc[MT][NW];
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) acc[r][j] = vzero();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; k + 32 <= K; k += 32) {
      __m512bh wv[NW];
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) {
        __builtin_prefetch(w + (j + PF) * K + k, 0, 3);
        wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MT; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
      }
    }
  }
#endif
  for (; k + kVec <= K; k += kVec) {
    vfloat wv[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      __builtin_prefetch(w + (j + PF) * K + k, 0, 3);
      wv[j] = vload(w + j * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const vfloat xv = vload(x + r * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) acc[r][j] = vfma(xv, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) s[r][j] = vsum(acc[r][j]);
#endif
  for (; k < K; ++k)
    for (int j = 0; j < NW; ++j) {
      const float wk = to_float(w[j * K + k]);
      for (int r = 0; r < MT; ++r) s[r][j] += to_float(x[r * K + k]) * wk;
    }
  for (int r = 0; r < MT; ++r)
    for (int j = 0; j < NW; ++j) out[r * ldo + j] = s[r][j];
}

// out[r * ldo + (n - n0)] = dot(x[r], w[n]) for r < MT, n in [n0, n1)
template <int MT, typename T>
inline void rows_of(const T* x, const T* w, int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int NW = MT == 1 ? 8 : MT <= 2 ? 4 : MT <= 4 ? 2 : 1;  // MT * NW = 8 accumulators of the 32 registers
  int64_t n = n0;
  for (; n + NW <= n1; n += NW) tile<MT, NW>(x, w + n * K, K, out + (n - n0), ldo);
  for (; n < n1; ++n) tile<MT, 1>(x, w + n * K, K, out + (n - n0), ldo);
}

// out[m * ldo + (n - n0)] = dot(x[m], w[n]) for m < M, n in [n0, n1): x rows 8, 4, 2, 1 at a time;
// the w rows [n0, n1) stay in cache for every group after the first
template <typename T>
void gemv(const T* x, int64_t M, const T* w, int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) rows_of<8>(x + m * K, w, K, n0, n1, out + m * ldo, ldo);
  if (M - m >= 4) rows_of<4>(x + m * K, w, K, n0, n1, out + m * ldo, ldo), m += 4;
  if (M - m >= 2) rows_of<2>(x + m * K, w, K, n0, n1, out + m * ldo, ldo), m += 2;
  if (M - m >= 1) rows_of<1>(x + m * K, w, K, n0, n1, out + m * ldo, ldo);
}

// What one projection's adapters need at run time (the layout above); h [M, P*R] holds the scaled
// a @ x of the parts computed so far.
template <typename W>
struct Lora {
  const W* a = nullptr;
  const W* bt = nullptr;
  int64_t P = 0, R = 0, N = 0;
  const int64_t* parts = nullptr;  // [P, 3]: start, end, lam row
  const float* lam = nullptr;      // nullptr: `constant`
  int64_t ls0 = 0, ls1 = 0, ls2 = 0;
  float constant = 0.f;

  int64_t start(int64_t p) const { return parts[3 * p]; }
  int64_t end(int64_t p) const { return parts[3 * p + 1]; }
  bool overlaps(int64_t p, int64_t n0, int64_t n1) const { return start(p) < n1 && end(p) > n0; }

  // h[m, p*R + i] *= part p's scaling of row m
  void scale(float* h, int64_t M, int64_t p) const {
    for (int64_t m = 0; m < M; ++m) {
      float* hp = h + m * P * R + p * R;
      if (lam == nullptr) {
        for (int64_t i = 0; i < R; ++i) hp[i] *= constant;
      } else {
        const float* lp = lam + m * ls0 + parts[3 * p + 2] * ls1;
        for (int64_t i = 0; i < R; ++i) hp[i] *= lp[i * ls2];
      }
    }
  }

  // out[m * ldo + (n - n0)] += update[m, n] for n in [n0, n1)
  void add(const float* h, int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo) const {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t s = std::max(n0, start(p)), e = std::min(n1, end(p));
      for (int64_t m = 0; m < M; ++m) {
        const float* hp = h + m * P * R + p * R;
        float* o = out + m * ldo - n0;
        int64_t n = s;
#ifdef MISTRALRS_VEC
        // NOTE: a vector of outputs at a time kept in a register across the R rank rows
        for (; n + kVec <= e; n += kVec) {
          vfloat acc = vload(o + n);
          for (int64_t i = 0; i < R; ++i) acc = vfma(vset1(hp[i]), vload(bt + i * N + n), acc);
          vstore(o + n, acc);
        }
#endif
        for (; n < e; ++n)
          for (int64_t i = 0; i < R; ++i) o[n] += hp[i] * to_float(bt[i * N + n]);
      }
    }
  }
};

template <typename W>
Lora<W> lora_args(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& parts, const at::Tensor& lam,
                  double constant, int64_t M, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(a.dim() == 2 && a.size(1) == K && a.is_contiguous(), op, ": a must be a contiguous [P*R, K] with K = ",
              K, ", got ", a.sizes());
  TORCH_CHECK(bt.dim() == 2 && bt.size(1) == N && bt.size(0) > 0 && bt.is_contiguous() &&
                  bt.scalar_type() == a.scalar_type(),
              op, ": bt must be a contiguous [R, N] of a's dtype with N = ", N, ", got ", bt.sizes());
  Lora<W> L;
  L.R = bt.size(0), L.N = N;
  TORCH_CHECK(a.size(0) % L.R == 0, op, ": a has ", a.size(0), " rows, not a multiple of R = ", L.R);
  L.P = a.size(0) / L.R;
  TORCH_CHECK(parts.device().is_cpu() && parts.scalar_type() == at::kLong && parts.is_contiguous() &&
                  parts.dim() == 2 && parts.size(0) == L.P && parts.size(1) == 3,
              op, ": parts must be a contiguous int64 [P, 3] (start, end, lam row) for ", L.P, " parts, got ",
              parts.sizes(), " ", parts.scalar_type());
  L.parts = parts.data_ptr<int64_t>();
  for (int64_t p = 0; p < L.P; ++p)
    TORCH_CHECK(L.start(p) >= (p ? L.end(p - 1) : 0) && L.start(p) <= L.end(p) && L.end(p) <= N, op,
                ": parts must cover ordered, disjoint ranges of [0, ", N, "), got [", L.start(p), ", ", L.end(p), ")");
  L.a = a.data_ptr<W>(), L.bt = bt.data_ptr<W>();
  L.constant = static_cast<float>(constant);
  if (lam.defined()) {
    TORCH_CHECK(lam.dim() == 3 && lam.size(0) == M && lam.size(2) == L.R, op, ": lam must be [M, rows, R] = [", M,
                ", rows, ", L.R, "], got ", lam.sizes());
    for (int64_t p = 0; p < L.P; ++p)
      TORCH_CHECK(L.parts[3 * p + 2] >= 0 && L.parts[3 * p + 2] < lam.size(1), op, ": lam row ", L.parts[3 * p + 2],
                  " is out of range for ", lam.sizes());
    L.lam = lam.data_ptr<float>(), L.ls0 = lam.stride(0), L.ls1 = lam.stride(1), L.ls2 = lam.stride(2);
  }
  return L;
}

at::Tensor float_lam(const std::optional<at::Tensor>& lam) {
  return lam.has_value() && lam->defined() ? lam->to(at::kFloat) : at::Tensor();
}

// Prefetches a few byte ranges into L2 a slice at a time, while the weight sweep waits on memory.
class Prefetcher {
 public:
  void add(const void* p, int64_t bytes) {
    if (bytes > 0) ranges_.push_back({static_cast<const char*>(p), bytes}), left_ += (bytes + 63) / 64;
  }
  // issues 1 / steps_left of the lines not yet asked for
  void step(int64_t steps_left) {
    for (int64_t n = (left_ + steps_left - 1) / std::max<int64_t>(1, steps_left); n > 0; --n, --left_) {
      __builtin_prefetch(ranges_[r_].first + off_, 0, 2);
      if ((off_ += 64) >= ranges_[r_].second) ++r_, off_ = 0;
    }
  }

 private:
  std::vector<std::pair<const char*, int64_t>> ranges_;
  int64_t left_ = 0, off_ = 0;
  size_t r_ = 0;
};

// x @ w.T (+ bias) (+ the adapters' update when lora is given), in T or float32
template <typename T>
void project(const T* x, const T* w, const float* bias, int64_t M, int64_t K, int64_t N, void* out, bool f32_out,
             const Lora<T>* lora) {
  // NOTE: a block of ~64 KB of weight rows per step: it stays in L2 while every row tile of x passes
  const int64_t block = std::max<int64_t>(1, 65536 / (K * static_cast<int64_t>(sizeof(T))));
  // NOTE: under ~256k multiply-adds (an adapter's tiny matrices) one thread beats waking the pool
  const int64_t blocks = (N + block - 1) / block, grain = M * N * K < (1 << 18) ? blocks : 1;
  // rows [n0, n1) of every x row from float32 src (row stride ld) to out, with the bias
  auto store = [&](const float* src, int64_t ld, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* sm = src + m * ld;
      if (f32_out) {
        float* dst = static_cast<float*>(out) + m * N;
        for (int64_t n = n0; n < n1; ++n) dst[n] = sm[n - n0] + (bias ? bias[n] : 0.f);
      } else {
        T* dst = static_cast<T*>(out) + m * N;
        for (int64_t n = n0; n < n1; ++n) dst[n] = static_cast<T>(sm[n - n0] + (bias ? bias[n] : 0.f));
      }
    }
  };
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    // this task's output rows [r0, r1); with adapters they are all kept in float32 until the
    // update is added after the sweep, else each block is stored as it is done
    const int64_t r0 = b0 * block, r1 = std::min(N, b1 * block), nr = r1 - r0;
    std::vector<float> acc(M * (lora != nullptr ? nr : block));
    // NOTE: the adapters this task reads (its parts' A rows, its columns of B^T) are fetched into
    // L2 a slice per weight block: they arrive while the sweep over w waits on memory, and the
    // adapters' arithmetic afterwards reads them from cache. Each task computes a @ x for the parts
    // its rows meet (o/down's single part in both threads): no barrier between the threads.
    Prefetcher pf;
    if (lora != nullptr)
      for (int64_t p = 0; p < lora->P; ++p) {
        if (!lora->overlaps(p, r0, r1)) continue;
        pf.add(lora->a + p * lora->R * K, lora->R * K * static_cast<int64_t>(sizeof(T)));
        const int64_t s = std::max(r0, lora->start(p)), e = std::min(r1, lora->end(p));
        for (int64_t i = 0; i < lora->R; ++i) pf.add(lora->bt + i * N + s, (e - s) * static_cast<int64_t>(sizeof(T)));
      }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * block, n1 = std::min(N, n0 + block);
      if (lora != nullptr) {
        gemv(x, M, w, K, n0, n1, acc.data() + (n0 - r0), nr);
        pf.step(b1 - blk);
      } else {
        gemv(x, M, w, K, n0, n1, acc.data(), n1 - n0);
        store(acc.data(), n1 - n0, n0, n1);
      }
    }
    if (lora == nullptr) return;
    const int64_t PR = lora->P * lora->R;
    std::vector<float> h(M * PR);
    for (int64_t p = 0; p < lora->P; ++p) {
      if (!lora->overlaps(p, r0, r1)) continue;
      gemv(x, M, lora->a, K, p * lora->R, (p + 1) * lora->R, h.data() + p * lora->R, PR);
      lora->scale(h.data(), M, p);
    }
    lora->add(h.data(), M, r0, r1, acc.data(), nr);
    store(acc.data(), nr, r0, r1);
  });
}

at::Tensor project_op(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                      bool f32_out, const at::Tensor* a, const at::Tensor* bt, const at::Tensor* parts,
                      const at::Tensor& lam, double constant, const char* op) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), op,
              ": x must be [M, K] and w [N, K], got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), op, ": x and w must share one dtype");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, op, ": bias must be [N]");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  if (a != nullptr) {
    TORCH_CHECK(a->device().is_cpu() && bt->device().is_cpu() && (!lam.defined() || lam.device().is_cpu()), op,
                ": CPU tensors only");
    TORCH_CHECK(a->scalar_type() == x.scalar_type(), op, ": a and bt must have x's dtype (", x.scalar_type(),
                "), got ", a->scalar_type());
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(f32_out ? at::kFloat : x.scalar_type()));
  if (M == 0 || N == 0) return out;
  MISTRALRS_DISPATCH(x.scalar_type(), "project", [&] {
    std::optional<Lora<scalar_t>> lora;
    if (a != nullptr) lora = lora_args<scalar_t>(*a, *bt, *parts, lam, constant, M, N, K, op);
    project<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
                      M, K, N, out.data_ptr(), f32_out, lora ? &*lora : nullptr);
  });
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool f32_out) {
  return project_op(x, w, bias, f32_out, nullptr, nullptr, nullptr, at::Tensor(), 0.0, "linear");
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       const at::Tensor& a, const at::Tensor& bt, const at::Tensor& parts,
                       const std::optional<at::Tensor>& lam, double constant, bool f32_out) {
  return project_op(x, w, bias, f32_out, &a, &bt, &parts, float_lam(lam), constant, "lora_linear");
}

// y[m] += the adapters' update for each row m, for any y (a quantized base's output) and float32 or
// bf16 adapters (of any x dtype); float32 inside, y rounded once.
template <typename T, typename Y, typename W>
void lora_rows(Y* y, const T* x, const Lora<W>& L, int64_t M, int64_t N, int64_t K) {
  const int64_t PR = L.P * L.R;
  std::vector<float> xf(M * K), h(M * PR);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(x[i]);
  // NOTE: the adapters are read from memory each token (up to ~1 MB a layer): both stages are split
  // across the threads when there is enough of them to share
  at::parallel_for(0, PR, std::max<int64_t>(1, 16384 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = j0; j < j1; ++j) h[m * PR + j] = dot(xf.data() + m * K, L.a + j * K, K);
  });
  for (int64_t p = 0; p < L.P; ++p) L.scale(h.data(), M, p);
  at::parallel_for(0, N, std::max<int64_t>(64, 16384 / L.R), [&](int64_t n0, int64_t n1) {
    std::vector<float> yf(M * (n1 - n0));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yf[m * (n1 - n0) + n - n0] = to_float(y[m * N + n]);
    L.add(h.data(), M, n0, n1, yf.data(), n1 - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] = static_cast<Y>(yf[m * (n1 - n0) + n - n0]);
  });
}

void lora_add_(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt,
               const at::Tensor& parts, const std::optional<at::Tensor>& lam_in, double constant) {
  for (const at::Tensor* t : {&x_in, &a, &bt}) TORCH_CHECK(t->device().is_cpu(), "lora_add_: CPU tensors only");
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.is_contiguous(), "lora_add_: y must be a contiguous [M, N]");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == M, "lora_add_: x must be [M, K]");
  const int64_t K = x_in.size(1);
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "lora_add_: a and bt must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous(), lam = float_lam(lam_in);
  TORCH_CHECK(!lam.defined() || lam.device().is_cpu(), "lora_add_: CPU tensors only");
  auto run = [&](auto w_tag) {
    using W = decltype(w_tag);
    const Lora<W> L = lora_args<W>(a, bt, parts, lam, constant, M, N, K, "lora_add_");
    if (M == 0 || N == 0) return;
    MISTRALRS_DISPATCH(x.scalar_type(), "lora_add_x", [&] {
      using xt = scalar_t;
      MISTRALRS_DISPATCH(y.scalar_type(), "lora_add_y", [&] {
        lora_rows<xt, scalar_t, W>(y.data_ptr<scalar_t>(), x.data_ptr<xt>(), L, M, N, K);
      });
    });
  };
  // NOTE: bf16 adapters halve the bytes read a token (X-LoRA under a bf16 base); float32 otherwise
  if (a.scalar_type() == at::kBFloat16)
    run(c10::BFloat16());
  else
    run(float());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, bool f32_out=False) -> Tensor");
  m.def("lora_linear(Tensor x, Tensor w, Tensor? bias, Tensor a, Tensor bt, Tensor parts, Tensor? lam, "
        "float constant, bool f32_out=False) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor parts, Tensor? lam, float constant) -> ()");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("linear", &linear);
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_add_", &lora_add_);
}
