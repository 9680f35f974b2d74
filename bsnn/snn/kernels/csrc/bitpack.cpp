// Bit-packed binary synapses: {0,1} spikes x ±1 weights through AND + popcount on 64-bit words.
//
// A ±1 weight w is stored as the bit w+ = (w == +1), a spike s as the bit s. Over one 64-bit word
//     sum_k w_k s_k = #(s=1, w=+1) - #(s=1, w=-1) = 2 popcount(s & w+) - popcount(s),
// an integer, so the result is exact. Layouts (all int64 words, bit k of word j is element 64 j + k):
//   spikes  [N, H, W, CW]   channels packed per pixel, CW = ceil(C / 64), zero bits beyond C
//   windows [N, H, Wo, KWW] per input row and output column, the KW * C bits of one kernel row's window in
//                           (kw, channel) order, KWW = ceil(KW * C / 64) words; a receptive field is KH such
//                           windows, L = KH * KWW words (direct convolution: no im2col matrix in memory)
//   weights rows [Cout, L]  the same order (kh, then the window's words)
//           cols [L, CoutP] the same transposed, CoutP = Cout rounded up to 8 (zero columns), for the
//                           AVX-512 path (8 output channels per 512-bit vector)
//   output  [N, Ho, Wo, Cout] float32: (out + ) scale * (2 popc(s & w+) - popc(s)) ( + bias[co])
// A linear layer is the 1 x 1 convolution of [M, 1, 1, CW].
//
// Three code paths, picked at run time from the CPU's features: AVX-512 VPOPCNTDQ (8 words per instruction),
// scalar POPCNT, and generic __builtin_popcountll. They are compiled with function target attributes (the
// per-function form of -mavx512f -mavx512vpopcntdq / -mpopcnt) so that the rest of the library never uses
// instructions the CPU may lack.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BSNN_X86 1
#else
#define BSNN_X86 0
#endif

