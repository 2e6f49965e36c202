// Decode attention for the CPU: rope, the KV cache write and single-query attention in one op.
//
//   decode_attention(q, k, v, cos, sin, k_cache, v_cache, tables, positions, window, scale, skip_block) -> [B, H, hd]
//
//   q: [B, H, hd]; k, v: [B, Hk, hd]: this step's projections of B decoding sequences, before rope
//      (any row strides, the last dim contiguous: views into the fused qkv projection work);
//   cos, sin: [B, hd]: the rope tables at each row's position, sin signed as layers.Rotary stores
//      it (rotate-half layout: x' = x * cos + roll(x, hd/2) * sin);
//   k_cache, v_cache: [NB, Hk, BS, hd], paged: each block contiguous, any stride between blocks
//      (per-layer views of the engine's block-major buffer);
//   tables: [B, T] block tables: position j of row b is at block tables[b][j / BS], offset j % BS.
//      The rotated k and v of row b are written at position positions[b], then query b attends to
//      its keys [lo, positions[b]], lo = positions[b] + 1 - window with a sliding window (window > 0),
//      else 0;
//   skip_block: rows whose position lies in this block (padding rows of a bucketed batch, >= 0) are
//      skipped: no cache write, zero output.
//
// Query heads are grouped under their kv head (GQA): one work item per (sequence, kv head) loads
// each key and value once for the G = H / Hk queries that share it. Scores and softmax are float32,
// and the output is rounded once. Torch needs ~15 ops for the same (rope, two cache writes, a
// gather through the tables, two batched matmuls, a mask, a softmax and the casts), and its bf16
// batched matmul for a single query row costs more than the arithmetic.
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

// Keys of one (sequence, kv head) through its block table: key j is at base + table[j / bs] *
// block_stride + j % bs * hd.
template <typename T>
struct Paged {
  const T* base;
  const int64_t* table;
  int64_t block_stride, bs, hd;
  const T* row(int64_t j) const { return base + table[j / bs] * block_stride + (j % bs) * hd; }
};

#ifdef MISTRALRS_VEC
// out[0 : NV * kVec] = sum_j p[j] * value j [off : off + NV * kVec], the accumulators held in
// registers across the keys (an axpy per key would load and store them every time); each output
// sums the keys in the same order as the axpy loop, so the result is the same.
template <int NV, typename T>
void weighted_values(const float* p, const Paged<T>& vals, int64_t lo, int64_t n, int64_t off, float* out) {
  vfloat acc[NV];
  for (int t = 0; t < NV; ++t) acc[t] = vzero();
  for (int64_t j = 0; j < n;) {
    const int64_t pos = lo + j, run = std::min(n - j, vals.bs - pos % vals.bs);
    const T* vr = vals.row(pos) + off;
    for (int64_t r = 0; r < run; ++r, vr += vals.hd) {
      const vfloat c = vset1(p[j + r]);
      for (int t = 0; t < NV; ++t) acc[t] = vfma(c, vload(vr + t * kVec), acc[t]);
    }
    j += run;
  }
  for (int t = 0; t < NV; ++t) vstore(out + t * kVec, acc[t]);
}
#endif

