// Integrate-and-fire over a chunk of timesteps in one pass: every neuron's membrane stays in a register while the
// kernel walks its T input currents, so each current is read once and each spike written once (the compiled
// per-timestep kernel reads and writes the membrane at every step and is dispatched T times).
//
// Memory (all dense, raw order): x [T][B][F] (float32, or bfloat16 exact integer sums; or x [1][B][F], the same
// current at every step: direct encoding's first layer, read once per chunk instead of T times), v_in [B][F] float32 (the
// membranes before the chunk, read) and v_out [B][F] float32 (after it, written; may be v_in itself), spikes [T][B][F] (float32 or bfloat16), counts [T][B] float32 (spikes per sample and step, optional).
// r [T][B][F] float32 or bfloat16 (optional): a residual block's shortcut, added after the synaptic bias as
// r * r_scale (r_scale a per-neuron term: the shortcut's channel alignment, 1 for none), the product rounded to
// bfloat16 when r_round is set (what the unfused graph's bfloat16 multiply does), so the shortcut's scaling and its
// cast to float32 need no passes of their own.
// absmax [B] float32 (optional): each sample's max |x| over the chunk, written on the way (the bf16 synapse checks
// from it that its sums were exact, instead of a separate pass over them).
// Pooled output (pool_h, pool_w, pool_c = H, W, C given (H > 0), channels-last samples, no residual): the spikes
// go through a 2x2, stride-2 average pooling inside the pass, spikes [T][B][Fo] with Fo = (H/2)(W/2)C in channels-last order (each
// window's four spikes summed and times 0.25: exact in float32 and bfloat16), so the full-resolution spike tensor is
// never written nor read again; neurons outside every window (the last row or column of an odd H or W, which the
// pooling drops) still integrate and count.
// F is one sample's neurons in its memory order (channels-last or not: the caller gives every per-neuron term in
// the same order). Per-neuron terms theta, gain, bias, pre_bias are float32 vectors of length F, or of length 1
// (a scalar for every neuron).
//
// Arithmetic, each operation rounded to float32 in the oracle's order (bsnn.snn.functional.if_multistep on the
// pre-scaled input): i = ((x + pre_bias) [+ r]) * gain + bias; v = v + i; s = (v >= theta); v = v - s * theta. The file
// is compiled with -ffp-contract=off so that no multiply-add is fused (the results are then bit-identical to the
// oracle's).
//
// Two code paths, picked at run time: AVX-512 (16 neurons per vector, masked tails; compiled with a function
// target attribute so the rest of the library never uses instructions the CPU may lack) and a portable scalar
// one. Samples run in parallel over torch's threads (at::parallel_for over B).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BSNN_X86 1
#else
#define BSNN_X86 0
#endif

namespace {

using i64 = int64_t;

bool cpu_has_avx512() {
#if BSNN_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// One per-neuron term: a vector of length F, or one value for all (stride 0).
struct Term {
  const float* p;
  i64 stride;  // 1 or 0
  float at(i64 f) const { return p[f * stride]; }
};

struct Args {
  const void* x;
  bool x_bf16;
  const float* v_in;
  float* v_out;
  void* s;
  bool s_bf16;
  const void* r;  // [T][B][F] residual shortcut or nullptr
  bool r_bf16;    // r is bfloat16 (else float32)
  bool r_round;   // r * r_scale rounded to bfloat16 (round to nearest even)
  float* counts;  // [T][B] or nullptr
  float* absmax;  // [B]: max |x| over the chunk per sample (the bf16 synapse's exactness check), or nullptr
  Term theta, gain, bias, pre_bias, r_scale;
  i64 T, B, F;
  i64 x_step;  // B * F, or 0 for a current constant over the chunk
  i64 pool_h = 0, pool_w = 0, pool_c = 0;  // H, W, C of a channels-last sample when pooling 2x2 (else 0)
};

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr uint16_t kBf16One = 0x3F80;  // 1.0 in bfloat16

// float32 -> bfloat16 -> float32, rounding to nearest even (c10::BFloat16's rounding; inputs here are finite).
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// The shortcut's current at flat index o of neuron f: r * r_scale (rounded to bfloat16 if asked).
inline float shortcut(const Args& a, i64 o, i64 f) {
  const float r = a.r_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.r)[o]) : static_cast<const float*>(a.r)[o];
  const float p = r * a.r_scale.at(f);
  return a.r_round ? round_bf16(p) : p;
}

