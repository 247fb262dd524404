// Fused CPU attention: torch-facing checks, ISA dispatch (checked once per call, never in a hot loop),
// at::parallel_for over (batch, head, query block) so torch.set_num_threads is obeyed, and the portable path:
// plain C++ over whole score rows, the oracle of the AVX-512 one (attention_avx512.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"

namespace sa = sparsecore_attn;

namespace sparsecore_attn {

// Row by row: scores over every key, max, exp, sum, then the weighted sum of v rows.
void attention_items_portable(const AttnProblem& p, int64_t item0, int64_t item1) {
  const int64_t blocks = query_blocks(p);
  std::vector<float> s(static_cast<size_t>(p.Sk)), o(static_cast<size_t>(p.Dv));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t head = item / blocks, blk = item % blocks;
    const int64_t b = head / p.H, h = head % p.H;
    const float* q = p.q + p.q_b * b + p.q_h * h;
    const float* k = p.k + p.k_b * b + p.k_h * h;
    const float* v = p.v + p.v_b * b + p.v_h * h;
    const int64_t i_end = std::min(p.Sq, (blk + 1) * kQueryRows);
    for (int64_t i = blk * kQueryRows; i < i_end; ++i) {
      const float* qi = q + i * p.q_s;
      const int64_t moff = p.m_b * b + p.m_h * h + p.m_q * i;
      float m = neg_inf;
      for (int64_t j = 0; j < p.Sk; ++j) {
        const float* kj = k + j * p.k_s;
        float dot = 0.0f;
        for (int64_t d = 0; d < p.D; ++d) dot += qi[d] * kj[d];
        float x = dot * p.scale;
        if (p.mask_kind == MaskKind::Float) x += static_cast<const float*>(p.mask)[moff + p.m_k * j];
        if (p.mask_kind == MaskKind::Bool && !static_cast<const bool*>(p.mask)[moff + p.m_k * j]) x = neg_inf;
        if (p.causal && j > i) x = neg_inf;
        s[j] = x;
        m = std::max(m, x);
      }
      float sum = 0.0f;
      std::fill(o.begin(), o.end(), 0.0f);
      if (m != neg_inf) {
        for (int64_t j = 0; j < p.Sk; ++j) {
          const float e = std::exp(s[j] - m);
          sum += e;
          const float* vj = v + j * p.v_s;
          for (int64_t c = 0; c < p.Dv; ++c) o[c] += e * vj[c];
        }
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float* dst = p.out + ((b * p.Sq + i) * p.H + h) * p.Dv;
      for (int64_t c = 0; c < p.Dv; ++c) dst[c] = o[c] * inv;
    }
  }
}

}  // namespace sparsecore_attn

namespace {

enum Isa : int64_t { kPortable = 0, kAvx512 = 1 };

// Set by the tests' poisoned_buffers (kernels/_host.py): outputs start as NaN, so an element a kernel leaves
// unwritten fails the comparison.
std::atomic<bool> g_poison{false};

bool cpu_has_avx512() {
#ifdef SPARSECORE_PORTABLE_ONLY
  return false;
#else
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out = {"portable"};
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [B, H, S, D], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, "'s last dimension must be contiguous, strides ",
              t.strides());
}

// q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv] -> out [B, Sq, H, Dv] (contiguous).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, double scale, bool causal, int64_t isa) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k must be [", B, ", ", H, ", Sk, ", D, "], got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == Sk, "v must be [", B, ", ", H, ", ", Sk,
              ", Dv], got ", v.sizes());
  TORCH_CHECK(isa == kPortable || (isa == kAvx512 && cpu_has_avx512()), "unknown or unsupported isa code ", isa);
  sa::AttnProblem p{};
  p.q = q.data_ptr<float>(), p.q_b = q.stride(0), p.q_h = q.stride(1), p.q_s = q.stride(2);
  p.k = k.data_ptr<float>(), p.k_b = k.stride(0), p.k_h = k.stride(1), p.k_s = k.stride(2);
  p.v = v.data_ptr<float>(), p.v_b = v.stride(0), p.v_h = v.stride(1), p.v_s = v.stride(2);
  p.B = B, p.H = H, p.Sq = Sq, p.Sk = Sk, p.D = D, p.Dv = Dv;
  p.scale = static_cast<float>(scale), p.causal = causal;
  p.mask_kind = sa::MaskKind::None;
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(!causal, "pass either a mask or causal=True, not both");
    TORCH_CHECK(mask->scalar_type() == at::kFloat || mask->scalar_type() == at::kBool,
                "the mask must be float32 (added to the scores) or bool (true = attend), got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() <= 4, "the mask must broadcast to [B, H, Sq, Sk], got ", mask->sizes());
    m = mask->expand({B, H, Sq, Sk});
    p.mask_kind = mask->scalar_type() == at::kFloat ? sa::MaskKind::Float : sa::MaskKind::Bool;
    p.mask = m.data_ptr();
    p.m_b = m.stride(0), p.m_h = m.stride(1), p.m_q = m.stride(2), p.m_k = m.stride(3);
  }
  at::Tensor out = at::empty({B, Sq, H, Dv}, q.options());
  if (g_poison.load(std::memory_order_relaxed)) out.fill_(std::numeric_limits<float>::quiet_NaN());
  p.out = out.data_ptr<float>();
  if (out.numel() == 0) return out;
  if (Sk == 0) return out.zero_();
  const int64_t items = B * H * sa::query_blocks(p);
#ifdef SPARSECORE_PORTABLE_ONLY
  const auto fn = sa::attention_items_portable;
#else
  const auto fn = isa == kAvx512 ? sa::attention_items_avx512 : sa::attention_items_portable;
#endif
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) { fn(p, i0, i1); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("available_isas", &available_isas, "instruction sets this CPU can run, plainest first");
  mod.def("set_poison", [](bool on) { g_poison.store(on); }, "outputs start as NaN while on (tests)");
  mod.def("attention", &attention, "out [B, Sq, H, Dv] = softmax(q k^T scale + mask) v, q/k/v [B, H, S, D]");
}