namespace {

using u64 = uint64_t;
using i64 = int64_t;

enum Path : i64 { kAuto = 0, kGeneric = 1, kPopcnt = 2, kAvx512 = 3 };

bool cpu_has_avx512_vpopcntdq() {
#if BSNN_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

bool cpu_has_popcnt() {
#if BSNN_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

i64 best_path() { return cpu_has_avx512_vpopcntdq() ? kAvx512 : cpu_has_popcnt() ? kPopcnt : kGeneric; }

// ------------------------------------------------------------------------------------------------ packing
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  static bool nz(float v) { return v != 0.f; }
  static bool one(float v) { return v == 1.f; }
};
template <>
struct Bits<uint16_t> {  // bfloat16 bit patterns
  static bool nz(uint16_t v) { return (v & 0x7fff) != 0; }
  static bool one(uint16_t v) { return v == 0x3f80; }
};
template <>
struct Bits<uint8_t> {
  static bool nz(uint8_t v) { return v != 0; }
  static bool one(uint8_t v) { return v == 1; }
};

// One row (n, h) of x [N, C, H, W] (any strides) -> o [W, CW]; returns whether some nonzero value was not 1.
template <typename T>
__attribute__((always_inline)) inline bool pack_row_scalar(const T* xr, i64 C, i64 W, i64 sC, i64 sW, u64* o,
                                                           i64 CW) {
  bool bad = false;
  if (sC <= sW) {  // channels (nearly) contiguous: build each word in a register
    for (i64 w = 0; w < W; ++w) {
      const T* xp = xr + w * sW;
      for (i64 j = 0; j < CW; ++j) {
        u64 word = 0;
        const i64 c0 = 64 * j, c1 = std::min(C, c0 + 64);
        for (i64 c = c0; c < c1; ++c) {
          const T v = xp[c * sC];
          const bool nz = Bits<T>::nz(v);
          word |= static_cast<u64>(nz) << (c - c0);
          bad |= nz && !Bits<T>::one(v);
        }
        o[w * CW + j] = word;
      }
    }
  } else {  // NCHW: channel outer, contiguous pixels inner
    std::fill(o, o + W * CW, u64{0});
    for (i64 c = 0; c < C; ++c) {
      const T* xc = xr + c * sC;
      const i64 j = c >> 6, k = c & 63;
      for (i64 w = 0; w < W; ++w) {
        const T v = xc[w * sW];
        const bool nz = Bits<T>::nz(v);
        o[w * CW + j] |= static_cast<u64>(nz) << k;
        bad |= nz && !Bits<T>::one(v);
      }
    }
  }
  return bad;
}

#if BSNN_X86
#define BSNN_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))
// Lanes of one 512-bit load per element type: nonzero mask and "nonzero but not 1" mask of up to ``n`` elements.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int kN = 16;
  BSNN_AVX512BW static inline u64 nz(const float* p, i64 n, u64* bad) {
    const __mmask16 t = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    const __m512i v = _mm512_maskz_loadu_epi32(t, p);
    const __mmask16 m = _mm512_mask_test_epi32_mask(t, v, _mm512_set1_epi32(0x7fffffff));
    *bad |= _mm512_mask_cmpneq_epi32_mask(m, v, _mm512_set1_epi32(0x3f800000));
    return m;
  }
};
template <>
struct Lanes<uint16_t> {
  static constexpr int kN = 32;
  BSNN_AVX512BW static inline u64 nz(const uint16_t* p, i64 n, u64* bad) {
    const __mmask32 t = n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
    const __m512i v = _mm512_maskz_loadu_epi16(t, p);
    const __mmask32 m = _mm512_mask_test_epi16_mask(t, v, _mm512_set1_epi16(0x7fff));
    *bad |= _mm512_mask_cmpneq_epi16_mask(m, v, _mm512_set1_epi16(0x3f80));
    return m;
  }
};
template <>
struct Lanes<uint8_t> {
  static constexpr int kN = 64;
  BSNN_AVX512BW static inline u64 nz(const uint8_t* p, i64 n, u64* bad) {
    const __mmask64 t = n >= 64 ? ~__mmask64{0} : ((__mmask64{1} << n) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(t, p);
    const __mmask64 m = _mm512_mask_test_epi8_mask(t, v, _mm512_set1_epi8(-1));
    *bad |= _mm512_mask_cmpneq_epi8_mask(m, v, _mm512_set1_epi8(1));
    return m;
  }
};

// AVX-512 rows: channels-last (sC == 1) builds words from lane masks; NCHW (sW == 1) takes lane masks over pixels
// and sets the bit of each spike (cost proportional to the spikes: they are sparse).
template <typename T>
BSNN_AVX512BW bool pack_row_avx512(const T* xr, i64 C, i64 W, i64 sC, i64 sW, u64* o, i64 CW) {
  constexpr int kN = Lanes<T>::kN;
  u64 bad = 0;
  if (sC == 1) {
    for (i64 w = 0; w < W; ++w) {
      const T* xp = xr + w * sW;
      for (i64 j = 0; j < CW; ++j) {
        u64 word = 0;
        const i64 c0 = 64 * j, c1 = std::min(C, c0 + 64);
        for (i64 c = c0; c < c1; c += kN) word |= Lanes<T>::nz(xp + c, c1 - c, &bad) << (c - c0);
        o[w * CW + j] = word;
      }
    }
  } else {
    std::fill(o, o + W * CW, u64{0});
    for (i64 c = 0; c < C; ++c) {
      const T* xc = xr + c * sC;
      const u64 bit = u64{1} << (c & 63);
      u64* oc = o + (c >> 6);
      for (i64 w0 = 0; w0 < W; w0 += kN) {
        u64 m = Lanes<T>::nz(xc + w0, W - w0, &bad);
        while (m) {
          oc[(w0 + __builtin_ctzll(m)) * CW] |= bit;
          m &= m - 1;
        }
      }
    }
  }
  return bad != 0;
}
#endif

bool cpu_has_avx512bw() {
#if BSNN_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// x [N, C, H, W] (any strides) -> out [N, H, W, CW]; returns whether some nonzero value was not 1.
template <typename T>
bool pack_impl(const T* x, i64 N, i64 C, i64 H, i64 W, i64 sN, i64 sC, i64 sH, i64 sW, u64* out, i64 CW,
               bool vector) {
  std::atomic<bool> any_bad{false};
  const i64 grain = std::max<i64>(1, 16384 / std::max<i64>(1, C * W));
  const bool vec_ok = vector && (sC == 1 || sW == 1);
  at::parallel_for(0, N * H, grain, [&](i64 b, i64 e) {
    bool bad = false;
    for (i64 r = b; r < e; ++r) {
      const T* xr = x + (r / H) * sN + (r % H) * sH;
      u64* o = out + r * W * CW;
#if BSNN_X86
      if (vec_ok) {
        bad |= pack_row_avx512<T>(xr, C, W, sC, sW, o, CW);
        continue;
      }
#endif
      bad |= pack_row_scalar<T>(xr, C, W, sC, sW, o, CW);
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load();
}

// x [N, C, H, W] float32 / bfloat16 / uint8 / bool, any strides -> (words [N, H, W, CW], not_binary).
std::tuple<at::Tensor, bool> pack(const at::Tensor& x, int64_t path) {
  TORCH_CHECK(x.dim() == 4, "bitpack.pack: expected x [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "bitpack.pack: expected a CPU tensor");
  const i64 N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CW = (C + 63) / 64;
  at::Tensor out = at::empty({N, H, W, CW}, x.options().dtype(at::kLong));
  u64* o = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  const i64 sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool vec = (path == kAuto || path == kAvx512) && cpu_has_avx512bw();
  bool bad;
  switch (x.scalar_type()) {
    case at::kFloat:
      bad = pack_impl<float>(x.data_ptr<float>(), N, C, H, W, sN, sC, sH, sW, o, CW, vec);
      break;
    case at::kBFloat16:
      bad = pack_impl<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), N, C, H, W, sN,
                                sC, sH, sW, o, CW, vec);
      break;
    case at::kByte:
      bad = pack_impl<uint8_t>(x.data_ptr<uint8_t>(), N, C, H, W, sN, sC, sH, sW, o, CW, vec);
      break;
    case at::kBool:
      bad = pack_impl<uint8_t>(reinterpret_cast<const uint8_t*>(x.data_ptr<bool>()), N, C, H, W, sN, sC, sH, sW,
                               o, CW, vec);
      break;
    default:
      TORCH_CHECK(false, "bitpack.pack: expected float32, bfloat16, uint8 or bool input, got ", x.scalar_type());
  }
  return {out, bad};
}

// ------------------------------------------------------------------------------------------------ geometry
struct Geom {
  i64 n, h, w, c, cw, cout, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
  i64 planes;                                         // bit planes of the input counts (1 for spikes)
  i64 kww() const { return (kw * c + 63) / 64; }      // words of one kernel row's window (kw * c bits)
  i64 L() const { return kh * kww(); }                // words of one receptive field
  i64 M() const { return n * ho * wo; }
  i64 window_words() const { return n * h * wo * kww(); }  // words of one plane of row windows
};

// Output pixel (n, oh, ow) walked in flat [N, Ho, Wo] order without divisions.
struct Cursor {
  i64 n, oh, ow;
  Cursor(const Geom& g, i64 p) : n(p / (g.ho * g.wo)), oh((p / g.wo) % g.ho), ow(p % g.wo) {}
  inline void next(const Geom& g) {
    if (++ow == g.wo) {
      ow = 0;
      if (++oh == g.ho) oh = 0, ++n;
    }
  }
};

// ------------------------------------------------------------------------------------------------ row windows
// A receptive field is kh kernel rows; the window of kernel row a of output pixel (n, oh, ow) depends on the input
// row ih = oh sh - ph + a dh and on ow only, so it is built once per (n, ih, ow) and shared by the kh output rows
// that use it: win[pl, n, ih, ow] = the kw * c bits of pixels (ih, ow sw - pw + b dw), b < kw, in (b, channel)
// order, zeros where a column is padding; cnt[...] = its popcount. Rows outside the input (vertical padding)
// are skipped when the fields are summed.
void build_windows(const u64* s, const Geom& g, u64* win, int32_t* cnt) {
  const i64 kww = g.kww(), plane_in = g.n * g.h * g.w * g.cw;
  const bool aligned = (g.c & 63) == 0;
  at::parallel_for(0, g.planes * g.n * g.h, 1, [&](i64 b, i64 e) {
    for (i64 r = b; r < e; ++r) {  // r = (pl * n + n) * h + ih
      const i64 pl = r / (g.n * g.h), nh = r % (g.n * g.h);
      const u64* srow = s + pl * plane_in + nh * g.w * g.cw;
      for (i64 ow = 0; ow < g.wo; ++ow) {
        u64* d = win + (r * g.wo + ow) * kww;
        std::fill(d, d + kww, u64{0});
        i64 off = 0;
        for (i64 kb = 0; kb < g.kw; ++kb, off += g.c) {
          const i64 iw = ow * g.sw - g.pw + kb * g.dw;
          if (iw < 0 || iw >= g.w) continue;
          const u64* src = srow + iw * g.cw;
          const i64 sh = off & 63;
          u64* dd = d + (off >> 6);
          if (aligned || sh == 0) {
            for (i64 j = 0; j < g.cw; ++j) dd[j] |= src[j];
          } else {
            for (i64 j = 0; j < g.cw; ++j) {  // bits beyond c are zero: the high part never leaves the window
              dd[j] |= src[j] << sh;
              if ((off >> 6) + j + 1 < kww) dd[j + 1] |= src[j] >> (64 - sh);
            }
          }
        }
        int32_t pc = 0;
        for (i64 j = 0; j < kww; ++j) pc += __builtin_popcountll(d[j]);
        cnt[r * g.wo + ow] = pc;
      }
    }
  });
}

// The kh window pointers of output pixel ``at`` in plane 0 (``zero`` for rows outside the input) and the
// popcount of its field summed over planes by Horner's rule, sum_pl 2^pl popcount(field_pl).
inline i64 field_rows(const Geom& g, const Cursor& at, const u64* win, const int32_t* cnt, const u64* zero,
                      const u64** rows) {
  const i64 kww = g.kww(), pw_cnt = g.n * g.h * g.wo;
  i64 ps = 0;
  for (i64 a = 0; a < g.kh; ++a) {
    const i64 ih = at.oh * g.sh - g.ph + a * g.dh;
    const bool inside = ih >= 0 && ih < g.h;
    const i64 idx = (at.n * g.h + ih) * g.wo + at.ow;
    rows[a] = inside ? win + idx * kww : zero;
    if (inside)
      for (i64 pl = g.planes - 1; pl >= 0; --pl) ps += static_cast<i64>(cnt[pl * pw_cnt + idx]) << pl;
  }
  return ps;
}

struct Epilogue {
  float* out;          // [M, Cout]
  const float* bias;   // [Cout] or null
  float scale;
  inline void store(i64 p, i64 co, i64 cout, i64 sum) const {
    float v = static_cast<float>(sum) * scale;  // exact: |sum| < 2^24 and scale a power of two
    if (bias) v = v + bias[co];
    out[p * cout + co] = v;
  }
};

// ------------------------------------------------------------------------------------------------ scalar paths
// Planes are summed by Horner's rule from the highest: acc = 2 acc + popcount(plane pl ...), so
// acc = sum_pl 2^pl popcount(...).
__attribute__((always_inline)) inline void range_scalar(i64 b, i64 e, const u64* win, const int32_t* cnt,
                                                        const u64* zero, const u64* wrows, const Geom& g,
                                                        const Epilogue& ep) {
  const i64 kww = g.kww(), L = g.L(), plane = g.window_words();
  std::vector<const u64*> rows(g.kh);
  Cursor at(g, b);
  for (i64 p = b; p < e; ++p, at.next(g)) {
    const i64 ps = field_rows(g, at, win, cnt, zero, rows.data());
    for (i64 co = 0; co < g.cout; ++co) {
      const u64* wr = wrows + co * L;
      i64 acc = 0;
      for (i64 pl = g.planes - 1; pl >= 0; --pl) {
        i64 a_sum = 0;
        for (i64 a = 0; a < g.kh; ++a) {
          if (rows[a] == zero) continue;
          const u64* r = rows[a] + pl * plane;
          const u64* wa = wr + a * kww;
          for (i64 j = 0; j < kww; ++j) a_sum += __builtin_popcountll(r[j] & wa[j]);
        }
        acc = 2 * acc + a_sum;
      }
      ep.store(p, co, g.cout, 2 * acc - ps);
    }
  }
}

void range_generic(i64 b, i64 e, const u64* win, const int32_t* cnt, const u64* zero, const u64* wrows,
                   const Geom& g, const Epilogue& ep) {
  range_scalar(b, e, win, cnt, zero, wrows, g, ep);
}

#if BSNN_X86
__attribute__((target("popcnt"))) void range_popcnt(i64 b, i64 e, const u64* win, const int32_t* cnt,
                                                    const u64* zero, const u64* wrows, const Geom& g,
                                                    const Epilogue& ep) {
  range_scalar(b, e, win, cnt, zero, wrows, g, ep);  // inlined: __builtin_popcountll becomes POPCNT
}

// ------------------------------------------------------------------------------------------------ AVX-512 path
#define BSNN_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512vpopcntdq")))
constexpr int kPixels = 4;  // output pixels per register tile (each spike word broadcast to 8 lanes)

// Output channels [co, co + 8 NB) of kPixels pixels: acc[q][v] lane i = sum_pl 2^pl sum_a sum_j
// popcount(rows[q][a][pl][j] & w+[co + 8 v + i][a][j]).
template <int NB>
BSNN_AVX512 inline void block_avx512(const u64* const* rows, const u64* zero, const i64* ps, int np, i64 p0,
                                     const u64* wcols, i64 coutp, i64 co, const Geom& g, const Epilogue& ep) {
  const i64 kww = g.kww(), plane = g.window_words(), kh = g.kh;
  __m512i acc[kPixels][NB];
  for (int q = 0; q < kPixels; ++q)
    for (int v = 0; v < NB; ++v) acc[q][v] = _mm512_setzero_si512();
  for (i64 pl = g.planes - 1; pl >= 0; --pl) {
    if (pl != g.planes - 1)
      for (int q = 0; q < kPixels; ++q)
        for (int v = 0; v < NB; ++v) acc[q][v] = _mm512_add_epi64(acc[q][v], acc[q][v]);
    for (i64 a = 0; a < kh; ++a) {
      const u64* r[kPixels];
      bool any = false;
      for (int q = 0; q < kPixels; ++q) {
        const u64* base = rows[q * kh + a];
        r[q] = base == zero ? zero : base + pl * plane;
        any |= base != zero;
      }
      if (!any) continue;  // this kernel row is padding for all four pixels
      const u64* wa = wcols + a * kww * coutp + co;
      for (i64 j = 0; j < kww; ++j) {
        __m512i w[NB];
        for (int v = 0; v < NB; ++v) w[v] = _mm512_loadu_si512(wa + j * coutp + 8 * v);
        for (int q = 0; q < kPixels; ++q) {
          const __m512i sb = _mm512_set1_epi64(static_cast<long long>(r[q][j]));
          for (int v = 0; v < NB; ++v)
            acc[q][v] = _mm512_add_epi64(acc[q][v], _mm512_popcnt_epi64(_mm512_and_si512(sb, w[v])));
        }
      }
    }
  }
  const __m256 scale = _mm256_set1_ps(ep.scale);
  const i64 cout = g.cout;
  for (int q = 0; q < np; ++q) {
    const __m512i psv = _mm512_set1_epi64(ps[q]);
    for (int v = 0; v < NB; ++v) {
      const i64 c0 = co + 8 * v;
      if (c0 >= cout) break;
      const __mmask8 m = c0 + 8 <= cout ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (cout - c0)) - 1);
      const __m512i d = _mm512_sub_epi64(_mm512_slli_epi64(acc[q][v], 1), psv);
      __m256 f = _mm256_mul_ps(_mm512_cvtepi64_ps(d), scale);  // exact: |d| < 2^24, scale a power of two
      if (ep.bias) f = _mm256_add_ps(f, _mm256_maskz_loadu_ps(m, ep.bias + c0));
      _mm256_mask_storeu_ps(ep.out + (p0 + q) * cout + c0, m, f);
    }
  }
}

BSNN_AVX512 void range_avx512(i64 b, i64 e, const u64* win, const int32_t* cnt, const u64* zero,
                              const u64* wcols, i64 coutp, const Geom& g, const Epilogue& ep) {
  std::vector<const u64*> rows(kPixels * g.kh);
  i64 ps[kPixels];
  Cursor at(g, b);
  for (i64 p0 = b; p0 < e; p0 += kPixels) {
    const int np = static_cast<int>(std::min<i64>(kPixels, e - p0));
    for (int q = 0; q < kPixels; ++q) {
      if (q < np) {
        ps[q] = field_rows(g, at, win, cnt, zero, rows.data() + q * g.kh);
        at.next(g);
      } else {
        ps[q] = 0;
        std::fill(rows.begin() + q * g.kh, rows.begin() + (q + 1) * g.kh, zero);
      }
    }
    i64 co = 0;
    for (; co + 32 <= coutp; co += 32) block_avx512<4>(rows.data(), zero, ps, np, p0, wcols, coutp, co, g, ep);
    for (; co < coutp; co += 8) block_avx512<1>(rows.data(), zero, ps, np, p0, wcols, coutp, co, g, ep);
  }
}
#endif

// ------------------------------------------------------------------------------------------------ entry points
// s: packed spikes [N, H, W, CW] or bit planes of counts [P, N, H, W, CW] (plane pl = bit pl); wrows [Cout, L],
// wcols [L, CoutP], L = kh ceil(kw c / 64) (each kernel row's kw * c bits in (kw, channel) order, in its own
// words); geometry = (c, kh, kw, sh, sw, ph, pw, dh, dw), c the input channels.
// Returns scale * sum_pl 2^pl (2 popcount(s_pl & w+) - popcount(s_pl)) (+ bias), [N, Ho, Wo, Cout] float32.
at::Tensor conv(const at::Tensor& s, const at::Tensor& wrows, const at::Tensor& wcols,
                const std::optional<at::Tensor>& bias, std::vector<int64_t> geom, double scale, int64_t path) {
  TORCH_CHECK((s.dim() == 4 || s.dim() == 5) && s.scalar_type() == at::kLong && s.is_contiguous(),
              "bitpack.conv: expected packed spikes [N, H, W, CW] or planes [P, N, H, W, CW], int64 contiguous");
  TORCH_CHECK(geom.size() == 9, "bitpack.conv: geometry is (c, kh, kw, sh, sw, ph, pw, dh, dw)");
  const at::Tensor s5 = s.dim() == 5 ? s : s.unsqueeze(0);
  Geom g{s5.size(1), s5.size(2), s5.size(3), geom[0], s5.size(4), wrows.size(0), geom[1], geom[2], geom[3],
         geom[4], geom[5], geom[6], geom[7], geom[8], 0, 0, s5.size(0)};
  TORCH_CHECK(g.planes >= 1 && g.planes <= 8, "bitpack.conv: 1 to 8 bit planes expected, got ", g.planes);
  TORCH_CHECK(g.c > 0 && (g.c + 63) / 64 == g.cw, "bitpack.conv: ", g.c, " channels do not fill ", g.cw, " words");
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.ho > 0 && g.wo > 0, "bitpack.conv: empty output for input ", s.sizes());
  TORCH_CHECK(wrows.is_contiguous() && wrows.scalar_type() == at::kLong && wrows.size(1) == g.L(),
              "bitpack.conv: packed weights [Cout, ", g.L(), "] int64 expected, got ", wrows.sizes());
  TORCH_CHECK(wcols.is_contiguous() && wcols.size(0) == g.L() && wcols.size(1) % 8 == 0 &&
                  wcols.size(1) >= g.cout,
              "bitpack.conv: transposed packed weights [L, CoutP] (CoutP a multiple of 8) expected");
  at::Tensor y = at::empty({g.n, g.ho, g.wo, g.cout}, s.options().dtype(at::kFloat));
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == g.cout, "bitpack.conv: bias must have Cout = ", g.cout, " elements");
  }
  const Epilogue ep{y.data_ptr<float>(), bias.has_value() ? b.data_ptr<float>() : nullptr, static_cast<float>(scale)};
  const i64 chosen = path == kAuto ? best_path() : path;
  TORCH_CHECK(chosen != kAvx512 || cpu_has_avx512_vpopcntdq(), "bitpack.conv: this CPU lacks AVX-512 VPOPCNTDQ");
  TORCH_CHECK(chosen != kPopcnt || cpu_has_popcnt(), "bitpack.conv: this CPU lacks POPCNT");
  const u64* sp = reinterpret_cast<const u64*>(s5.data_ptr<int64_t>());
  const u64* wr = reinterpret_cast<const u64*>(wrows.data_ptr<int64_t>());
  const u64* wc = reinterpret_cast<const u64*>(wcols.data_ptr<int64_t>());
  const i64 coutp = wcols.size(1);
  // a linear layer (1 x 1 kernel on 1 x 1 maps) is its own window: no copy
  const bool identity = g.kh == 1 && g.kw == 1 && g.h == 1 && g.w == 1 && g.ph == 0 && g.pw == 0;
  at::Tensor win_t, cnt_t = at::empty({g.planes * g.n * g.h * g.wo}, s.options().dtype(at::kInt));
  const u64* win;
  if (identity) {
    win = sp;
    const i64 kww = g.kww();
    int32_t* c = cnt_t.data_ptr<int32_t>();
    at::parallel_for(0, cnt_t.numel(), 1024, [&](i64 lo, i64 hi) {
      for (i64 i = lo; i < hi; ++i) {
        int32_t pc = 0;
        for (i64 j = 0; j < kww; ++j) pc += __builtin_popcountll(sp[i * kww + j]);
        c[i] = pc;
      }
    });
  } else {
    win_t = at::empty({g.planes * g.window_words()}, s.options());
    build_windows(sp, g, reinterpret_cast<u64*>(win_t.data_ptr<int64_t>()), cnt_t.data_ptr<int32_t>());
    win = reinterpret_cast<const u64*>(win_t.data_ptr<int64_t>());
  }
  const int32_t* cnt = cnt_t.data_ptr<int32_t>();
  const std::vector<u64> zero(g.kww(), 0);
  const i64 grain = std::max<i64>(16, 65536 / std::max<i64>(1, g.L() * g.planes * g.cout));
  at::parallel_for(0, g.M(), grain, [&](i64 lo, i64 hi) {
#if BSNN_X86
    if (chosen == kAvx512) return range_avx512(lo, hi, win, cnt, zero.data(), wc, coutp, g, ep);
    if (chosen == kPopcnt) return range_popcnt(lo, hi, win, cnt, zero.data(), wr, g, ep);
#endif
    range_generic(lo, hi, win, cnt, zero.data(), wr, g, ep);
  });
  return y;
}

