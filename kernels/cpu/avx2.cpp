// AVX2 + FMA kernels (F16C for half loads, BMI for bit scans). AVX2 has no compress: an 8-bit mask chunk
// indexes a 256-entry table of lane permutations that gathers x at the kept columns into the first lanes,
// to be multiplied with 8 consecutive stored values (x at pruned columns is never read into a product).
// Same layouts and results as portable.cpp up to fp32 summation order.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include <utility>

#include "common.h"

namespace sparsecore_cpu {
namespace {

struct CompressTable {
  alignas(32) int32_t perm[256][8];  // lane l of mask k takes x lane perm[k][l]: the l-th set bit of k
  alignas(32) int32_t keep[256][8];  // -1 for l < popcount(k), else 0
  constexpr CompressTable() : perm(), keep() {
    for (int k = 0; k < 256; ++k) {
      int seen = 0;
      for (int l = 0; l < 8; ++l) {
        perm[k][l] = 0;
        keep[k][l] = 0;
      }
      for (int l = 0; l < 8; ++l) {
        if ((k >> l) & 1) {
          perm[k][seen] = l;
          keep[k][seen] = -1;
          ++seen;
        }
      }
    }
  }
};
constexpr CompressTable kTable{};

// 8 consecutive stored values at p (the layout pads values so that the over-read stays inside the buffer).
template <DType D>
inline __m256 load8(const char* p) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (D == DType::BF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

// The first `count` of 8 values at p, the rest 0 (reads only the `count` values).
template <DType D>
inline __m256 load_first(const char* p, int count) {
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, p, count * elem_bytes<D>());
  return load8<D>(reinterpret_cast<const char*>(buf));
}

// x at the columns kept by mask k, in the first popcount(k) lanes; the other lanes 0.
inline __m256 compress8(uint32_t k, __m256 x) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.perm[k]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.keep[k])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(x, perm), keep);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float bias_of(const Output& o, int64_t r) { return o.bias ? o.bias[r] : 0.0f; }

inline void store_block(const Output& o, const Activations& a, int64_t blk, int64_t r, __m256 lo, __m256 hi) {
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  const float b = bias_of(o, r);
  for (int64_t l = 0; l < kLanes && blk * kLanes + l < a.m; ++l) o.y[(blk * kLanes + l) * o.ldy + r] = lanes[l] + b;
}

// ---- bitmap, m == 1: per 64-bit word, eight 8-bit table compressions of x; R rows share the x loads. The
// values past a chunk's popcount (the next ones, or the layout's padding) meet zero lanes and are finite.
template <DType D, int R>
inline void bitmap_gemv(const BitmapWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* v[R];
  const uint64_t* words[R];
  __m256 acc0[R], acc1[R];
  for (int i = 0; i < R; ++i) {
    v[i] = static_cast<const char*>(w.values) + w.row_ptr[r + i] * E;
    words[i] = w.words + (r + i) * w.n_words;
    acc0[i] = _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  for (int64_t wi = 0; wi < w.n_words; ++wi) {
    const float* xp = x + wi * 64;
#pragma GCC unroll 2
    for (int i = 0; i < R; ++i) {
      const uint64_t b = words[i][wi];
      const char* p = v[i];
#pragma GCC unroll 8
      for (int k = 0; k < 8; k += 2) {
        const uint64_t below = k ? (b & ((1ull << (8 * k)) - 1)) : 0;
        const char* q = p + _mm_popcnt_u64(below) * E;
        const uint32_t m0 = (b >> (8 * k)) & 0xff, m1 = (b >> (8 * k + 8)) & 0xff;
        acc0[i] = _mm256_fmadd_ps(load8<D>(q), compress8(m0, _mm256_loadu_ps(xp + 8 * k)), acc0[i]);
        acc1[i] = _mm256_fmadd_ps(load8<D>(q + _mm_popcnt_u32(m0) * E), compress8(m1, _mm256_loadu_ps(xp + 8 * k + 8)),
                                  acc1[i]);
      }
      v[i] = p + _mm_popcnt_u64(b) * E;
    }
  }
  for (int i = 0; i < R; ++i) o.y[r + i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + bias_of(o, r + i);
}

// ---- bitmap, m > 1: each kept value FMAs one broadcast into 16 activation rows (two ymm).
template <DType D>
inline void bitmap_gemm_row(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r) {
  const uint64_t* words = w.words + r * w.n_words;
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    int64_t j = w.row_ptr[r];
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0;
    for (int64_t wi = 0; wi < w.n_words; ++wi) {
      uint64_t b = words[wi];
      const float* xw = xb + wi * 64 * kLanes;
      while (b) {
        int64_t c = _tzcnt_u64(b);
        b = _blsr_u64(b);
        __m256 v = _mm256_set1_ps(load_scalar<D>(w.values, j++));
        l0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + c * kLanes), l0);
        h0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + c * kLanes + 8), h0);
        if (!b) break;
        c = _tzcnt_u64(b);
        b = _blsr_u64(b);
        v = _mm256_set1_ps(load_scalar<D>(w.values, j++));
        l1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + c * kLanes), l1);
        h1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + c * kLanes + 8), h1);
      }
    }
    store_block(o, a, blk, r, _mm256_add_ps(l0, l1), _mm256_add_ps(h0, h1));
  }
}

