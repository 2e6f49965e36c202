// Decode attention for the CPU: rope, the KV cache write and single-query attention in one op.
//
//   decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, positions, window, scale) -> [B, H, hd]
//
//   q: [B, H, hd]; k, v: [B, Hk, hd]: this step's projections of B decoding sequences, before rope
//      (any row strides, the last dim contiguous: views into the fused qkv projection work);
//   cos, sin: [B, hd]: the rope tables at each row's position, sin signed as layers.Rotary stores
//      it (rotate-half layout: x' = x * cos + roll(x, hd/2) * sin);
//   k_cache, v_cache: [S, Hk, P, hd] contiguous; the rotated k and v of row b are written at
//      [slots[b], :, positions[b]], then query b attends to keys [lo, positions[b]] of its slot,
//      lo = positions[b] + 1 - window with a sliding window (window > 0), else 0;
//   skip_slot: rows in this slot (padding rows of a bucketed batch, >= 0) are skipped: no cache
//      write, zero output.
//
// Query heads are grouped under their kv head (GQA): one work item per (sequence, kv head) loads
// each key and value once for the G = H / Hk queries that share it. Scores and softmax are float32,
// and the output is rounded once. Torch needs ~15 ops for the same (rope, two cache writes, two
// batched matmuls, a mask, a softmax and the casts), and its bf16 batched matmul for a single query
// row costs more than the arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace mistralrs;

// x' = x * cos + roll(x, hd/2) * sin, in float
template <typename T>
inline void rope(const T* x, const float* cos, const float* sin, int64_t hd, float* out) {
  const int64_t h2 = hd / 2;
  for (int64_t i = 0; i < hd; ++i) out[i] = to_float(x[i]) * cos[i] + to_float(x[i < h2 ? i + h2 : i - h2]) * sin[i];
}

template <typename T>
void attend_one(const T* q, int64_t q_head_stride, const T* k, const T* v, int64_t G, int64_t hd, const float* cos, const float* sin,
                T* kc, T* vc, const T* keys, const T* vals, int64_t lo, int64_t n, float scale, T* out,
                std::vector<float>& buf) {
  // buf: q [G, hd], the rotated key [hd], scores [G, n], output accumulators [G, hd]
  buf.resize(static_cast<size_t>(2 * G * hd + hd + G * n));
  float* qf = buf.data();
  float* kf = qf + G * hd;
  float* sc = kf + hd;
  float* acc = sc + G * n;
  rope(k, cos, sin, hd, kf);
  for (int64_t i = 0; i < hd; ++i) {
    kc[i] = static_cast<T>(kf[i]);
    vc[i] = v[i];
  }
  for (int64_t g = 0; g < G; ++g) {
    rope(q + g * q_head_stride, cos, sin, hd, qf + g * hd);
    for (int64_t i = 0; i < hd; ++i) qf[g * hd + i] *= scale;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = keys + (lo + j) * hd;
    for (int64_t g = 0; g < G; ++g) sc[g * n + j] = dot(qf + g * hd, kr, hd);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * n;
    const float m = *std::max_element(s, s + n);
    const float inv = 1.f / exp_sub_sum(s, m, n);
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
  std::fill(acc, acc + G * hd, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = vals + (lo + j) * hd;
    for (int64_t g = 0; g < G; ++g) axpy(acc + g * hd, sc[g * n + j], vr, hd);
  }
  for (int64_t i = 0; i < G * hd; ++i) out[i] = static_cast<T>(acc[i]);
}

void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t heads, int64_t hd) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == heads && t.size(2) == hd && t.stride(2) == 1,
              "decode_attention: ", name, " must be [", B, ", ", heads, ", ", hd, "] with a contiguous last dim, got ",
              t.sizes(), " strides ", t.strides());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_in,
                            const at::Tensor& sin_in, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots_in,
                            const at::Tensor& positions_in, int64_t window, double scale, int64_t skip_slot) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cos_in, &sin_in, &k_cache, &v_cache, &slots_in, &positions_in})
    TORCH_CHECK(t->device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "decode_attention: the caches must be contiguous [slots, Hk, P, hd], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t S = k_cache.size(0), Hk = k_cache.size(1), P = k_cache.size(2), hd = k_cache.size(3);
  const int64_t B = q.size(0), H = q.dim() == 3 ? q.size(1) : 0;
  TORCH_CHECK(Hk > 0 && H % Hk == 0 && hd % 2 == 0, "decode_attention: ", H, " query heads for ", Hk,
              " kv heads of dim ", hd);
  check_rows(q, "q", B, H, hd);
  check_rows(k, "k", B, Hk, hd);
  check_rows(v, "v", B, Hk, hd);
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && k_cache.scalar_type() == dt &&
                  v_cache.scalar_type() == dt,
              "decode_attention: q, k, v and the caches must share one dtype");
  const at::Tensor cos = cos_in.reshape({-1, hd}).to(at::kFloat).contiguous();
  const at::Tensor sin = sin_in.reshape({-1, hd}).to(at::kFloat).contiguous();
  TORCH_CHECK(cos.size(0) == B && sin.size(0) == B, "decode_attention: cos and sin must be [B, hd]");
  const at::Tensor slots = slots_in.to(at::kLong).contiguous(), positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == B && positions.numel() == B, "decode_attention: slots and positions must be [B]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  int64_t longest = 0;
  std::vector<char> seen(S, 0);  // NOTE: a slot written by two rows at once would be a data race
  for (int64_t b = 0; b < B; ++b) {
    if (sp[b] == skip_slot) continue;
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S && pp[b] >= 0 && pp[b] < P, "decode_attention: row ", b, " has slot ",
                sp[b], " and position ", pp[b], " outside a cache of ", S, " slots x ", P, " positions");
    TORCH_CHECK(!seen[sp[b]], "decode_attention: slot ", sp[b], " appears twice in one step");
    seen[sp[b]] = 1;
    longest = std::max(longest, pp[b] + 1);
  }
  const int64_t G = H / Hk;
  at::Tensor out = at::empty({B, H, hd}, q.options());
  if (B == 0) return out;
  MISTRALRS_DISPATCH(dt, "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* kcp = k_cache.data_ptr<scalar_t>();
    scalar_t* vcp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* snp = sin.data_ptr<float>();
    // NOTE: ~4 G hd flops per key; a task of fewer than ~64k flops is not worth a thread
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 4 * G * hd * std::min(longest, window > 0 ? window : longest)));
    at::parallel_for(0, B * Hk, grain, [&](int64_t a, int64_t e) {
      std::vector<float> buf;
      for (int64_t item = a; item < e; ++item) {
        const int64_t b = item / Hk, h = item % Hk, p = pp[b];
        if (sp[b] == skip_slot) {
          std::fill(op + (b * H + h * G) * hd, op + (b * H + (h + 1) * G) * hd, scalar_t(0));
          continue;
        }
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
        const int64_t head = (sp[b] * Hk + h) * P * hd;
        attend_one(qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                   vp + b * v.stride(0) + h * v.stride(1), G, hd, cp + b * hd, snp + b * hd, kcp + head + p * hd,
                   vcp + head + p * hd, kcp + head, vcp + head, lo, p + 1 - lo, static_cast<float>(scale),
                   op + (b * H + h * G) * hd, buf);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor positions, int window, float scale, int skip_slot=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
