// AVX-512 kernels (F, BW, VL, DQ, F16C). Same layouts and results as
// portable.cpp up to fp32 summation order.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace sparsecore_cpu {
namespace {

// The first lanes of m of 16 consecutive values at p (masked lanes 0, never read).
template <DType D>
inline __m512 load16(__mmask16 m, const char* p) {
  if constexpr (D == DType::F32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (D == DType::BF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

inline float bias_of(const Output& o, int64_t r) { return o.bias ? o.bias[r] : 0.0f; }

// ---- m > 1: tiles of mt = 16 V activation rows, xt [tiles][kp][mt].

// In place: afterwards r[c] holds element c of every input r[0..15] (a 16 x 16 transpose).
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per 128-bit lane: r_i c0, r_i+1 c0, r_i c1, r_i+1 c1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // r_i c2, r_i+1 c2, r_i c3, r_i+1 c3
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3 of columns 0..3 of each 128-bit lane
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {  // lane L of u[q], u[4 + q], u[8 + q], u[12 + q] is column 4 L + q
    const __m512 p0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88), p1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);
    const __m512 p2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88);
    const __m512 p3 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xDD);
    r[q] = _mm512_shuffle_f32x4(p0, p2, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(p1, p3, 0x88);
    r[8 + q] = _mm512_shuffle_f32x4(p0, p2, 0xDD);
    r[12 + q] = _mm512_shuffle_f32x4(p1, p3, 0xDD);
  }
}

// Kept entries ahead whose x lines are prefetched: the columns are data-dependent, so the hardware prefetcher
// cannot see them coming. Every column list has >= 16 entries of padding, so reading the index is in bounds.
constexpr int64_t kPrefetchAhead = 8;

// Writes s to out, or adds it to what out holds (the sums of earlier K panels).
inline void put(float* out, __m512 s, bool add) {
  _mm512_store_ps(out, add ? _mm512_add_ps(_mm512_load_ps(out), s) : s);
}

// out[16 i ..] (+)= sum over kept entries e of value[e] * xt[cols[e]][16 i ..], for i < V. One broadcast feeds
// V FMAs; below V = 4, U sets of accumulators keep 4+ FMA chains in flight.
template <DType D, int V, class Col>
__attribute__((always_inline)) inline void dot_entries(const Col* cols, const void* vals, int64_t j0, int64_t cnt,
                                                       const float* xt, int64_t mt, float* out, bool add) {
  constexpr int U = V >= 4 ? 1 : (V == 1 ? 4 : 2);
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < V; ++i) acc[u][i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U <= cnt; j += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512 v = _mm512_set1_ps(load_scalar<D>(vals, j0 + j + u));
      const float* xc = xt + static_cast<int64_t>(cols[j + u]) * mt;
      const char* xf = reinterpret_cast<const char*>(xt + static_cast<int64_t>(cols[j + u + kPrefetchAhead]) * mt);
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) _mm_prefetch(xf + 64 * i, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) acc[u][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), acc[u][i]);
    }
  }
  for (; j < cnt; ++j) {
    const __m512 v = _mm512_set1_ps(load_scalar<D>(vals, j0 + j));
    const float* xc = xt + static_cast<int64_t>(cols[j]) * mt;
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) acc[0][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), acc[0][i]);
  }
  for (int i = 0; i < V; ++i) {
    __m512 s = acc[0][i];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][i]);
    put(out + 16 * i, s, add);
  }
}

// buf [16][mt] holds output features g .. g + gn for the tile's activation rows m0 .. m0 + rows: transposed
// 16 x 16 at a time into y rows (bias added, gn columns written).
inline void store_tile(const float* buf, int64_t mt, int gn, int64_t rows, const Output& o, int64_t m0, int64_t g) {
  const __mmask16 cm = static_cast<__mmask16>((1u << gn) - 1);
  const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(cm, o.bias + g) : _mm512_setzero_ps();
  for (int64_t b = 0; b * 16 < rows; ++b) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < gn ? _mm512_load_ps(buf + i * mt + 16 * b) : _mm512_setzero_ps();
    transpose16(r);
    const int64_t lanes = rows - 16 * b < 16 ? rows - 16 * b : 16;
    for (int64_t l = 0; l < lanes; ++l) _mm512_mask_storeu_ps(o.y + (m0 + 16 * b + l) * o.ldy + g, cm, _mm512_add_ps(r[l], bias));
  }
}