template <DType D>
void bitmap_rows(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.mt == 1) {
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) bitmap_gemv<D, 2>(w, a.x, o, r);
    for (; r < r1; ++r) bitmap_gemv<D, 1>(w, a.x, o, r);
  } else {
    for (int64_t r = r0; r < r1; ++r) bitmap_gemm_row<D>(w, a, o, r);
  }
}

// ---- column indices, m == 1: 8 uint16 columns widen to a gather of x.
template <DType D>
inline void columns_gemv_row(const ColumnWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values);
  int64_t j = w.row_ptr[r];
  const int64_t e = w.row_ptr[r + 1];
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; j + 16 <= e; j += 16) {
    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.cols + j)));
    const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.cols + j + 8)));
    a0 = _mm256_fmadd_ps(load8<D>(vals + j * E), _mm256_i32gather_ps(x, i0, 4), a0);
    a1 = _mm256_fmadd_ps(load8<D>(vals + (j + 8) * E), _mm256_i32gather_ps(x, i1, 4), a1);
  }
  float tail = 0.0f;
  for (; j < e; ++j) tail += load_scalar<D>(w.values, j) * x[w.cols[j]];
  o.y[r] = hsum(_mm256_add_ps(a0, a1)) + tail + bias_of(o, r);
}

template <DType D>
inline void columns_gemm_row(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r) {
  const int64_t blocks = (a.m + kLanes - 1) / kLanes, e = w.row_ptr[r + 1];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    __m256 lo[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, hi[2] = {lo[0], lo[0]};
    int64_t j = w.row_ptr[r];
    for (; j + 2 <= e; j += 2) {  // two named accumulator pairs stay in registers
      const __m256 va = _mm256_set1_ps(load_scalar<D>(w.values, j));
      const __m256 vb = _mm256_set1_ps(load_scalar<D>(w.values, j + 1));
      const float* xa = xb + w.cols[j] * kLanes;
      const float* xc = xb + w.cols[j + 1] * kLanes;
      lo[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xa), lo[0]);
      hi[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xa + 8), hi[0]);
      lo[1] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xc), lo[1]);
      hi[1] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xc + 8), hi[1]);
    }
    if (j < e) {
      const __m256 va = _mm256_set1_ps(load_scalar<D>(w.values, j));
      lo[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xb + w.cols[j] * kLanes), lo[0]);
      hi[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xb + w.cols[j] * kLanes + 8), hi[0]);
    }
    store_block(o, a, blk, r, _mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(hi[0], hi[1]));
  }
}

template <DType D>
void column_rows(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (a.mt == 1) {
      columns_gemv_row<D>(w, a.x, o, r);
    } else {
      columns_gemm_row<D>(w, a, o, r);
    }
  }
}

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

// ---- 2:4, m == 1: 8 kept values cover 16 columns; two 8-lane permutes of x blended on index bit 3.
template <DType D>
inline void nm24_gemv_row(const NMWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values) + r * w.slots * E;
  const uint8_t* pos = w.pos + r * w.pos_stride;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  const int64_t chunks = w.slots / 8, rem = w.slots % 8;
  auto xs = [&](int64_t c, uint32_t pw) {  // x at the 8 slots' columns
    const __m256i idx = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(pw), shifts), three), base);
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c), idx);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c + 8), idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
  };
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    uint16_t pw[2];
    std::memcpy(pw, pos + 2 * c, 4);
    a0 = _mm256_fmadd_ps(load8<D>(vals + 8 * c * E), xs(c, pw[0]), a0);
    a1 = _mm256_fmadd_ps(load8<D>(vals + 8 * (c + 1) * E), xs(c + 1, pw[1]), a1);
  }
  for (; c < chunks; ++c) {
    uint16_t pw;
    std::memcpy(&pw, pos + 2 * c, 2);
    a0 = _mm256_fmadd_ps(load8<D>(vals + 8 * c * E), xs(c, pw), a0);
  }
  if (rem) {
    uint16_t pw = 0;
    std::memcpy(&pw, pos + 2 * c, (rem * 2 + 7) / 8);
    // lanes past the last slot are cleared so that x at their (pruned) columns never meets a product
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lane));
    a1 = _mm256_fmadd_ps(load_first<D>(vals + 8 * c * E, static_cast<int>(rem)), _mm256_and_ps(xs(c, pw), live), a1);
  }
  o.y[r] = hsum(_mm256_add_ps(a0, a1)) + bias_of(o, r);
}

