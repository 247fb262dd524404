// Fused attention, AVX-512 (F, BW, VL, DQ). Same results as the portable path up to fp32 summation order and
// the polynomial exp2 (relative error < 2e-7).
//
// Per head (b, h): k is transposed once into kt [D][skp] (16 keys per vector) and v copied into vp [skp][dvp]
// when Dv is not a multiple of 16 (else read in place). Per block of up to kQueryRows query rows, the keys are
// taken in chunks of up to kKeyChunk: scores s = q kt (register tiles of up to 8 rows x 32 keys, q broadcast
// from its rows), scale + mask + causal in one pass that also finds the row maxima, in base-2 units (scores and
// mask times log2 e, so that p = 2^(s - max) = exp of the natural scores minus their max), p in place
// with the row sums, then o += p v (tiles of up to 8 rows x 64 output columns). Keys after the last one any row of
// the block attends (trailing padding, causal) are skipped. With more than one chunk the
// softmax is online: o and the sums are rescaled by 2^(old max - new max). Everything a block touches
// (s: 32 x 256 fp32 = 32 KiB at most, o, the head's kt and vp) stays in L1/L2.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>

#include <cstdlib>

#include "attention.h"

namespace sparsecore_attn {
namespace {

constexpr int64_t kKeyChunk = 256;
constexpr float kNegInf = -__builtin_inff();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round16(int64_t x) { return (x + 15) & ~int64_t{15}; }
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// 2^x for x <= 0: x = n + r, |r| <= 1/2, 2^r by its degree-6 Taylor polynomial (relative error < 2e-7), times
// 2^n by vscalefps. Inputs below -126 (-inf included) give exactly 0: their results would be denormal, which
// cost microcode assists in the p v products and weigh nothing against the row's largest term 2^0 = 1.
// A NaN input stays NaN.
inline __m512 exp2_nonpositive(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381608e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

inline float exp2_scalar(float x) { return _mm512_cvtss_f32(exp2_nonpositive(_mm512_set1_ps(x))); }

// s[r][0 .. 16 NV) = sum_d q_r[d] kt[d][0 .. 16 NV), rows r < MR.
template <int MR, int NV>
__attribute__((always_inline)) inline void qk_tile(const float* const* qrows, const float* kt, int64_t ldkt,
                                                    int64_t D, float* s, int64_t lds) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(kt + d * ldkt + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 qv = _mm512_set1_ps(qrows[r][d]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(s + r * lds + 16 * c, acc[r][c]);
}

template <int NV>
void qk_rows(int rows, const float* const* qrows, const float* kt, int64_t ldkt, int64_t D, float* s, int64_t lds) {
  switch (rows) {
    case 8: return qk_tile<8, NV>(qrows, kt, ldkt, D, s, lds);
    case 7: return qk_tile<7, NV>(qrows, kt, ldkt, D, s, lds);
    case 6: return qk_tile<6, NV>(qrows, kt, ldkt, D, s, lds);
    case 5: return qk_tile<5, NV>(qrows, kt, ldkt, D, s, lds);
    case 4: return qk_tile<4, NV>(qrows, kt, ldkt, D, s, lds);
    case 3: return qk_tile<3, NV>(qrows, kt, ldkt, D, s, lds);
    case 2: return qk_tile<2, NV>(qrows, kt, ldkt, D, s, lds);
    default: return qk_tile<1, NV>(qrows, kt, ldkt, D, s, lds);
  }
}

// o[r][0 .. 16 NV) (+)= sum_{j < nk} p[r][j] v[j][0 .. 16 NV), rows r < MR; `accumulate` reads o first.
template <int MR, int NV>
__attribute__((always_inline)) inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv,
                                                    int64_t nk, float* o, int64_t ldo, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = accumulate ? _mm512_loadu_ps(o + r * ldo + 16 * c) : _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * ldv + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 pv = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

template <int NV>
void pv_rows(int rows, const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nk, float* o, int64_t ldo,
             bool accumulate) {
  switch (rows) {
    case 8: return pv_tile<8, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 7: return pv_tile<7, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 6: return pv_tile<6, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 5: return pv_tile<5, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 4: return pv_tile<4, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 3: return pv_tile<3, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    case 2: return pv_tile<2, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
    default: return pv_tile<1, NV>(p, ldp, v, ldv, nk, o, ldo, accumulate);
  }
}

// Row tiles of 8 while the accumulators (rows x vectors) fit in 16 of the 32 registers, else 4.
void pv_block(int64_t rows, const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nk, int64_t dvp,
              float* o, int64_t ldo, bool accumulate) {
  for (int64_t c0 = 0; c0 < dvp; c0 += 64) {
    const int nv = static_cast<int>(imin(4, (dvp - c0) / 16));
    const int mr = nv <= 2 ? 8 : 4;
    for (int64_t r0 = 0; r0 < rows; r0 += mr) {
      const int rr = static_cast<int>(imin(mr, rows - r0));
      const float* pr = p + r0 * ldp;
      float* orow = o + r0 * ldo + c0;
      switch (nv) {
        case 4: pv_rows<4>(rr, pr, ldp, v + c0, ldv, nk, orow, ldo, accumulate); break;
        case 3: pv_rows<3>(rr, pr, ldp, v + c0, ldv, nk, orow, ldo, accumulate); break;
        case 2: pv_rows<2>(rr, pr, ldp, v + c0, ldv, nk, orow, ldo, accumulate); break;
        default: pv_rows<1>(rr, pr, ldp, v + c0, ldv, nk, orow, ldo, accumulate); break;
      }
    }
  }
}

// Scores of row i over keys [j0, j0 + nk) in s (nkp = round16(nk) entries), in base-2 units: times scale log2 e,
// plus the mask times log2 e, then -inf for keys past the chunk or masked by causality. Returns the row maximum (-inf when every key is masked).
float mask_row(const AttnProblem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk, float* s) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 scale = _mm512_set1_ps(p.scale * 1.44269504088896341f);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const int64_t last_key = p.causal ? i : p.Sk - 1;  // keys j > last_key are masked
  const char* mrow = nullptr;
  if (p.mask_kind != MaskKind::None) {
    const int64_t el = p.mask_kind == MaskKind::Float ? 4 : 1;
    mrow = static_cast<const char*>(p.mask) + el * (p.m_b * b + p.m_h * h + p.m_q * i);
  }
  __m512 vmax = neg_inf;
  for (int64_t c = 0; c < nk; c += 16) {
    const int64_t j = j0 + c;
    __mmask16 live = tail_mask(imin(nk - c, last_key - j + 1 < 0 ? 0 : last_key - j + 1));
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + c), scale);
    if (p.mask_kind == MaskKind::Float) {
      const float* mf = reinterpret_cast<const float*>(mrow);
      __m512 add;
      if (p.m_k == 1) {
        add = _mm512_maskz_loadu_ps(live, mf + j);
      } else {
        alignas(64) float tmp[16] = {};
        for (int64_t t = 0; t < 16 && j + t <= last_key && c + t < nk; ++t) tmp[t] = mf[(j + t) * p.m_k];
        add = _mm512_load_ps(tmp);
      }
      x = _mm512_fmadd_ps(add, log2e, x);
    } else if (p.mask_kind == MaskKind::Bool) {
      const bool* mb = reinterpret_cast<const bool*>(mrow);
      __mmask16 keep;
      if (p.m_k == 1) {
        keep = _mm_mask_test_epi8_mask(live, _mm_maskz_loadu_epi8(live, mb + j), _mm_set1_epi8(1));
      } else {
        keep = 0;
        for (int64_t t = 0; t < 16 && j + t <= last_key && c + t < nk; ++t)
          keep |= static_cast<__mmask16>(mb[(j + t) * p.m_k] ? 1u << t : 0u);
      }
      live &= keep;
    }
    x = _mm512_mask_mov_ps(neg_inf, live, x);
    _mm512_storeu_ps(s + c, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  return _mm512_reduce_max_ps(vmax);
}

// s = 2^(s - m) in place over nkp entries; returns their sum. m == -inf (all masked): s = 0, sum 0.
float exp_row(float* s, int64_t nkp, float m) {
  const __m512 vm = _mm512_set1_ps(m == kNegInf ? 0.0f : m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < nkp; c += 16) {
    const __m512 e = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));
    _mm512_storeu_ps(s + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

struct Scratch {
  float* kt = nullptr;  // [D][skp]: keys of the current head, transposed, zero past Sk
  float* vp = nullptr;  // [skp][dvp]: values, zero-padded (only when Dv % 16 != 0)
  float* s = nullptr;   // [kQueryRows][lds]: scores, then probabilities, of one key chunk
  float* o = nullptr;   // [kQueryRows][dvp]: unnormalised output rows
  float m[kQueryRows], l[kQueryRows];
};

float* alloc_floats(int64_t n) {
  void* ptr = std::aligned_alloc(64, static_cast<size_t>(round16(n > 0 ? n : 1)) * sizeof(float));
  return static_cast<float*>(ptr);
}

// In place: afterwards r[c] holds element c of every input r[0..15] (a 16 x 16 transpose).
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4a + b] holds, in 128-bit lane l, column 4l + b of rows 4a .. 4a + 3.
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);        // lanes 0, 2 of r[i], then of r[i + 4]
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);    // lanes 1, 3
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// kt [D][skp] = the head's keys transposed (zero past Sk), by 16 x 16 register transposes; vp as documented.
void pack_head(const AttnProblem& p, int64_t b, int64_t h, int64_t skp, int64_t dvp, Scratch& w) {
  const float* k = p.k + p.k_b * b + p.k_h * h;
  for (int64_t j0 = 0; j0 < skp; j0 += 16) {
    for (int64_t d0 = 0; d0 < p.D; d0 += 16) {
      const __mmask16 cols = tail_mask(p.D - d0);
      __m512 r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        r[t] = j0 + t < p.Sk ? _mm512_maskz_loadu_ps(cols, k + (j0 + t) * p.k_s + d0) : _mm512_setzero_ps();
      transpose16(r);
      const int64_t nd = imin(16, p.D - d0);
      for (int64_t t = 0; t < nd; ++t) _mm512_storeu_ps(w.kt + (d0 + t) * skp + j0, r[t]);
    }
  }
  if (w.vp != nullptr) {
    const float* v = p.v + p.v_b * b + p.v_h * h;
    const __mmask16 tail = tail_mask(p.Dv % 16);
    for (int64_t j = 0; j < skp; ++j) {
      for (int64_t c = 0; c < dvp; c += 16) {
        const __mmask16 live = j < p.Sk ? (c + 16 <= p.Dv ? __mmask16(0xFFFF) : tail) : __mmask16(0);
        _mm512_storeu_ps(w.vp + j * dvp + c, _mm512_maskz_loadu_ps(live, v + j * p.v_s + c));
      }
    }
  }
}

// Asks for the rows of q, k and v of head (b, h) to be brought into L2 while the current head computes: when
// they were evicted (by other work between calls) a head would otherwise wait on ~3 Sk strided row misses.
void prefetch_head(const AttnProblem& p, int64_t b, int64_t h) {
  const char* q = reinterpret_cast<const char*>(p.q + p.q_b * b + p.q_h * h);
  const char* k = reinterpret_cast<const char*>(p.k + p.k_b * b + p.k_h * h);
  const char* v = reinterpret_cast<const char*>(p.v + p.v_b * b + p.v_h * h);
  for (int64_t j = 0; j < p.Sk; ++j) {
    for (int64_t c = 0; c < p.D * 4; c += 64) _mm_prefetch(k + 4 * j * p.k_s + c, _MM_HINT_T1);
    for (int64_t c = 0; c < p.Dv * 4; c += 64) _mm_prefetch(v + 4 * j * p.v_s + c, _MM_HINT_T1);
  }
  for (int64_t i = 0; i < p.Sq; ++i)
    for (int64_t c = 0; c < p.D * 4; c += 64) _mm_prefetch(q + 4 * i * p.q_s + c, _MM_HINT_T1);
}

// One past the last key that some row of block [i0, i0 + rows) attends: every later key is masked for every row
// of the block and is skipped (trailing padding in a batch of unequal lengths, the far side of a causal block).
int64_t live_keys(const AttnProblem& p, int64_t b, int64_t h, int64_t i0, int64_t rows) {
  const int64_t end = p.causal ? imin(p.Sk, i0 + rows) : p.Sk;
  if (p.mask_kind == MaskKind::None) return end;
  const int64_t scanned = p.m_q == 0 ? 1 : rows;  // a mask broadcast over query rows: one row says it all
  int64_t best = 0;
  for (int64_t r = 0; r < scanned && best < end; ++r) {
    const int64_t off = p.m_b * b + p.m_h * h + p.m_q * (i0 + r);
    int64_t j = end;
    if (p.mask_kind == MaskKind::Bool) {
      const bool* m = static_cast<const bool*>(p.mask) + off;
      while (j > best && !m[(j - 1) * p.m_k]) --j;
    } else {
      const float* m = static_cast<const float*>(p.mask) + off;
      while (j > best && m[(j - 1) * p.m_k] == kNegInf) --j;
    }
    best = j;
  }
  return best;
}

void run_block(const AttnProblem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t skp, int64_t dvp,
               Scratch& w) {
  const int64_t lds = imin(kKeyChunk, skp);
  const float* qrows[kQueryRows];
  const float* q = p.q + p.q_b * b + p.q_h * h;
  for (int64_t r = 0; r < rows; ++r) qrows[r] = q + (i0 + r) * p.q_s;
  const float* vbase = w.vp != nullptr ? w.vp : p.v + p.v_b * b + p.v_h * h;
  const int64_t ldv = w.vp != nullptr ? dvp : p.v_s;
  for (int64_t r = 0; r < rows; ++r) w.m[r] = kNegInf, w.l[r] = 0.0f;

  const int64_t kend = live_keys(p, b, h, i0, rows);
  if (kend == 0)  // every key masked for every row: zeros, as the final scaling by l = 0 gives
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < dvp; c += 16) _mm512_storeu_ps(w.o + r * dvp + c, _mm512_setzero_ps());
  for (int64_t j0 = 0; j0 < kend; j0 += kKeyChunk) {
    const int64_t nk = imin(kKeyChunk, kend - j0), nkp = round16(nk);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int rr = static_cast<int>(imin(8, rows - r0));
      for (int64_t c = 0; c < nkp; c += 32) {
        if (nkp - c >= 32) qk_rows<2>(rr, qrows + r0, w.kt + j0 + c, skp, p.D, w.s + r0 * lds + c, lds);
        else qk_rows<1>(rr, qrows + r0, w.kt + j0 + c, skp, p.D, w.s + r0 * lds + c, lds);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s + r * lds;
      const float cmax = mask_row(p, b, h, i0 + r, j0, nk, s);
      const float m_new = cmax > w.m[r] ? cmax : w.m[r];
      const float sum = exp_row(s, nkp, m_new);
      if (j0 > 0 && m_new != w.m[r]) {  // rescale what earlier chunks accumulated
        const float alpha = w.m[r] == kNegInf ? 0.0f : exp2_scalar(w.m[r] - m_new);
        w.l[r] *= alpha;
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t c = 0; c < dvp; c += 16)
          _mm512_storeu_ps(w.o + r * dvp + c, _mm512_mul_ps(_mm512_loadu_ps(w.o + r * dvp + c), va));
      }
      w.m[r] = m_new;
      w.l[r] += sum;
    }
    pv_block(rows, w.s, lds, vbase + j0 * ldv, ldv, nk, dvp, w.o, dvp, j0 > 0);
  }

  const __mmask16 tail = tail_mask(p.Dv % 16);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f);
    float* dst = p.out + ((b * p.Sq + i0 + r) * p.H + h) * p.Dv;
    for (int64_t c = 0; c < p.Dv; c += 16) {
      const __mmask16 live = c + 16 <= p.Dv ? __mmask16(0xFFFF) : tail;
      _mm512_mask_storeu_ps(dst + c, live, _mm512_mul_ps(_mm512_loadu_ps(w.o + r * dvp + c), inv));
    }
  }
}

}  // namespace

void attention_items_avx512(const AttnProblem& p, int64_t item0, int64_t item1) {
  const int64_t skp = round16(p.Sk), dvp = round16(p.Dv), blocks = query_blocks(p);
  Scratch w;
  w.kt = alloc_floats(p.D * skp);
  w.vp = p.Dv % 16 != 0 ? alloc_floats(skp * dvp) : nullptr;
  w.s = alloc_floats(kQueryRows * imin(kKeyChunk, skp));
  w.o = alloc_floats(kQueryRows * dvp);
  int64_t packed = -1;  // the head whose keys and values are in kt / vp
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t head = item / blocks, blk = item % blocks;
    const int64_t b = head / p.H, h = head % p.H;
    if (head != packed) {
      pack_head(p, b, h, skp, dvp, w);
      packed = head;
      if (head + 1 < p.B * p.H) prefetch_head(p, (head + 1) / p.H, (head + 1) % p.H);
    }
    const int64_t i0 = blk * kQueryRows;
    run_block(p, b, h, i0, imin(kQueryRows, p.Sq - i0), skp, dvp, w);
  }
  std::free(w.kt);
  std::free(w.vp);
  std::free(w.s);
  std::free(w.o);
}

}  // namespace sparsecore_attn