// The same sum over bitmap words [w0, w1) of a feature: each kept column found by tzcnt/blsr feeds its FMAs
// at once (no decode pass); values[j ..] in column order, j advanced past the entries used.
template <DType D, int V>
__attribute__((always_inline)) inline void dot_bitmap(const uint64_t* words, int64_t w0, int64_t w1, const void* vals,
                                                      int64_t& cursor, const float* xt, int64_t mt, float* out,
                                                      bool add) {
  constexpr int U = V >= 4 ? 1 : (V == 1 ? 4 : 2);
  int64_t j = cursor;
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < V; ++i) acc[u][i] = _mm512_setzero_ps();
  for (int64_t wi = w0; wi < w1; ++wi) {
    uint64_t b = words[wi];
    const float* xw = xt + wi * 64 * mt;
    while (b) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        if (!b) break;
        const float* xc = xw + static_cast<int64_t>(_tzcnt_u64(b)) * mt;
        b = _blsr_u64(b);
        const __m512 v = _mm512_set1_ps(load_scalar<D>(vals, j++));
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i) acc[u][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), acc[u][i]);
      }
    }
  }
  cursor = j;
  for (int i = 0; i < V; ++i) {
    __m512 s = acc[0][i];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][i]);
    put(out + 16 * i, s, add);
  }
}

// First entry at or after j (and before e) whose column is >= k1 (k1 < 65536), for increasing columns.
inline int64_t columns_below(const uint16_t* cols, int64_t j, int64_t e, int64_t k1) {
  const __m512i lim = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(k1)));
  while (j < e) {
    const __mmask32 valid = e - j >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << (e - j)) - 1);
    const __mmask32 lt = _mm512_mask_cmplt_epu16_mask(valid, _mm512_maskz_loadu_epi16(valid, cols + j), lim);
    const int64_t run = _tzcnt_u32(~static_cast<uint32_t>(lt));
    j += run;
    if (run < 32) break;
  }
  return j < e ? j : e;
}

// Output features [r0, r1) for every tile of a. `dot.start(r)` is feature r's first entry; `dot(V, r, j, k0, k1,
// xt, mt, out, add)` writes (add: adds) the mt sums of its entries with columns in [k0, k1), from entry j on,
// to out and leaves j past them. With one K panel, 16 features at a time go through buf and are transposed
// into y; with more (a.kpanel < a.kp, so that the panel of x in use stays in L2), every feature of the range
// accumulates panel after panel in acc [r1 - r0][mt], and is transposed into y at the end.
template <int V, class Dot>
void gemm_tiles(const Activations& a, const Output& o, int64_t r0, int64_t r1, Dot& dot) {
  constexpr int64_t mt = 16 * V;
  const std::integral_constant<int, V> vc{};
  const int64_t tiles = (a.m + mt - 1) / mt;
  if (a.kpanel >= a.kp) {
    alignas(64) float buf[16 * mt];
    for (int64_t t = 0; t < tiles; ++t) {
      const float* xt = a.x + t * a.kp * mt;
      const int64_t rows = a.m - t * mt < mt ? a.m - t * mt : mt;
      for (int64_t g = r0; g < r1; g += 16) {
        const int gn = static_cast<int>(r1 - g < 16 ? r1 - g : 16);
        for (int i = 0; i < gn; ++i) dot.whole(vc, g + i, xt, mt, buf + i * mt);
        store_tile(buf, mt, gn, rows, o, t * mt, g);
      }
    }
    return;
  }
  thread_local std::vector<float> acc_store;
  thread_local std::vector<int64_t> cursor;
  const int64_t nf = r1 - r0;
  acc_store.resize(nf * mt + 16);
  cursor.resize(nf);
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(acc_store.data()) + 63) & ~uintptr_t{63});
  for (int64_t t = 0; t < tiles; ++t) {
    const float* xt = a.x + t * a.kp * mt;
    const int64_t rows = a.m - t * mt < mt ? a.m - t * mt : mt;
    for (int64_t f = 0; f < nf; ++f) cursor[f] = dot.start(r0 + f);
    for (int64_t k0 = 0; k0 < a.kp; k0 += a.kpanel) {
      const int64_t k1 = a.kp - k0 < a.kpanel ? a.kp : k0 + a.kpanel;
      for (int64_t f = 0; f < nf; ++f) dot(vc, r0 + f, cursor[f], k0, k1, xt, mt, acc + f * mt, k0 > 0);
    }
    for (int64_t g = 0; g < nf; g += 16) {
      store_tile(acc + g * mt, mt, static_cast<int>(nf - g < 16 ? nf - g : 16), rows, o, t * mt, r0 + g);
    }
  }
}