// One IF step of neuron f (no residual): the oracle's operations in its order; returns whether it fires.
inline bool if_step(const Args& a, float& v, float x, i64 f) {
  const float th = a.theta.at(f);
  const float i = (x + a.pre_bias.at(f)) * a.gain.at(f) + a.bias.at(f);
  v = v + i;
  const bool fire = v >= th;
  v = v - (fire ? 1.0f : 0.0f) * th;
  return fire;
}

inline float load_x(const Args& a, i64 xo) {
  return a.x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.x)[xo]) : static_cast<const float*>(a.x)[xo];
}

// Pooling: a neuron no window covers (last row or column of an odd H or W) integrates and counts; its spikes are
// dropped, as the pooling drops them.
void scan_uncovered(const Args& a, i64 b, std::vector<i64>& count, float& amax) {
  const i64 H = a.pool_h, W = a.pool_w, C = a.pool_c;
  for (i64 h = 0; h < H; ++h)
    for (i64 w = (h < H / 2 * 2 ? W / 2 * 2 : 0); w < W; ++w)
      for (i64 c = 0; c < C; ++c) {
        const i64 f = (h * W + w) * C + c;
        float v = a.v_in[b * a.F + f];
        for (i64 t = 0; t < a.T; ++t) {
          const float x = load_x(a, t * a.x_step + b * a.F + f);
          amax = std::max(amax, std::fabs(x));
          count[t] += if_step(a, v, x, f);
        }
        a.v_out[b * a.F + f] = v;
      }
}

inline void store_pooled(const Args& a, i64 o, float p) {
  if (a.s_bf16) {  // k / 4, exact in bfloat16: the top half of the float32
    uint32_t u;
    std::memcpy(&u, &p, 4);
    static_cast<uint16_t*>(a.s)[o] = static_cast<uint16_t>(u >> 16);
  } else {
    static_cast<float*>(a.s)[o] = p;
  }
}

// Portable pooled path: each 2x2 window's four neurons step together, their spikes summed into one output.
void scan_sample_pool_generic(const Args& a, i64 b) {
  const i64 W = a.pool_w, C = a.pool_c, Ho = a.pool_h / 2, Wo = W / 2, Fo = Ho * Wo * C;
  std::vector<i64> count(a.T, 0);
  float amax = 0.0f;
  for (i64 ho = 0; ho < Ho; ++ho)
    for (i64 wo = 0; wo < Wo; ++wo)
      for (i64 c = 0; c < C; ++c) {
        const i64 f0 = (2 * ho * W + 2 * wo) * C + c;
        const i64 f[4] = {f0, f0 + C, f0 + W * C, f0 + W * C + C};
        float v[4];
        for (int k = 0; k < 4; ++k) v[k] = a.v_in[b * a.F + f[k]];
        for (i64 t = 0; t < a.T; ++t) {
          int fired = 0;
          for (int k = 0; k < 4; ++k) {
            const float x = load_x(a, t * a.x_step + b * a.F + f[k]);
            amax = std::max(amax, std::fabs(x));
            fired += if_step(a, v[k], x, f[k]);
          }
          count[t] += fired;
          store_pooled(a, t * a.B * Fo + b * Fo + (ho * Wo + wo) * C + c, static_cast<float>(fired) * 0.25f);
        }
        for (int k = 0; k < 4; ++k) a.v_out[b * a.F + f[k]] = v[k];
      }
  scan_uncovered(a, b, count, amax);
  if (a.counts)
    for (i64 t = 0; t < a.T; ++t) a.counts[t * a.B + b] = static_cast<float>(count[t]);
  if (a.absmax) a.absmax[b] = amax;
}