#if BSNN_X86
// One channels-last row of counts: 16 channels per step; x * iq converted to int32, checked to be an integer in
// [0, 255], and bit b of the counts of the 16 lanes OR-ed into word j of plane b.
template <typename T>
BSNN_AVX512BW void counts_row_avx512(const T* xr, i64 C, i64 W, i64 sW, float iq, u64* orow, i64 CW, i64 plane,
                                     unsigned* bits, bool* bad) {
  __m512i orv = _mm512_setzero_si512();
  __mmask16 badm = 0;
  const __m512 iqv = _mm512_set1_ps(iq);
  for (i64 w = 0; w < W; ++w) {
    const T* xp = xr + w * sW;
    u64* ow = orow + w * CW;
    for (i64 c0 = 0; c0 < C; c0 += 16) {
      const i64 n = std::min<i64>(16, C - c0);
      const __mmask16 t = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
      __m512 f;
      if constexpr (std::is_same_v<T, float>) {
        f = _mm512_maskz_loadu_ps(t, xp + c0);
      } else {  // bfloat16 -> float32: the 16 bits on top of a zero low half (exact)
        const __m256i h = _mm256_maskz_loadu_epi16(t, xp + c0);
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      f = _mm512_mul_ps(f, iqv);  // exact: iq is a power of two
      __m512i ni = _mm512_cvttps_epi32(f);
      const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(ni), f, _CMP_EQ_OQ) &
                           _mm512_cmpge_epi32_mask(ni, _mm512_setzero_si512()) &
                           _mm512_cmple_epi32_mask(ni, _mm512_set1_epi32(255));
      badm |= t & static_cast<__mmask16>(~ok);
      ni = _mm512_maskz_mov_epi32(t & ok, ni);
      orv = _mm512_or_si512(orv, ni);
      const i64 j = c0 >> 6, sh = c0 & 63;
      for (int b = 0; b < 8; ++b) {
        const __mmask16 m = _mm512_test_epi32_mask(ni, _mm512_set1_epi32(1 << b));
        if (m) ow[b * plane + j] |= static_cast<u64>(m) << sh;
      }
    }
  }
  *bits |= static_cast<unsigned>(_mm512_reduce_or_epi32(orv));
  *bad |= badm != 0;
}
#endif

