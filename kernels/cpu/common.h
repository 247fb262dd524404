// Shared declarations of the CPU sparse linear kernels. Deliberately free of torch headers: the ISA files
// include it under `#pragma GCC target`, and an inline torch function compiled there could be picked by the
// linker for the portable code too (an AVX-512 instruction on a CPU without it).
#pragma once
#include <cstdint>
#include <cstring>

namespace sparsecore_cpu {

// Storage type of weights and activations; accumulation is always fp32.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Row-major bitmap layout derived once from the tiled format (kernels/cpu/__init__.py documents the bytes):
// row r keeps the values values[row_ptr[r] ..] in column order; bit c % 64 of words[r * n_words + c / 64]
// says whether column c is kept. `values` has >= 16 elements of padding after the last kept value.
struct BitmapWeight {
  const uint64_t* words;
  int64_t n_words;
  const void* values;
  const int64_t* row_ptr;
};

// Column-index layout (high sparsity): row r keeps values[row_ptr[r] ..] at columns cols[row_ptr[r] ..],
// increasing; work per kept value instead of per dense element.
struct ColumnWeight {
  const uint16_t* cols;
  const void* values;
  const int64_t* row_ptr;
};

// The N:M format as stored (sparsecore/formats/nm.py): values [N, slots] row-major, positions a bit stream
// of log2(m) bits per slot, `pos_stride` bytes per row.
struct NMWeight {
  const void* values;
  int64_t slots;
  const uint8_t* pos;
  int64_t pos_stride;
  int n, m;
};

// Activations, converted to fp32 once per call and zero-padded to kp columns (a multiple of 64):
// one row: x [kp] and mt == 1; more: xt [ceil(m / mt)][kp][mt], tiles of mt activation rows per column (the
// "transposed x"; rows past m are zero), mt a multiple of 16: 16 on the portable and AVX2 paths, up to 128 on
// AVX-512. The launcher hands each kernel call one tile (x and y offset to it, m its rows). The AVX-512 kernels
// sweep a tile's columns in panels of kpanel (a multiple of 64; kpanel == kp: one panel) so that the part of
// the tile in use stays in L2; the other paths take kpanel == kp.
struct Activations {
  const float* x;
  int64_t kp;
  int64_t m;
  int64_t mt;
  int64_t kpanel;
};

// y [m, ldy] fp32; output column r of row i is y[i * ldy + r]; bias [N] fp32 or null.
struct Output {
  float* y;
  int64_t ldy;
  const float* bias;
};

constexpr int64_t kLanes = 16;  // activation rows per block of the transposed x

// Each ISA computes output columns [r0, r1) (rows of W). Dispatch on dtype and m happens once per call.
void bitmap_linear_portable(DType, const BitmapWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void bitmap_linear_avx2(DType, const BitmapWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void bitmap_linear_avx512(DType, const BitmapWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void columns_linear_portable(DType, const ColumnWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void columns_linear_avx2(DType, const ColumnWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void columns_linear_avx512(DType, const ColumnWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void nm_linear_portable(DType, const NMWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void nm_linear_avx2(DType, const NMWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);
void nm_linear_avx512(DType, const NMWeight&, const Activations&, const Output&, int64_t r0, int64_t r1);

// Fills the transposed activation tiles for row blocks [b0, b1) (16 rows each) of x [m, ldx] (dtype d):
// dst [ceil(m / mt)][kp][mt] as Activations describes, padding rows and columns written as zeros.
void pack_rows_portable(DType, const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst,
                        int64_t b0, int64_t b1);
void pack_rows_avx512(DType, const void* x, int64_t ldx, int64_t m, int64_t k, int64_t kp, int64_t mt, float* dst,
                      int64_t b0, int64_t b1);

// Scalar conversions used by every ISA file (bit manipulation only, no instruction-set requirement).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <DType D>
inline float load_scalar(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::BF16) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

template <DType D>
constexpr int64_t elem_bytes() { return D == DType::F32 ? 4 : 2; }

// In-group position of slot s of one N:M row (bits = log2(m)); never reads past the byte holding its last bit.
inline int nm_position(const uint8_t* row, int64_t s, int bits) {
  int64_t bit = s * bits;
  int64_t byte = bit >> 3;
  int shift = static_cast<int>(bit & 7);
  uint32_t v = row[byte];
  if (shift + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

}  // namespace sparsecore_cpu
