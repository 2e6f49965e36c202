// Quantized matmuls for the CPU: y[M, N] = x[M, K] @ W[N, K].T with W kept at 4 or 8 bits.
//
// The activations are quantized to int8 per block of 32 (as llama.cpp does), and AVX-512 VNNI's
// vpdpbusd multiplies 4 bytes by 4 bytes and adds them into an int32 lane, 16 lanes at a time.
// The weights are interleaved so that the 16 lanes are 16 *output rows*: one vpdpbusd takes 4
// consecutive weights of 16 rows against the same 4 activations (broadcast), and the 8 of them
// that cover a 32-block add into one int32 accumulator, scaled once per block. No horizontal sums.
//
// Each 32-block b of weight row n has a scale d[n, b] and an offset term mw[n, b]:
//
//   y[m, n] = sum_b d[n, b] * dx[m, b] * dot(wq[n, b], xq[m, b])  +  sum_b mw[n, b] * xs[m, b]
//
//   bits 4: wq = codes 0..15 (unsigned), xq signed int8;  mw = the block's min (Q4_1), -8 d (Q4_0)
//           or a K-quant's Z;  xs = dx * sum(xq).  So w = d * q + mw exactly.
//   bits 8: wq signed int8, xq stored as unsigned xq + 128 (vpdpbusd wants one unsigned side);
//           mw = -128 * d * sum(wq) undoes the +128;  xs = dx.  (The AVX2 kernel below keeps xq
//           signed and sets xs = 0: same weights, no offset term.)
//
// On a CPU with AVX2 but no AVX-512 VNNI the same layout is multiplied 8 rows at a time with
// vpmaddubsw + vpmaddwd (see the AVX2 kernel's comment).
//
// Weight layout (packed by mistralrs_py/models/qmatmul.py), rows in groups of 16 (N % 16 == 0):
//   bits 4: qs uint8 [N/16, K/8, 64]: byte 4i+t holds w[16g+i, 8c+t] in its low nibble and
//           w[16g+i, 8c+4+t] in its high nibble (one AND, one shift: two vpdpbusd operands).
//   bits 8: qs int8 [N/16, K/4, 64]: byte 4i+t is w[16g+i, 4c+t].
//   d: float16 [N/16, K/32, 16]; mw: float16 (bits 4) or float32 (bits 8, a large term that
//   cancels against the +128: fp16 would lose it) [N/16, K/32, 16].
// Row groups are split across torch's intra-op threads (at::parallel_for uses the same OpenMP pool
// as every other op, so no second pool competes for the cores).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define MISTRALRS_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MISTRALRS_QMM_AVX2 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
// rows of x sharing one pass over a weight group: 2 registers a row (AVX-512), 2 a row and half of
// the group at a time (AVX2, which has 16 registers, not 32)
#ifdef __AVX512F__
constexpr int kTile = 8;
#else
constexpr int kTile = 4;
#endif
constexpr int64_t kPrefetch = 2;  // weight groups of 16 rows read ahead

// The instruction set the kernel was built for ("" when none).
const char* isa() {
#if defined(MISTRALRS_VNNI)
  return "avx512-vnni";
#elif defined(MISTRALRS_QMM_AVX2)
  return "avx2";
#else
  return "";
#endif
}

bool supported() { return isa()[0] != 0; }

#ifdef MISTRALRS_VNNI
constexpr bool kUnsigned8 = true;  // vpdpbusd: the 8-bit kernel's activations go unsigned (+128)
#else
constexpr bool kUnsigned8 = false;  // AVX2 multiplies signed by signed (vpsignb): no offset term
#endif

// One row of activations quantized per 32-block: q (int8, or uint8 = q + 128 when bits == 8 on
// AVX-512 VNNI), dx = amax / 127, and xs = dx * sum(q) (bits 4), dx (bits 8, VNNI: the offset term
// undoes the +128) or 0 (bits 8, AVX2: no +128, so the offset term must not count).
// 8 values at a time where AVX2 is (not for double), with the scalar loop's exact results: the same
// amax, the same product v * id, and vcvtps2dq rounding half to even as nearbyint does.
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* dx, float* xs, int bits) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const T* xb = x + b * kBlock;
    int8_t* qb = q + b * kBlock;
    int32_t sum = 0;
    float d;