// Portable path: the same order of operations, one neuron at a time.
void scan_sample_generic(const Args& a, i64 b) {
  const i64 step = a.B * a.F;
  std::vector<i64> count(a.T, 0);
  float amax = 0.0f;
  for (i64 f = 0; f < a.F; ++f) {
    const float th = a.theta.at(f), g = a.gain.at(f), bi = a.bias.at(f), pb = a.pre_bias.at(f);
    float v = a.v_in[b * a.F + f];
    for (i64 t = 0; t < a.T; ++t) {
      const i64 o = t * step + b * a.F + f, xo = t * a.x_step + b * a.F + f;
      const float x = a.x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.x)[xo]) : static_cast<const float*>(a.x)[xo];
      amax = std::max(amax, std::fabs(x));
      float c = x + pb;
      if (a.r) c = c + shortcut(a, o, f);
      const float i = c * g + bi;
      v = v + i;
      const bool fire = v >= th;
      const float s = fire ? 1.0f : 0.0f;
      v = v - s * th;
      if (a.s_bf16) {
        static_cast<uint16_t*>(a.s)[o] = fire ? kBf16One : 0;
      } else {
        static_cast<float*>(a.s)[o] = s;
      }
      count[t] += fire;
    }
    a.v_out[b * a.F + f] = v;
  }
  if (a.counts)
    for (i64 t = 0; t < a.T; ++t) a.counts[t * a.B + b] = static_cast<float>(count[t]);
  if (a.absmax) a.absmax[b] = amax;
}

#if BSNN_X86 && defined(__GNUC__)
#define BSNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

BSNN_AVX512 inline __m512 load_term(const Term& t, i64 f, __mmask16 m) {
  return t.stride ? _mm512_maskz_loadu_ps(m, t.p + f) : _mm512_set1_ps(t.p[0]);
}

BSNN_AVX512 inline __m512 load_bf16(const void* p, i64 o, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + o);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