template <class Dot>
void gemm_dispatch(const Activations& a, const Output& o, int64_t r0, int64_t r1, Dot&& dot) {
  switch (a.mt / 16) {
    case 1: return gemm_tiles<1>(a, o, r0, r1, dot);
    case 2: return gemm_tiles<2>(a, o, r0, r1, dot);
    case 3: return gemm_tiles<3>(a, o, r0, r1, dot);
    case 4: return gemm_tiles<4>(a, o, r0, r1, dot);
    case 5: return gemm_tiles<5>(a, o, r0, r1, dot);
    case 6: return gemm_tiles<6>(a, o, r0, r1, dot);
    case 7: return gemm_tiles<7>(a, o, r0, r1, dot);
    default: return gemm_tiles<8>(a, o, r0, r1, dot);
  }
}

// ---- bitmap, m == 1: R rows at once share the x loads. Per 16-bit chunk of a 64-bit word, x is compressed
// to the kept columns (register-form vcompressps; the expand-load from memory is slower on AMD Zen 4) and
// multiplied with 16 consecutive stored values: lanes past the chunk's popcount hit compressed zeros, and
// the values they read (the next ones, or the layout's padding) are finite.
template <DType D, int R>
inline void bitmap_gemv(const BitmapWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* v[R];
  const uint64_t* words[R];
  __m512 acc0[R], acc1[R];
  for (int i = 0; i < R; ++i) {
    v[i] = static_cast<const char*>(w.values) + w.row_ptr[r + i] * E;
    words[i] = w.words + (r + i) * w.n_words;
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t wi = 0; wi < w.n_words; ++wi) {
    const float* xp = x + wi * 64;
    const __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16);
    const __m512 x2 = _mm512_loadu_ps(xp + 32), x3 = _mm512_loadu_ps(xp + 48);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const uint64_t b = words[i][wi];
      const char* p = v[i];
      const int64_t o1 = _mm_popcnt_u64(b & 0xffffull), o2 = _mm_popcnt_u64(b & 0xffffffffull);
      const int64_t o3 = _mm_popcnt_u64(b & 0xffffffffffffull), o4 = _mm_popcnt_u64(b);
      acc0[i] = _mm512_fmadd_ps(load16<D>(0xffff, p), _mm512_maskz_compress_ps(static_cast<__mmask16>(b), x0), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(load16<D>(0xffff, p + o1 * E),
                                _mm512_maskz_compress_ps(static_cast<__mmask16>(b >> 16), x1), acc1[i]);
      acc0[i] = _mm512_fmadd_ps(load16<D>(0xffff, p + o2 * E),
                                _mm512_maskz_compress_ps(static_cast<__mmask16>(b >> 32), x2), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(load16<D>(0xffff, p + o3 * E),
                                _mm512_maskz_compress_ps(static_cast<__mmask16>(b >> 48), x3), acc1[i]);
      v[i] = p + o4 * E;
    }
  }
  for (int i = 0; i < R; ++i) {
    o.y[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i])) + bias_of(o, r + i);
  }
}