#ifdef MISTRALRS_HAS_AVX2
    if constexpr (!std::is_same_v<T, double>) {
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 v[4], m = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = mistralrs::load8(xb + 8 * j);
        m = _mm256_max_ps(m, _mm256_and_ps(v[j], abs_mask));
      }
      d = mistralrs::hmax8(m) / 127.f;
      const __m256 iv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      __m256i r[4];
      for (int j = 0; j < 4; ++j) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], iv));
      const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
      // int32 -> int8 (|r| <= 127: no saturation); packs work within 128-bit halves, so reorder after
      __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
      p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      if (bits == 8 && kUnsigned8) p = _mm256_xor_si256(p, _mm256_set1_epi8(static_cast<char>(0x80)));  // NOTE: +128
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p);
    } else
#endif
    {
      float v[kBlock], amax = 0.f;
      for (int i = 0; i < kBlock; ++i) {
        v[i] = static_cast<float>(xb[i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      for (int i = 0; i < kBlock; ++i) {
        const int r = static_cast<int>(std::nearbyint(v[i] * id));  // half to even
        sum += r;
        qb[i] = static_cast<int8_t>(bits == 8 && kUnsigned8 ? (r ^ 0x80) : r);  // NOTE: ^0x80 == +128
      }
    }
    dx[b] = d;
    xs[b] = bits == 8 ? (kUnsigned8 ? d : 0.f) : d * static_cast<float>(sum);
  }
}

#ifdef MISTRALRS_VNNI
inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// rows [m0, m0 + MT) of x against the 16 weight rows of one group; out: [MT][16] floats.
template <int BITS, int MT>
void group_rows(const uint8_t* wq, const at::Half* dw, const void* mw, int64_t K, const int8_t* xq,
                const float* dx, const float* xs, int64_t m0, float* out) {
  const int64_t NB = K / kBlock;
  // NOTE: the weights of the group kPrefetch groups ahead (same offset) are prefetched as this one
  // is read: the hardware prefetcher alone leaves a decode step's matrices well under the memory's
  // speed. Past the last group it touches nothing that faults (prefetches never do).
  const int64_t ahead = kPrefetch * 16 * K * BITS / 8;
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  __m512 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    __m512i ai[MT];
    for (int r = 0; r < MT; ++r) ai[r] = _mm512_setzero_si512();
    if (BITS == 4) {
      const uint8_t* w = wq + b * 4 * 64;  // 4 chunks of 8 k per block
      for (int c = 0; c < 4; ++c) {
        __builtin_prefetch(w + ahead + c * 64, 0, 3);
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        const __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
        for (int r = 0; r < MT; ++r) {
          const int8_t* xr = xq + (m0 + r) * K + b * kBlock + c * 8;
          ai[r] = _mm512_dpbusd_epi32(ai[r], lo, bcast4(xr));
          ai[r] = _mm512_dpbusd_epi32(ai[r], hi, bcast4(xr + 4));
        }
      }
    } else {
      const uint8_t* w = wq + b * 8 * 64;  // 8 chunks of 4 k per block
      for (int c = 0; c < 8; ++c) {
        __builtin_prefetch(w + ahead + c * 64, 0, 3);
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        for (int r = 0; r < MT; ++r)
          ai[r] = _mm512_dpbusd_epi32(ai[r], bcast4(xq + (m0 + r) * K + b * kBlock + c * 4), v);
      }
    }
    if ((b & 1) == 0) {  // a group's d and mw: 32 bytes (fp16) or 64 (fp32) a block
      __builtin_prefetch(dw + b * 16 + kPrefetch * NB * 16, 0, 3);
      __builtin_prefetch(static_cast<const char*>(mw) + (b + kPrefetch * NB) * 16 * (BITS == 4 ? 2 : 4), 0, 3);
      if (BITS == 8) __builtin_prefetch(static_cast<const char*>(mw) + (b + 1 + kPrefetch * NB) * 64, 0, 3);
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dw + b * 16)));
    const __m512 mv = BITS == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                      static_cast<const at::Half*>(mw) + b * 16)))
                                : _mm512_loadu_ps(static_cast<const float*>(mw) + b * 16);
    for (int r = 0; r < MT; ++r) {
      const int64_t i = (m0 + r) * NB + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r]), _mm512_mul_ps(dv, _mm512_set1_ps(dx[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[i]), acc[r]);
    }
  }
  for (int r = 0; r < MT; ++r) _mm512_storeu_ps(out + r * 16, acc[r]);
}
#endif  // MISTRALRS_VNNI

