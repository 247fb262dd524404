// AVX-512 kernels (F, BW, VL, DQ, F16C). Same layouts and results as
// portable.cpp up to fp32 summation order.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include <utility>

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

// Writes the lanes of a transposed-x block (activation rows blk*16 ..) to output column r.
inline void store_block(const Output& o, const Activations& a, int64_t blk, int64_t r, __m512 acc) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, acc);
  const float b = bias_of(o, r);
  for (int64_t l = 0; l < kLanes && blk * kLanes + l < a.m; ++l) o.y[(blk * kLanes + l) * o.ldy + r] = lanes[l] + b;
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

// ---- bitmap, m > 1: each kept value (found by tzcnt/blsr) FMAs one broadcast into 16 activation rows.
template <DType D>
inline void bitmap_gemm_row(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r) {
  const uint64_t* words = w.words + r * w.n_words;
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    int64_t j = w.row_ptr[r];
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t wi = 0; wi < w.n_words; ++wi) {
      uint64_t b = words[wi];
      const float* xw = xb + wi * 64 * kLanes;
#define SC_STEP(ACC)                                                                              \
  {                                                                                               \
    const int64_t c = _tzcnt_u64(b);                                                              \
    b = _blsr_u64(b);                                                                             \
    ACC = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, j++)),                         \
                          _mm512_loadu_ps(xw + c * kLanes), ACC);                                 \
  }
      while (b) {
        SC_STEP(c0);
        if (!b) break;
        SC_STEP(c1);
        if (!b) break;
        SC_STEP(c2);
        if (!b) break;
        SC_STEP(c3);
      }
#undef SC_STEP
    }
    store_block(o, a, blk, r, _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)));
  }
}

template <DType D>
void bitmap_rows(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.m == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) bitmap_gemv<D, 4>(w, a.x, o, r);
    for (; r < r1; ++r) bitmap_gemv<D, 1>(w, a.x, o, r);
  } else {
    for (int64_t r = r0; r < r1; ++r) bitmap_gemm_row<D>(w, a, o, r);
  }
}

// ---- column indices, m == 1: 16 uint16 columns widen to a gather of x.
template <DType D>
inline void columns_gemv_row(const ColumnWeight& w, const float* x, const Output& o, int64_t r) {
  constexpr int64_t E = elem_bytes<D>();
  const char* vals = static_cast<const char*>(w.values);
  int64_t j = w.row_ptr[r];
  const int64_t e = w.row_ptr[r + 1];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
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
inline void columns_gemm_row(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r) {
  const int64_t blocks = (a.m + kLanes - 1) / kLanes, e = w.row_ptr[r + 1];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t j = w.row_ptr[r];
    for (; j + 4 <= e; j += 4) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, j + q)),
                                 _mm512_loadu_ps(xb + w.cols[j + q] * kLanes), acc[q]);
      }
    }
    for (; j < e; ++j) {
      acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, j)), _mm512_loadu_ps(xb + w.cols[j] * kLanes),
                               acc[0]);
    }
    store_block(o, a, blk, r, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
}

template <DType D>
void column_rows(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (a.m == 1) {
      columns_gemv_row<D>(w, a.x, o, r);
    } else {
      columns_gemm_row<D>(w, a, o, r);
    }
  }
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

// ---- any N:M, m > 1: each slot FMAs one broadcast into 16 activation rows of the transposed x.
template <DType D>
inline void nm_gemm_row(const NMWeight& w, const Activations& a, const Output& o, int64_t r) {
  const uint8_t* pos = w.pos + r * w.pos_stride;
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  alignas(64) int32_t idx[16];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = a.x + blk * a.kp * kLanes;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t s = 0; s < w.slots; s += 16) {
      const int count = static_cast<int>(w.slots - s < 16 ? w.slots - s : 16);
      const int64_t v0 = r * w.slots + s;
      if (count == 16 && w.n == 2 && w.m == 4) {  // columns decoded in registers from one 32-bit load
        uint32_t pw;
        std::memcpy(&pw, pos + s / 4, 4);
        const float* xs = xb + 2 * s * kLanes;
#pragma GCC unroll 16
        for (int l = 0; l < 16; ++l) {
          const int64_t c = (l >> 1) * 4 + ((pw >> (2 * l)) & 3);
          acc[l & 3] = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, v0 + l)),
                                       _mm512_loadu_ps(xs + c * kLanes), acc[l & 3]);
        }
        continue;
      }
      if (w.n == 2 && w.m == 4) {
        _mm512_store_si512(idx, nm24_columns(pos, s, count));
      } else {
        nm_columns(w, pos, s, count, idx);
      }
      if (count == 16) {  // fully unrolled so that the four accumulators stay in registers
#pragma GCC unroll 16
        for (int l = 0; l < 16; ++l) {
          acc[l & 3] = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, v0 + l)),
                                       _mm512_loadu_ps(xb + idx[l] * kLanes), acc[l & 3]);
        }
      } else {
        for (int l = 0; l < count; ++l) {
          acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(load_scalar<D>(w.values, v0 + l)),
                                   _mm512_loadu_ps(xb + idx[l] * kLanes), acc[0]);
        }
      }
    }
    store_block(o, a, blk, r, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
}

template <DType D>
void nm_rows(const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  if (a.m > 1) {
    for (int64_t r = r0; r < r1; ++r) nm_gemm_row<D>(w, a, o, r);
  } else if (w.n == 2 && w.m == 4) {
    for (int64_t r = r0; r < r1; ++r) nm24_gemv_row<D>(w, a.x, o, r);
  } else {
    for (int64_t r = r0; r < r1; ++r) nm_gather_row<D>(w, a.x, o, r);
  }
}

}  // namespace

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