// The dot functors of gemm_tiles for each layout.
template <DType D>
struct BitmapDot {
  const BitmapWeight& w;
  int64_t start(int64_t r) const { return w.row_ptr[r]; }
  template <class VC>
  void operator()(VC, int64_t r, int64_t& j, int64_t k0, int64_t k1, const float* xt, int64_t mt, float* out,
                  bool add) const {
    dot_bitmap<D, VC::value>(w.words + r * w.n_words, k0 / 64, k1 / 64, w.values, j, xt, mt, out, add);
  }
  template <class VC>
  void whole(VC, int64_t r, const float* xt, int64_t mt, float* out) const {
    int64_t j = w.row_ptr[r];
    dot_bitmap<D, VC::value>(w.words + r * w.n_words, 0, w.n_words, w.values, j, xt, mt, out, false);
  }
};

template <DType D>
struct ColumnDot {
  const ColumnWeight& w;
  int64_t kp;
  int64_t start(int64_t r) const { return w.row_ptr[r]; }
  template <class VC>
  void operator()(VC, int64_t r, int64_t& j, int64_t k0, int64_t k1, const float* xt, int64_t mt, float* out,
                  bool add) const {
    const int64_t e = w.row_ptr[r + 1], je = k1 >= kp ? e : columns_below(w.cols, j, e, k1);
    dot_entries<D, VC::value>(w.cols + j, w.values, j, je - j, xt, mt, out, add);
    j = je;
  }
  template <class VC>
  void whole(VC, int64_t r, const float* xt, int64_t mt, float* out) const {
    const int64_t j0 = w.row_ptr[r];
    dot_entries<D, VC::value>(w.cols + j0, w.values, j0, w.row_ptr[r + 1] - j0, xt, mt, out, false);
  }
};

template <DType D>
void bitmap_rows(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.mt == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) bitmap_gemv<D, 4>(w, a.x, o, r);
    for (; r < r1; ++r) bitmap_gemv<D, 1>(w, a.x, o, r);
  } else {
    gemm_dispatch(a, o, r0, r1, BitmapDot<D>{w});
  }
}

// ---- column indices, m == 1: 16 uint16 columns widen to a gather of x.
template <DType D>
inline void columns_gemv_row(const ColumnWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values);
  int64_t j = w.row_ptr[r];
  const int64_t e = w.row_ptr[r + 1];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 64 <= e; j += 64) {
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j)));
    const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j + 16)));
    const __m512i i2 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j + 32)));
    const __m512i i3 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j + 48)));
    a0 = _mm512_fmadd_ps(load16<D>(0xffff, vals + j * E), _mm512_i32gather_ps(i0, x, 4), a0);
    a1 = _mm512_fmadd_ps(load16<D>(0xffff, vals + (j + 16) * E), _mm512_i32gather_ps(i1, x, 4), a1);
    a2 = _mm512_fmadd_ps(load16<D>(0xffff, vals + (j + 32) * E), _mm512_i32gather_ps(i2, x, 4), a2);
    a3 = _mm512_fmadd_ps(load16<D>(0xffff, vals + (j + 48) * E), _mm512_i32gather_ps(i3, x, 4), a3);
  }
  a0 = _mm512_add_ps(a0, a2);
  a1 = _mm512_add_ps(a1, a3);
  for (; j + 32 <= e; j += 32) {
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j)));
    const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.cols + j + 16)));
    a0 = _mm512_fmadd_ps(load16<D>(0xffff, vals + j * E), _mm512_i32gather_ps(i0, x, 4), a0);
    a1 = _mm512_fmadd_ps(load16<D>(0xffff, vals + (j + 16) * E), _mm512_i32gather_ps(i1, x, 4), a1);
  }
  for (; j < e; j += 16) {
    const __mmask16 m = e - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (e - j)) - 1);
    const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w.cols + j));
    a0 = _mm512_fmadd_ps(load16<D>(m, vals + j * E), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4), a0);
  }
  o.y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + bias_of(o, r);
}