BSNN_AVX512 inline __m512 round_bf16_avx512(__m512 p) {  // round_bf16, 16 lanes
  const __m512i u = _mm512_castps_si512(p);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

BSNN_AVX512 void scan_sample_avx512(const Args& a, i64 b) {
  const i64 step = a.B * a.F;
  std::vector<i64> count(a.T, 0);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m256i bf_one = _mm256_set1_epi16(static_cast<short>(kBf16One));
  __m512 amax = _mm512_setzero_ps();
  for (i64 f = 0; f < a.F; f += 16) {
    const i64 n = a.F - f < 16 ? a.F - f : 16;
    const __mmask16 m = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
    const __m512 th = load_term(a.theta, f, m), g = load_term(a.gain, f, m), bi = load_term(a.bias, f, m),
                 pb = load_term(a.pre_bias, f, m), rs = load_term(a.r_scale, f, m);
    __m512 v = _mm512_maskz_loadu_ps(m, a.v_in + b * a.F + f);
    for (i64 t = 0; t < a.T; ++t) {
      const i64 o = t * step + b * a.F + f, xo = t * a.x_step + b * a.F + f;
      __m512 x;
      if (a.x_bf16) {
        x = load_bf16(a.x, xo, m);
      } else {
        x = _mm512_maskz_loadu_ps(m, static_cast<const float*>(a.x) + xo);
      }
      amax = _mm512_max_ps(amax, _mm512_abs_ps(x));  // masked-off lanes hold 0
      __m512 c = _mm512_add_ps(x, pb);
      if (a.r) {
        const __m512 r = a.r_bf16 ? load_bf16(a.r, o, m) : _mm512_maskz_loadu_ps(m, static_cast<const float*>(a.r) + o);
        const __m512 p = _mm512_mul_ps(r, rs);
        c = _mm512_add_ps(c, a.r_round ? round_bf16_avx512(p) : p);
      }
      const __m512 i = _mm512_add_ps(_mm512_mul_ps(c, g), bi);
      v = _mm512_add_ps(v, i);
      const __mmask16 fire = _mm512_mask_cmp_ps_mask(m, v, th, _CMP_GE_OQ);
      const __m512 s = _mm512_maskz_mov_ps(fire, one);
      v = _mm512_sub_ps(v, _mm512_mul_ps(s, th));
      if (a.s_bf16) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.s) + o, m, _mm256_maskz_mov_epi16(fire, bf_one));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(a.s) + o, m, s);
      }
      count[t] += __builtin_popcount(static_cast<unsigned>(fire));
    }
    _mm512_mask_storeu_ps(a.v_out + b * a.F + f, m, v);
  }
  if (a.counts)
    for (i64 t = 0; t < a.T; ++t) a.counts[t * a.B + b] = static_cast<float>(count[t]);
  if (a.absmax) a.absmax[b] = _mm512_reduce_max_ps(amax);
}
// Pooled AVX-512 path: 16 channels of one 2x2 window per step of the loop, the four neurons' spikes summed.
BSNN_AVX512 void scan_sample_pool_avx512(const Args& a, i64 b) {
  const i64 W = a.pool_w, C = a.pool_c, Ho = a.pool_h / 2, Wo = W / 2, Fo = Ho * Wo * C;
  std::vector<i64> count(a.T, 0);
  const __m512 one = _mm512_set1_ps(1.0f), quarter = _mm512_set1_ps(0.25f);
  __m512 amax = _mm512_setzero_ps();
  for (i64 ho = 0; ho < Ho; ++ho)
    for (i64 wo = 0; wo < Wo; ++wo)
      for (i64 c = 0; c < C; c += 16) {
        const i64 n = C - c < 16 ? C - c : 16;
        const __mmask16 m = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
        const i64 f0 = (2 * ho * W + 2 * wo) * C + c;
        const i64 f[4] = {f0, f0 + C, f0 + W * C, f0 + W * C + C};
        __m512 th[4], g[4], bi[4], pb[4], v[4];
        for (int k = 0; k < 4; ++k) {
          th[k] = load_term(a.theta, f[k], m);
          g[k] = load_term(a.gain, f[k], m);
          bi[k] = load_term(a.bias, f[k], m);
          pb[k] = load_term(a.pre_bias, f[k], m);
          v[k] = _mm512_maskz_loadu_ps(m, a.v_in + b * a.F + f[k]);
        }
        const i64 o = b * Fo + (ho * Wo + wo) * C + c;
        for (i64 t = 0; t < a.T; ++t) {
          __m512 sum = _mm512_setzero_ps();
          int fired = 0;
          for (int k = 0; k < 4; ++k) {
            const i64 xo = t * a.x_step + b * a.F + f[k];
            const __m512 x = a.x_bf16 ? load_bf16(a.x, xo, m) : _mm512_maskz_loadu_ps(m, static_cast<const float*>(a.x) + xo);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(x));
            const __m512 i = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(x, pb[k]), g[k]), bi[k]);
            v[k] = _mm512_add_ps(v[k], i);
            const __mmask16 fire = _mm512_mask_cmp_ps_mask(m, v[k], th[k], _CMP_GE_OQ);
            const __m512 s = _mm512_maskz_mov_ps(fire, one);
            v[k] = _mm512_sub_ps(v[k], _mm512_mul_ps(s, th[k]));
            sum = _mm512_add_ps(sum, s);
            fired += __builtin_popcount(static_cast<unsigned>(fire));
          }
          count[t] += fired;
          const __m512 p = _mm512_mul_ps(sum, quarter);
          const i64 po = t * a.B * Fo + o;
          if (a.s_bf16) {  // k / 4 is exact in bfloat16: the top halves of the float32 lanes
            const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(p), 16));
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.s) + po, m, h);
          } else {
            _mm512_mask_storeu_ps(static_cast<float*>(a.s) + po, m, p);
          }
        }
        for (int k = 0; k < 4; ++k) _mm512_mask_storeu_ps(a.v_out + b * a.F + f[k], m, v[k]);
      }
  float amax_s = _mm512_reduce_max_ps(amax);
  scan_uncovered(a, b, count, amax_s);
  if (a.counts)
    for (i64 t = 0; t < a.T; ++t) a.counts[t * a.B + b] = static_cast<float>(count[t]);
  if (a.absmax) a.absmax[b] = amax_s;
}
#endif

Term term(const at::Tensor& t, i64 F) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && (t.numel() == 1 || t.numel() == F),
              "if_scan: per-neuron terms must be contiguous float32 of length 1 or F = ", F);
  return Term{t.data_ptr<float>(), t.numel() == 1 ? 0 : 1};
}