#ifdef MISTRALRS_QMM_AVX2
// AVX2 has no vpdpbusd: vpmaddubsw multiplies unsigned by signed bytes into pairs summed as int16,
// vpmaddwd by ones sums those pairs into int32 (the 4 bytes of one lane: one row's 4 weights).
// A 256-bit register holds half a 64-byte chunk: 8 of the group's 16 rows. Each half is one pass
// over the group's blocks (the second pass reads the group from L1), which keeps the accumulators
// of up to 4 rows of x in registers.
//   bits 4: codes 0..15 times int8: a pair is at most 2 * 15 * 127, so a block's 8 vpmaddubsw
//           results add up in int16 (at most 30480) before one vpmaddwd.
//   bits 8: signed times signed as |w| times (x with w's sign), llama.cpp's trick: a pair is at
//           most 2 * 128 * 127 = 32512, so each chunk goes to int32 at once.
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int BITS, int MT>
void group_rows(const uint8_t* wq, const at::Half* dw, const void* mw, int64_t K, const int8_t* xq,
                const float* dx, const float* xs, int64_t m0, float* out) {
  const int64_t NB = K / kBlock;
  const int64_t ahead = kPrefetch * 16 * K * BITS / 8;  // as the AVX-512 kernel: groups ahead
  const __m256i lo4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MT];
    for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      __m256i ai[MT];
      if (BITS == 4) {
        __m256i s[MT];
        for (int r = 0; r < MT; ++r) s[r] = _mm256_setzero_si256();
        const uint8_t* w = wq + b * 4 * 64 + 32 * h;
        for (int c = 0; c < 4; ++c) {
          if (h == 0) __builtin_prefetch(w + ahead + c * 64, 0, 3);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 64));
          const __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
          for (int r = 0; r < MT; ++r) {
            const int8_t* xr = xq + (m0 + r) * K + b * kBlock + c * 8;
            s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(lo, bcast4(xr)));
            s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(hi, bcast4(xr + 4)));
          }
        }
        for (int r = 0; r < MT; ++r) ai[r] = _mm256_madd_epi16(s[r], ones);
      } else {
        for (int r = 0; r < MT; ++r) ai[r] = _mm256_setzero_si256();
        const uint8_t* w = wq + b * 8 * 64 + 32 * h;
        for (int c = 0; c < 8; ++c) {
          if (h == 0) __builtin_prefetch(w + ahead + c * 64, 0, 3);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 64));
          const __m256i av = _mm256_sign_epi8(v, v);  // |w| (-128 stays 0x80: 128 unsigned)
          for (int r = 0; r < MT; ++r) {
            const __m256i sx = _mm256_sign_epi8(bcast4(xq + (m0 + r) * K + b * kBlock + c * 4), v);
            ai[r] = _mm256_add_epi32(ai[r], _mm256_madd_epi16(_mm256_maddubs_epi16(av, sx), ones));
          }
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw + b * 16 + 8 * h)));
      for (int r = 0; r < MT; ++r) {
        const int64_t i = (m0 + r) * NB + b;
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[r]), _mm256_mul_ps(dv, _mm256_set1_ps(dx[i])), acc[r]);
      }
      if (BITS == 4) {  // NOTE: bits 8 has no offset term here (xs == 0: no +128 to undo)
        const __m256 mv = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const at::Half*>(mw) + b * 16 + 8 * h)));
        for (int r = 0; r < MT; ++r) acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[(m0 + r) * NB + b]), acc[r]);
      }
    }
    for (int r = 0; r < MT; ++r) _mm256_storeu_ps(out + r * 16 + 8 * h, acc[r]);
  }
}
#endif  // MISTRALRS_QMM_AVX2

#if defined(MISTRALRS_VNNI) || defined(MISTRALRS_QMM_AVX2)
template <int BITS>
void group_tile(int mt, const uint8_t* wq, const at::Half* dw, const void* mw, int64_t K, const int8_t* xq,
                const float* dx, const float* xs, int64_t m0, float* out) {
  switch (mt) {  // NOTE: a compile-time tile keeps the accumulators in registers
    case 1: return group_rows<BITS, 1>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 2: return group_rows<BITS, 2>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 3: return group_rows<BITS, 3>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 4: return group_rows<BITS, 4>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 5: return group_rows<BITS, 5>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 6: return group_rows<BITS, 6>(wq, dw, mw, K, xq, dx, xs, m0, out);
    case 7: return group_rows<BITS, 7>(wq, dw, mw, K, xq, dx, xs, m0, out);
    default: return group_rows<BITS, 8>(wq, dw, mw, K, xq, dx, xs, m0, out);
  }
}
#endif