template <DType D>
void column_rows(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.mt == 1) {
    for (int64_t r = r0; r < r1; ++r) columns_gemv_row<D>(w, a.x, o, r);
    return;
  }
  gemm_dispatch(a, o, r0, r1, ColumnDot<D>{w, a.kp});
}

// ---- 2:4, m == 1: 16 kept values cover 32 columns; their 2-bit positions (one 32-bit load) become the
// indices of a two-register permute of x.
template <DType D>
inline void nm24_gemv_row(const NMWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values) + r * w.slots * E;
  const uint8_t* pos = w.pos + r * w.pos_stride;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const int64_t chunks = w.slots / 16, rem = w.slots % 16;
  auto step = [&](int64_t c, uint32_t pw, __mmask16 m, __m512& a) {
    const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(pw), shifts), three), base);
    const __m512 xv = _mm512_maskz_permutex2var_ps(m, _mm512_loadu_ps(x + 32 * c), idx, _mm512_loadu_ps(x + 32 * c + 16));
    a = _mm512_fmadd_ps(load16<D>(m, vals + 16 * c * E), xv, a);
  };
  int64_t c = 0;
  for (; c + 4 <= chunks; c += 4) {
    uint32_t pw[4];
    std::memcpy(pw, pos + 4 * c, 16);
    step(c, pw[0], 0xffff, acc[0]);
    step(c + 1, pw[1], 0xffff, acc[1]);
    step(c + 2, pw[2], 0xffff, acc[2]);
    step(c + 3, pw[3], 0xffff, acc[3]);
  }
  for (; c < chunks; ++c) {
    uint32_t pw;
    std::memcpy(&pw, pos + 4 * c, 4);
    step(c, pw, 0xffff, acc[0]);
  }
  if (rem) {
    uint32_t pw = 0;
    std::memcpy(&pw, pos + 4 * c, (rem * 2 + 7) / 8);
    step(c, pw, static_cast<__mmask16>((1u << rem) - 1), acc[1]);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  o.y[r] = _mm512_reduce_add_ps(s) + bias_of(o, r);
}

// Column of every slot of row `pos` in [s0, s0 + count), written to idx.
inline void nm_columns(const NMWeight& w, const uint8_t* pos, int64_t s0, int count, int32_t* idx) {
  const int bits = w.m == 4 ? 2 : 3;
  int64_t g = s0 / w.n;
  int jn = static_cast<int>(s0 % w.n);
  for (int l = 0; l < count; ++l) {
    idx[l] = static_cast<int32_t>(g * w.m + nm_position(pos, s0 + l, bits));
    if (++jn == w.n) {
      jn = 0;
      ++g;
    }
  }
}

// Columns of 2:4 slots [s0, s0 + count) (s0 a multiple of 16): one 32-bit load of 2-bit positions.
inline __m512i nm24_columns(const uint8_t* pos, int64_t s0, int count) {
  uint32_t pw = 0;
  std::memcpy(&pw, pos + s0 / 4, (count * 2 + 7) / 8);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(s0 * 2)),
                                        _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
  return _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(pw), shifts), _mm512_set1_epi32(3)), base);
}

// ---- any N:M, m == 1: scalar-decoded columns, a 16-lane gather of x.
template <DType D>
inline void nm_gather_row(const NMWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values) + r * w.slots * E;
  const uint8_t* pos = w.pos + r * w.pos_stride;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  alignas(64) int32_t idx[16];
  for (int64_t s = 0; s < w.slots; s += 16) {
    const int count = static_cast<int>(w.slots - s < 16 ? w.slots - s : 16);
    const __mmask16 m = static_cast<__mmask16>((1u << count) - 1);
    nm_columns(w, pos, s, count, idx);
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_load_si512(idx), x, 4);
    a0 = _mm512_fmadd_ps(load16<D>(m, vals + s * E), xv, a0);
    std::swap(a0, a1);
  }
  o.y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + bias_of(o, r);
}