// x [T, B, F] or [1, B, F] (constant over the T steps), v_in and v_out [B, F] (v_out written), spikes [T, B, F]
// (with pool_h, pool_w, pool_c = H, W, C > 0: [T, B, (H/2)(W/2)C], the 2x2-average-pooled spikes); terms
// float32 [F] or [1]; path 0 auto, 1 generic, 2 avx512. Returns counts [T, B] float32 (empty when want_counts is false).
at::Tensor scan(const at::Tensor& x, const at::Tensor& v_in, at::Tensor v_out, at::Tensor spikes,
                const at::Tensor& theta, const at::Tensor& gain, const at::Tensor& bias,
                const at::Tensor& pre_bias, const std::optional<at::Tensor>& residual,
                const std::optional<at::Tensor>& absmax, bool want_counts, i64 path,
                const std::optional<at::Tensor>& residual_scale, bool residual_round,
                i64 pool_h, i64 pool_w, i64 pool_c) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "if_scan: x must be a contiguous float32 or bfloat16 [T, B, F] tensor");
  const bool pool = pool_h > 0;
  const i64 ph = pool ? pool_h : 0, pw = pool ? pool_w : 0, pc = pool ? pool_c : 0;
  if (pool) {
    TORCH_CHECK(ph >= 2 && pw >= 2 && pc >= 1 && ph * pw * pc == x.size(2) && !residual,
                "if_scan: pooling needs H, W >= 2 with H * W * C = F, and no residual");
  }
  const i64 Fs = pool ? (ph / 2) * (pw / 2) * pc : x.size(2);  // spikes per sample and step
  TORCH_CHECK(spikes.dim() == 3 && spikes.size(1) == x.size(1) && spikes.size(2) == Fs &&
                  (x.size(0) == spikes.size(0) || x.size(0) == 1),
              "if_scan: spikes must be [T, B, F] (pooled: [T, B, (H/2)(W/2)C]) and x [T, B, F] or [1, B, F]");
  const i64 T = spikes.size(0), B = x.size(1), F = x.size(2);
  for (const at::Tensor* v : {&v_in, static_cast<const at::Tensor*>(&v_out)})
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->is_contiguous() && v->numel() == B * F,
                "if_scan: v_in and v_out must be contiguous float32 tensors of B * F elements");
  TORCH_CHECK(spikes.is_contiguous() && spikes.numel() == T * B * Fs &&
                  (spikes.scalar_type() == at::kFloat || spikes.scalar_type() == at::kBFloat16),
              "if_scan: spikes must be a contiguous float32 or bfloat16 tensor of T * B * F elements");
  if (residual)
    TORCH_CHECK((residual->scalar_type() == at::kFloat || residual->scalar_type() == at::kBFloat16) &&
                    residual->is_contiguous() && residual->numel() == T * B * F,
                "if_scan: the residual must be a contiguous float32 or bfloat16 tensor of T * B * F elements");
  const float unit = 1.0f;
  if (absmax)
    TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->is_contiguous() && absmax->numel() == B,
                "if_scan: absmax must be a contiguous float32 tensor of B elements");
  at::Tensor counts = want_counts ? at::empty({T, B}, x.options().dtype(at::kFloat)) : at::Tensor();
  Args a{x.data_ptr(), x.scalar_type() == at::kBFloat16, v_in.data_ptr<float>(), v_out.data_ptr<float>(),
         spikes.data_ptr(),
         spikes.scalar_type() == at::kBFloat16, residual ? residual->data_ptr() : nullptr,
         residual && residual->scalar_type() == at::kBFloat16, residual_round,
         want_counts ? counts.data_ptr<float>() : nullptr, absmax ? absmax->data_ptr<float>() : nullptr,
         term(theta, F), term(gain, F), term(bias, F), term(pre_bias, F),
         residual_scale ? term(*residual_scale, F) : Term{&unit, 0}, T, B, F, x.size(0) == 1 ? 0 : B * F,
         ph, pw, pc};
  bool avx512 = path == 2 || (path == 0 && cpu_has_avx512());
  TORCH_CHECK(!avx512 || cpu_has_avx512(), "if_scan: this CPU has no AVX-512");
  at::parallel_for(0, B, 1, [&](i64 b0, i64 b1) {
    for (i64 b = b0; b < b1; ++b) {
#if BSNN_X86 && defined(__GNUC__)
      if (avx512) {
        pool ? scan_sample_pool_avx512(a, b) : scan_sample_avx512(a, b);
        continue;
      }
#endif
      pool ? scan_sample_pool_generic(a, b) : scan_sample_generic(a, b);
    }
  });
  return counts;
}

std::string cpu_paths() { return cpu_has_avx512() ? "generic,avx512" : "generic"; }

}  // namespace

TORCH_LIBRARY(bsnn_if, m) {
  // (x, v_in, v_out, spikes, theta, gain, bias, pre_bias, residual?, absmax?, want_counts, path, residual_scale?,
  //  residual_round, pool_h, pool_w, pool_c) -> counts
  m.def("scan", &scan);
  m.def("cpu_paths", &cpu_paths);
}
