// Shared declarations of the fused CPU attention kernels. Free of torch and standard-library templates: the
// AVX-512 file includes it under `#pragma GCC target`, and an inline function compiled there could be picked by
// the linker for the portable code too (an AVX-512 instruction on a CPU without it).
#pragma once
#include <cstdint>

namespace sparsecore_attn {

enum class MaskKind : int { None = 0, Float = 1, Bool = 2 };

// out = softmax(q k^T * scale + mask) v for every (batch b, head h, query row i).
// q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv], fp32, given by their strides in elements; the last dimension
// of each is contiguous. The mask is read at m_b * b + m_h * h + m_q * i + m_k * j (a broadcast dimension has
// stride 0): float32 added to the scaled scores, or bool (false = key j is not attended). causal masks key j > i.
// out [B, Sq, H, Dv] is contiguous (the layout transformers reshapes to [B, Sq, H * Dv] without a copy).
// A query row whose every key is masked gets zeros (as torch's CPU scaled_dot_product_attention gives).
struct AttnProblem {
  const float* q;
  int64_t q_b, q_h, q_s;
  const float* k;
  int64_t k_b, k_h, k_s;
  const float* v;
  int64_t v_b, v_h, v_s;
  MaskKind mask_kind;
  const void* mask;
  int64_t m_b, m_h, m_q, m_k;
  float* out;
  int64_t B, H, Sq, Sk, D, Dv;
  float scale;
  bool causal;
};

// Work items are (b, h, block of kQueryRows query rows), head-major: item = (b * H + h) * blocks + block.
constexpr int64_t kQueryRows = 32;

inline int64_t query_blocks(const AttnProblem& p) { return (p.Sq + kQueryRows - 1) / kQueryRows; }

// Each ISA computes the items [item0, item1).
void attention_items_portable(const AttnProblem& p, int64_t item0, int64_t item1);
void attention_items_avx512(const AttnProblem& p, int64_t item0, int64_t item1);

}  // namespace sparsecore_attn