template <typename T>
void attend_one(const T* q, int64_t q_head_stride, const T* k, const T* v, int64_t G, int64_t hd, const float* cos, const float* sin,
                T* kc, T* vc, const Paged<T>& keys, const Paged<T>& vals, int64_t lo, int64_t n, float scale, T* out,
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
  // NOTE: block by block: within a block the keys are consecutive rows
  const int64_t bs = keys.bs;
  for (int64_t j = 0; j < n;) {
    const int64_t pos = lo + j, run = std::min(n - j, bs - pos % bs);
    const T* kr = keys.row(pos);
    int64_t r = 0;
#ifdef MISTRALRS_VEC
    if (hd % kVec == 0)  // four keys at a time: one reduction step for four scores
      for (; r + 4 <= run; r += 4, kr += 4 * hd)
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + g * hd;
          vfloat a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
          for (int64_t i = 0; i < hd; i += kVec) {
            const vfloat qv = vload(qg + i);
            a0 = vfma(qv, vload(kr + i), a0);
            a1 = vfma(qv, vload(kr + hd + i), a1);
            a2 = vfma(qv, vload(kr + 2 * hd + i), a2);
            a3 = vfma(qv, vload(kr + 3 * hd + i), a3);
          }
          float s4[4];
          vsum4(a0, a1, a2, a3, s4);
          std::copy(s4, s4 + 4, sc + g * n + j + r);
        }
#endif
    for (; r < run; ++r, kr += hd)
      for (int64_t g = 0; g < G; ++g) sc[g * n + j + r] = dot(qf + g * hd, kr, hd);
    j += run;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * n;
    const float m = *std::max_element(s, s + n);
    const float inv = 1.f / exp_sub_sum(s, m, n);
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
  int64_t done = 0;  // leading dims of every head's output computed in registers
#ifdef MISTRALRS_VEC
  for (int64_t g = 0; g < G; ++g) {
    const float* p = sc + g * n;
    float* o = acc + g * hd;
    int64_t off = 0;
    for (; off + 8 * kVec <= hd; off += 8 * kVec) weighted_values<8>(p, vals, lo, n, off, o + off);
    if (off + 4 * kVec <= hd) weighted_values<4>(p, vals, lo, n, off, o + off), off += 4 * kVec;
    if (off + 2 * kVec <= hd) weighted_values<2>(p, vals, lo, n, off, o + off), off += 2 * kVec;
    if (off + kVec <= hd) weighted_values<1>(p, vals, lo, n, off, o + off), off += kVec;
    done = off;
  }
#endif
  if (done < hd) {  // the rest of each head (dims past the last full vector, or no vectors at all)
    for (int64_t g = 0; g < G; ++g) std::fill(acc + g * hd + done, acc + (g + 1) * hd, 0.f);
    for (int64_t j = 0; j < n;) {
      const int64_t pos = lo + j, run = std::min(n - j, bs - pos % bs);
      const T* vr = vals.row(pos);
      for (int64_t r = 0; r < run; ++r, vr += hd)
        for (int64_t g = 0; g < G; ++g) axpy(acc + g * hd + done, sc[g * n + j + r], vr + done, hd - done);
      j += run;
    }
  }
  for (int64_t i = 0; i < G * hd; ++i) out[i] = static_cast<T>(acc[i]);
}

void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t heads, int64_t hd) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == heads && t.size(2) == hd && t.stride(2) == 1,
              "decode_attention: ", name, " must be [", B, ", ", heads, ", ", hd, "] with a contiguous last dim, got ",
              t.sizes(), " strides ", t.strides());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_in,
                            const at::Tensor& sin_in, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& tables_in,
                            const at::Tensor& positions_in, int64_t window, double scale, int64_t skip_block) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cos_in, &sin_in, &k_cache, &v_cache, &tables_in, &positions_in})
    TORCH_CHECK(t->device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: the caches must be [blocks, Hk, block_size, hd] alike, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t NB = k_cache.size(0), Hk = k_cache.size(1), BS = k_cache.size(2), hd = k_cache.size(3);
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->stride(3) == 1 && c->stride(2) == hd && c->stride(1) == BS * hd,
                "decode_attention: each cache block must be contiguous, got strides ", c->strides());
  const int64_t k_stride = k_cache.stride(0), v_stride = v_cache.stride(0);
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
  const at::Tensor tables = tables_in.to(at::kLong).contiguous(), positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && positions.numel() == B,
              "decode_attention: tables must be [B, T] and positions [B]");
  const int64_t T = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  int64_t longest = 0;
  std::vector<char> skip(B, 0);
  std::vector<int64_t> written;  // NOTE: a position written by two rows at once would be a data race
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pp[b];
    TORCH_CHECK(p >= 0 && p / BS < T, "decode_attention: row ", b, " has position ", p, " outside its table of ", T,
                " blocks of ", BS);
    const int64_t* row = tp + b * T;
    if (row[p / BS] == skip_block) {
      skip[b] = 1;
      continue;
    }
    for (int64_t i = 0; i <= p / BS; ++i)
      TORCH_CHECK(row[i] >= 0 && row[i] < NB, "decode_attention: row ", b, " reads block ", row[i], " of ", NB);
    written.push_back(row[p / BS] * BS + p % BS);
    longest = std::max(longest, p + 1);
  }
  std::sort(written.begin(), written.end());
  TORCH_CHECK(std::adjacent_find(written.begin(), written.end()) == written.end(),
              "decode_attention: two rows write the same cache position in one step");
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
        if (skip[b]) {
          std::fill(op + (b * H + h * G) * hd, op + (b * H + (h + 1) * G) * hd, scalar_t(0));
          continue;
        }
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
        const int64_t* row = tp + b * T;
        const int64_t head = h * BS * hd, at = head + (p % BS) * hd;
        const Paged<scalar_t> keys{kcp + head, row, k_stride, BS, hd}, vals{vcp + head, row, v_stride, BS, hd};
        attend_one(qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                   vp + b * v.stride(0) + h * v.stride(1), G, hd, cp + b * hd, snp + b * hd,
                   kcp + row[p / BS] * k_stride + at, vcp + row[p / BS] * v_stride + at, keys, vals, lo, p + 1 - lo,
                   static_cast<float>(scale), op + (b * H + h * G) * hd, buf);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistralrs, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor tables, Tensor positions, int window, float scale, int skip_block=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