// N:M: the columns of a feature's slots in the panel are decoded into scratch first, then V FMAs per slot.
template <DType D>
struct NMDot {
  const NMWeight& w;
  std::vector<int32_t> scratch;
  int64_t start(int64_t) const { return 0; }
  template <class VC>
  void operator()(VC, int64_t r, int64_t&, int64_t k0, int64_t k1, const float* xt, int64_t mt, float* out,
                  bool add) {
    const uint8_t* pos = w.pos + r * w.pos_stride;
    const int64_t s0 = k0 / w.m * w.n, s1 = k1 / w.m * w.n < w.slots ? k1 / w.m * w.n : w.slots;
    for (int64_t s = s0; s < s1; s += 16) {
      const int count = static_cast<int>(s1 - s < 16 ? s1 - s : 16);
      if (w.n == 2 && w.m == 4) {
        _mm512_storeu_si512(scratch.data() + (s - s0), nm24_columns(pos, s, count));
      } else {
        nm_columns(w, pos, s, count, scratch.data() + (s - s0));
      }
    }
    dot_entries<D, VC::value>(scratch.data(), w.values, r * w.slots + s0, s1 - s0, xt, mt, out, add);
  }
  template <class VC>
  void whole(VC vc, int64_t r, const float* xt, int64_t mt, float* out) {
    int64_t unused = 0;
    (*this)(vc, r, unused, 0, w.slots / w.n * w.m, xt, mt, out, false);
  }
};

template <DType D>
void nm_rows(const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.mt > 1) {
    gemm_dispatch(a, o, r0, r1, NMDot<D>{w, std::vector<int32_t>(w.slots + 16)});
  } else if (w.n == 2 && w.m == 4) {
    for (int64_t r = r0; r < r1; ++r) nm24_gemv_row<D>(w, a.x, o, r);
  } else {
    for (int64_t r = r0; r < r1; ++r) nm_gather_row<D>(w, a.x, o, r);
  }
}

template <DType D>
void pack_rows(const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst, int64_t b0,
               int64_t b1) {
  constexpr int64_t E = elem_bytes<D>();
  const char* src = static_cast<const char*>(x);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t = b * 16 / mt, l0 = b * 16 % mt, i0 = b * 16;
    const int64_t nr = m - i0 < 0 ? 0 : (m - i0 < 16 ? m - i0 : 16);
    float* tile = dst + t * kp * mt + l0;
    for (int64_t c0 = 0; c0 < kp; c0 += 16) {
      const int64_t nc = k - c0 < 0 ? 0 : (k - c0 < 16 ? k - c0 : 16);
      const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < nr && nc ? load16<D>(cm, src + ((i0 + i) * ldx + c0) * E) : _mm512_setzero_ps();
      }
      transpose16(r);
#pragma GCC unroll 16
      for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(tile + (c0 + c) * mt, r[c]);
    }
  }
}

}  // namespace

void pack_rows_avx512(DType d, const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst,
                      int64_t b0, int64_t b1) {
  switch (d) {
    case DType::F32: return pack_rows<DType::F32>(x, ldx, m, k, kp, mt, dst, b0, b1);
    case DType::BF16: return pack_rows<DType::BF16>(x, ldx, m, k, kp, mt, dst, b0, b1);
    case DType::F16: return pack_rows<DType::F16>(x, ldx, m, k, kp, mt, dst, b0, b1);
  }
}

void bitmap_linear_avx512(DType d, const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0,
                          int64_t r1) {
  switch (d) {
    case DType::F32: return bitmap_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return bitmap_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return bitmap_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void columns_linear_avx512(DType d, const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0,
                           int64_t r1) {
  switch (d) {
    case DType::F32: return column_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return column_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return column_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void nm_linear_avx512(DType d, const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  switch (d) {
    case DType::F32: return nm_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return nm_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return nm_rows<DType::F16>(w, a, o, r0, r1);
  }
}

}  // namespace sparsecore_cpu