// x [N, C, H, W] float32 / bfloat16 (any strides), multiples n·q of a quantum q = 1 / inv_quantum (a power of two)
// with integer counts 0 <= n <= 255 -> (planes [P, N, H, W, CW], exact): plane b holds bit b of the counts,
// P = the bit length of the largest count (at least 1); exact is false if some value is not such a multiple.
std::tuple<at::Tensor, bool> pack_counts(const at::Tensor& x, double inv_quantum, int64_t path) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "bitpack.pack_counts: expected a CPU x [N, C, H, W]");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool vec = (path == kAuto || path == kAvx512) && cpu_has_avx512bw() && x.stride(1) == 1 &&
                   (bf16 || x.scalar_type() == at::kFloat);
  const at::Tensor xf = vec || x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const i64 N = xf.size(0), C = xf.size(1), H = xf.size(2), W = xf.size(3), CW = (C + 63) / 64;
  const i64 sN = xf.stride(0), sC = xf.stride(1), sH = xf.stride(2), sW = xf.stride(3);
  const i64 plane = N * H * W * CW;
  at::Tensor out = at::zeros({8, N, H, W, CW}, xf.options().dtype(at::kLong));
  u64* o = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  const float iq = static_cast<float>(inv_quantum);
  std::atomic<unsigned> any_bits{0};
  std::atomic<bool> inexact{false};
  at::parallel_for(0, N * H, 1, [&](i64 b, i64 e) {
    unsigned bits = 0;
    bool bad = false;
    for (i64 r = b; r < e; ++r) {
      const i64 off = (r / H) * sN + (r % H) * sH;
      u64* orow = o + r * W * CW;
#if BSNN_X86
      if (vec) {
        if (bf16)
          counts_row_avx512<uint16_t>(reinterpret_cast<const uint16_t*>(xf.data_ptr<at::BFloat16>()) + off, C, W,
                                      sW, iq, orow, CW, plane, &bits, &bad);
        else
          counts_row_avx512<float>(xf.data_ptr<float>() + off, C, W, sW, iq, orow, CW, plane, &bits, &bad);
        continue;
      }
#endif
      const float* xr = xf.data_ptr<float>() + off;
      for (i64 w = 0; w < W; ++w)
        for (i64 c = 0; c < C; ++c) {
          const float f = xr[w * sW + c * sC] * iq;  // exact: iq is a power of two
          if (f == 0.f) continue;
          const unsigned n = static_cast<unsigned>(f);
          if (!(f >= 1.f && f <= 255.f) || static_cast<float>(n) != f) {
            bad = true;
            continue;
          }
          bits |= n;
          const u64 bit = u64{1} << (c & 63);
          u64* word = orow + w * CW + (c >> 6);
          for (unsigned m = n; m; m &= m - 1) word[__builtin_ctz(m) * plane] |= bit;
        }
    }
    any_bits.fetch_or(bits, std::memory_order_relaxed);
    if (bad) inexact.store(true, std::memory_order_relaxed);
  });
  const unsigned all = any_bits.load();
  const i64 P = all ? 32 - __builtin_clz(all) : 1;
  return {out.narrow(0, 0, P).contiguous(), !inexact.load()};
}

// The code paths this CPU can run, comma-separated, best last (path ids 1, 2, 3).
std::string cpu_paths() {
  std::string out = "generic";
  if (cpu_has_popcnt()) out += ",popcnt";
  if (cpu_has_avx512_vpopcntdq()) out += ",avx512_vpopcntdq";
  return out;
}

}  // namespace

TORCH_LIBRARY(bsnn_bitpack, m) {
  m.def("pack", &pack);  // (x, path)
  m.def("conv", &conv);
  m.def("pack_counts", &pack_counts);  // (x, 1 / quantum, path)
  m.def("cpu_paths", &cpu_paths);
}
