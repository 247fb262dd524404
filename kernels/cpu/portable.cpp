// Portable C++ kernels: the oracle of the vector ISA files (same layouts, same row ranges, scalar loops).
#include "common.h"

namespace sparsecore_cpu {
namespace {

inline float bias_of(const Output& o, int64_t r) { return o.bias ? o.bias[r] : 0.0f; }

template <DType D>
void bitmap_rows(const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* words = w.words + r * w.n_words;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      float acc[kLanes] = {};
      int64_t j = w.row_ptr[r];
      for (int64_t wi = 0; wi < w.n_words; ++wi) {
        for (uint64_t b = words[wi]; b; b &= b - 1) {
          const int64_t c = wi * 64 + __builtin_ctzll(b);
          const float v = load_scalar<D>(w.values, j++);
          if (a.mt == 1) {
            acc[0] += v * a.x[c];
          } else {
            const float* xc = a.x + (blk * a.kp + c) * kLanes;
            for (int l = 0; l < kLanes; ++l) acc[l] += v * xc[l];
          }
        }
      }
      for (int64_t l = 0; l < kLanes && blk * kLanes + l < a.m; ++l) {
        o.y[(blk * kLanes + l) * o.ldy + r] = acc[l] + bias_of(o, r);
      }
    }
  }
}

template <DType D>
void column_rows(const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      float acc[kLanes] = {};
      for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
        const int64_t c = w.cols[j];
        const float v = load_scalar<D>(w.values, j);
        if (a.mt == 1) {
          acc[0] += v * a.x[c];
        } else {
          const float* xc = a.x + (blk * a.kp + c) * kLanes;
          for (int l = 0; l < kLanes; ++l) acc[l] += v * xc[l];
        }
      }
      for (int64_t l = 0; l < kLanes && blk * kLanes + l < a.m; ++l) {
        o.y[(blk * kLanes + l) * o.ldy + r] = acc[l] + bias_of(o, r);
      }
    }
  }
}

template <DType D>
void nm_rows(const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  const int bits = w.m == 4 ? 2 : 3;
  const int64_t blocks = (a.m + kLanes - 1) / kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* pos = w.pos + r * w.pos_stride;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      float acc[kLanes] = {};
      for (int64_t s = 0; s < w.slots; ++s) {
        const int64_t c = (s / w.n) * w.m + nm_position(pos, s, bits);
        const float v = load_scalar<D>(w.values, r * w.slots + s);
        if (a.mt == 1) {
          acc[0] += v * a.x[c];
        } else {
          const float* xc = a.x + (blk * a.kp + c) * kLanes;
          for (int l = 0; l < kLanes; ++l) acc[l] += v * xc[l];
        }
      }
      for (int64_t l = 0; l < kLanes && blk * kLanes + l < a.m; ++l) {
        o.y[(blk * kLanes + l) * o.ldy + r] = acc[l] + bias_of(o, r);
      }
    }
  }
}

template <DType D>
void pack_rows(const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst, int64_t b0,
               int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t = b * kLanes / mt, l0 = b * kLanes % mt;
    float* tile = dst + t * kp * mt + l0;
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = b * kLanes + l;
      for (int64_t c = 0; c < kp; ++c) tile[c * mt + l] = i < m && c < k ? load_scalar<D>(x, i * ldx + c) : 0.0f;
    }
  }
}

}  // namespace

void pack_rows_portable(DType d, const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst,
                        int64_t b0, int64_t b1) {
  switch (d) {
    case DType::F32: return pack_rows<DType::F32>(x, ldx, m, k, kp, mt, dst, b0, b1);
    case DType::BF16: return pack_rows<DType::BF16>(x, ldx, m, k, kp, mt, dst, b0, b1);
    case DType::F16: return pack_rows<DType::F16>(x, ldx, m, k, kp, mt, dst, b0, b1);
  }
}

void bitmap_linear_portable(DType d, const BitmapWeight& w, const Activations& a, const Output& o, int64_t r0,
                            int64_t r1) {
  switch (d) {
    case DType::F32: return bitmap_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return bitmap_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return bitmap_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void columns_linear_portable(DType d, const ColumnWeight& w, const Activations& a, const Output& o, int64_t r0,
                             int64_t r1) {
  switch (d) {
    case DType::F32: return column_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return column_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return column_rows<DType::F16>(w, a, o, r0, r1);
  }
}

void nm_linear_portable(DType d, const NMWeight& w, const Activations& a, const Output& o, int64_t r0, int64_t r1) {
  switch (d) {
    case DType::F32: return nm_rows<DType::F32>(w, a, o, r0, r1);
    case DType::BF16: return nm_rows<DType::BF16>(w, a, o, r0, r1);
    case DType::F16: return nm_rows<DType::F16>(w, a, o, r0, r1);
  }
}

}  // namespace sparsecore_cpu