// ---- any N:M, m == 1: scalar-decoded columns, an 8-lane gather of x.
template <DType D>
inline void nm_gather_row(const NMWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values) + r * w.slots * E;
  const uint8_t* pos = w.pos + r * w.pos_stride;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  alignas(32) int32_t idx[8];
  for (int64_t s = 0; s < w.slots; s += 8) {
    const int count = static_cast<int>(w.slots - s < 8 ? w.slots - s : 8);
    for (int l = count; l < 8; ++l) idx[l] = 0;
    nm_columns(w, pos, s, count, idx);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane));
    const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x,
                                               _mm256_load_si256(reinterpret_cast<const __m256i*>(idx)), live, 4);
    const __m256 v = count == 8 ? load8<D>(vals + s * E) : load_first<D>(vals + s * E, count);
    a0 = _mm256_fmadd_ps(v, xv, a0);
    std::swap(a0, a1);
  }
  o.y[r] = hsum(_mm256_add_ps(a0, a1)) + bias_of(o, r);
}

template <DType D>
inline void nm_gemm_row(const NMWeight& w, const Activations& a, const Output& o, int64_t r) {
  const uint8_t* pos = w.pos + r * w.pos_stride;
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  alignas(32) int32_t idx[16];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    __m256 lo[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, hi[2] = {lo[0], lo[0]};
    for (int64_t s = 0; s < w.slots; s += 16) {
      const int count = static_cast<int>(w.slots - s < 16 ? w.slots - s : 16);
      if (w.n == 2 && w.m == 4) {  // 2-bit positions of 16 slots: one 32-bit load, two 8-lane decodes
        uint32_t pw = 0;
        std::memcpy(&pw, pos + s / 4, (count * 2 + 7) / 8);
        const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        const __m256i base = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(s * 2)),
                                              _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12));
        const __m256i three = _mm256_set1_epi32(3);
        const __m256i lo = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(pw), shifts), three), base);
        const __m256i hi = _mm256_add_epi32(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(pw >> 16), shifts), three),
            _mm256_add_epi32(base, _mm256_set1_epi32(16)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx + 8), hi);
      } else {
        nm_columns(w, pos, s, count, idx);
      }
      const int64_t v0 = r * w.slots + s;
      int l = 0;
      for (; l + 2 <= count; l += 2) {  // two named accumulator pairs stay in registers
        const __m256 va = _mm256_set1_ps(load_scalar<D>(w.values, v0 + l));
        const __m256 vb = _mm256_set1_ps(load_scalar<D>(w.values, v0 + l + 1));
        const float* xa = xb + idx[l] * kLanes;
        const float* xc = xb + idx[l + 1] * kLanes;
        lo[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xa), lo[0]);
        hi[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xa + 8), hi[0]);
        lo[1] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xc), lo[1]);
        hi[1] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(xc + 8), hi[1]);
      }
      if (l < count) {
        const __m256 va = _mm256_set1_ps(load_scalar<D>(w.values, v0 + l));
        lo[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xb + idx[l] * kLanes), lo[0]);
        hi[0] = _mm256_fmadd_ps(va, _mm256_loadu_ps(xb + idx[l] * kLanes + 8), hi[0]);
      }
    }
    store_block(o, a, blk, r, _mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(hi[0], hi[1]));
  }
}

template <DType D>
void nm_rows(const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.mt > 1) {
    for (int64_t r = r0; r < r1; ++r) nm_gemm_row<D>(w, a, o, r);
  } else if (w.n == 2 && w.m == 4) {
    for (int64_t r = r0; r < r1; ++r) nm24_gemv_row<D>(w, a.x, o, r);
  } else {
    for (int64_t r = r0; r < r1; ++r) nm_gather_row<D>(w, a.x, o, r);
  }
}

}  // namespace

void bitmap_linear_avx2(DType d, const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0,
                        int64_t r1) {
  switch (d) {
    case DType::F32: return bitmap_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return bitmap_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return bitmap_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void columns_linear_avx2(DType d, const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0,
                         int64_t r1) {
  switch (d) {
    case DType::F32: return column_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return column_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return column_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void nm_linear_avx2(DType d, const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  switch (d) {
    case DType::F32: return nm_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return nm_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return nm_rows<DType::F16>(w, a, o, r0, r1);
  }
}

}  // namespace sparsecore_cpu