void check_weights(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& mw, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(K % kBlock == 0, "qmm: in_features must be a multiple of 32, got ", K);
  const int64_t G = qs.size(0);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) == 16 * K * bits / 8 &&
                  qs.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "qmm: bad packed weight");
  TORCH_CHECK(d.sizes() == at::IntArrayRef({G, K / kBlock, 16}) && d.is_contiguous() && d.scalar_type() == at::kHalf,
              "qmm: bad scales");
  TORCH_CHECK(mw.sizes() == at::IntArrayRef({G, K / kBlock, 16}) && mw.is_contiguous() &&
                  mw.scalar_type() == (bits == 4 ? at::kHalf : at::kFloat),
              "qmm: bad offsets");
}

// x: [M, K] float/bfloat16/float16; qs: [N/16, 16 K bits/8]; d, mw: [N/16, K/32, 16] -> [M, N] in x's
// dtype, or in float32 with f32_out (the output head: logits not rounded to bf16)
at::Tensor qmm(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& mw, int64_t bits,
               bool f32_out) {
  TORCH_CHECK(supported(), "qmm: built without AVX-512 VNNI or AVX2");
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "qmm: x must be a 2-D CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = qs.size(0), N = 16 * G, NB = K / kBlock;
  check_weights(qs, d, mw, bits, K);
  at::Tensor out = at::empty({M, N}, f32_out ? x.options().dtype(at::kFloat) : x.options());
  if (M == 0 || N == 0) return out;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * NB), xs(M * NB);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qmm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t a, int64_t e) {
      for (int64_t m = a; m < e; ++m)
        quantize_row(xp + m * K, K, xq.data() + m * K, dx.data() + m * NB, xs.data() + m * NB, static_cast<int>(bits));
    });
#if defined(MISTRALRS_VNNI) || defined(MISTRALRS_QMM_AVX2)
    scalar_t* op = f32_out ? nullptr : out.data_ptr<scalar_t>();
    float* fp = f32_out ? out.data_ptr<float>() : nullptr;
    const uint8_t* wp = static_cast<const uint8_t*>(qs.data_ptr());
    const int64_t group_bytes = 16 * K * bits / 8;
    const at::Half* dp = d.data_ptr<at::Half>();
    const char* mp = static_cast<const char*>(mw.data_ptr());
    const int64_t mw_group = NB * 16 * (bits == 4 ? 2 : 4);
    // NOTE: >= ~16 KB of weights (times the row tiles) per task keeps OpenMP's overhead small
    const int64_t tiles = (M + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, 16384 / group_bytes / tiles);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      float tmp[kTile * 16];
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t m0 = 0; m0 < M; m0 += kTile) {
          const int mt = static_cast<int>(std::min<int64_t>(kTile, M - m0));
          if (bits == 4)
            group_tile<4>(mt, wp + g * group_bytes, dp + g * NB * 16, mp + g * mw_group, K, xq.data(), dx.data(),
                          xs.data(), m0, tmp);
          else
            group_tile<8>(mt, wp + g * group_bytes, dp + g * NB * 16, mp + g * mw_group, K, xq.data(), dx.data(),
                          xs.data(), m0, tmp);
          for (int r = 0; r < mt; ++r)
            for (int i = 0; i < 16; ++i) {
              const int64_t o = (m0 + r) * N + g * 16 + i;
              if (fp) fp[o] = tmp[r * 16 + i];
              else op[o] = static_cast<scalar_t>(tmp[r * 16 + i]);
            }
        }
      }
    });
#endif
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mistralrs, m) {
  m.def("qmm_supported() -> bool");
  m.def("qmm_isa() -> str");
  m.def("qmm(Tensor x, Tensor qs, Tensor d, Tensor mw, int bits, bool f32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistralrs, CPU, m) {
  m.impl("qmm", &qmm);
}

TORCH_LIBRARY_IMPL(mistralrs, CompositeExplicitAutograd, m) {
  m.impl("qmm_supported", []() { return supported(); });
  m.impl("qmm_isa", []() { return std::string(isa()); });
}
