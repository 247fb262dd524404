// Torch-facing side of the CPU sparse linear kernels: layout derivation, activation packing, ISA dispatch
// (chosen by the caller once per layer, checked here once per call, never inside a hot loop) and
// at::parallel_for over output features, so torch.set_num_threads is obeyed.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"

namespace sc = sparsecore_cpu;

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Set by the tests' poisoned_buffers (kernels/_host.py): outputs start as NaN, so an element a kernel leaves
// unwritten fails the comparison instead of passing with whatever the allocator held.
std::atomic<bool> g_poison{false};

bool cpu_has(Isa isa) {
#ifdef SPARSECORE_PORTABLE_ONLY
  return isa == kPortable;
#else
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  switch (isa) {
    case kPortable: return true;
    case kAvx2: return avx2;
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#endif
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out = {"portable"};
  if (cpu_has(kAvx2)) out.push_back("avx2");
  if (cpu_has(kAvx512)) out.push_back("avx512");
  return out;
}

sc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sc::DType::F32;
    case at::kBFloat16: return sc::DType::BF16;
    case at::kHalf: return sc::DType::F16;
    default: TORCH_CHECK(false, "sparsecore CPU kernels run float32/bfloat16/float16, got ", t.scalar_type());
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// How x is tiled for m > 1 (see sc::Activations): mt activation rows per tile, columns swept in panels of
// kpanel. Portable and AVX2: 16 rows, one panel. AVX-512: up to 128 rows, balanced so that the last tile is
// as full as the others, and, from 32 rows on, panels (multiples of 64 columns, balanced) of at most 256 KiB
// of the tile, the part every output feature re-reads, so that it stays in L2. A 16-row tile keeps one
// panel: its weights are read once per call either way, and in row order only without panels.
struct Tiling {
  int64_t mt, kpanel;
};

Tiling tiling(int64_t m, int64_t kp, Isa isa) {
  if (m <= 1) return {1, kp};
  if (isa != kAvx512) return {sc::kLanes, kp};
  const int64_t blocks = (m + sc::kLanes - 1) / sc::kLanes, v = std::min<int64_t>(8, blocks);
  const int64_t tiles = (blocks + v - 1) / v, mt = sc::kLanes * ((blocks + tiles - 1) / tiles);
  if (mt == sc::kLanes) return {mt, kp};
  const int64_t cap = std::max<int64_t>(64, (int64_t{256} << 10) / (mt * 4) / 64 * 64);
  const int64_t panels = (kp + cap - 1) / cap;
  return {mt, round_up((kp + panels - 1) / panels, 64)};
}

// The calling thread's buffer for packed activations, grown to the largest call so far and reused: a fresh
// buffer of M x K floats per call would be page-faulted in every time (the allocator returns blocks this
// large to the OS on free). Calls needing more than kScratchMax bytes get a buffer of their own instead.
constexpr int64_t kScratchMax = int64_t{64} << 20;

float* thread_scratch(int64_t floats) {
  struct Buffer {
    float* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (floats > buf.n) {
    std::free(buf.p);
    buf.n = 0;
    buf.p = static_cast<float*>(std::aligned_alloc(64, round_up(floats * 4, 64)));
    TORCH_CHECK(buf.p != nullptr, "sparsecore: cannot allocate ", floats * 4, " bytes for packed activations");
    buf.n = floats;
  }
  return buf.p;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// fp32 activations zero-padded to kp columns: x [kp] for one row, else the tiles xt [ceil(M / mt)][kp][mt].
// One row is copied at once. Tiles are filled on demand inside the kernels' parallel region (`ensure(t)`):
// the threads that first need tile t pack its 16-row blocks together, each claiming blocks from a shared
// counter, and wait for the last one to be written. Packing thus runs on every thread without a parallel
// region of its own, and a tile is packed just before it is used. A thread only ever waits for blocks that
// another running thread has claimed, so a region run on one thread packs everything itself.
class Packed {
 public:
  Packed(const at::Tensor& x, int64_t kp, int64_t mt, Isa isa) : kp_(kp), mt_(mt), m_(x.size(0)), k_(x.size(1)) {
    if (m_ == 1) {
      const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
      const float* src = xf.data_ptr<float>();
      const int64_t sk = xf.stride(1);
      owner_ = at::empty({kp}, xf.options());
      float* dst = owner_.data_ptr<float>();
      for (int64_t c = 0; c < k_; ++c) dst[c] = src[c * sk];
      std::memset(dst + k_, 0, (kp - k_) * sizeof(float));
      data_ = dst;
      return;
    }
    xc_ = x.stride(1) == 1 ? x : x.contiguous();
    const int64_t tiles = (m_ + mt - 1) / mt, floats = tiles * kp * mt;
    if (floats * 4 <= kScratchMax) {
      data_ = thread_scratch(floats);
    } else {
      owner_ = at::empty({floats}, x.options().dtype(at::kFloat));
      data_ = owner_.data_ptr<float>();
    }
#ifdef SPARSECORE_PORTABLE_ONLY
    pack_ = sc::pack_rows_portable;
#else
    pack_ = isa == kAvx512 ? sc::pack_rows_avx512 : sc::pack_rows_portable;
#endif
    dtype_ = dtype_of(xc_);
    claimed_.reset(new std::atomic<int64_t>[tiles]);
    done_.reset(new std::atomic<int64_t>[tiles]);
    for (int64_t t = 0; t < tiles; ++t) {
      claimed_[t].store(0, std::memory_order_relaxed);
      done_[t].store(0, std::memory_order_relaxed);
    }
  }

  // Tile t (activation rows t mt ..), packed before this returns.
  const float* tile(int64_t t) {
    if (m_ == 1) return data_;
    const int64_t nb = mt_ / sc::kLanes;
    if (done_[t].load(std::memory_order_acquire) < nb) {
      for (int64_t b = claimed_[t].fetch_add(1); b < nb; b = claimed_[t].fetch_add(1)) {
        const int64_t g = t * nb + b;
        pack_(dtype_, xc_.data_ptr(), xc_.stride(0), m_, k_, kp_, mt_, data_, g, g + 1);
        done_[t].fetch_add(1, std::memory_order_release);
      }
      while (done_[t].load(std::memory_order_acquire) < nb) cpu_relax();
    }
    return data_ + t * kp_ * mt_;
  }

 private:
  int64_t kp_, mt_, m_, k_;
  at::Tensor owner_, xc_;
  float* data_ = nullptr;
  sc::DType dtype_ = sc::DType::F32;
  void (*pack_)(sc::DType, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
                int64_t) = nullptr;
  std::unique_ptr<std::atomic<int64_t>[]> claimed_, done_;
};

at::Tensor bias_f32(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must have shape [", n, "], got ", bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

template <typename Fn>
at::Tensor run_rows(const at::Tensor& x, int64_t n, int64_t kp, const c10::optional<at::Tensor>& bias, Isa isa,
                    Fn&& fn) {
  const int64_t m = x.size(0);
  const Tiling tl = tiling(m, kp, isa);
  const int64_t mt = tl.mt;
  Packed act(x, kp, mt, isa);
  const at::Tensor b = bias_f32(bias, n);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (g_poison.load(std::memory_order_relaxed)) y.fill_(std::numeric_limits<float>::quiet_NaN());
  // Work items are (activation tile, chunk of output features), tile-major, handed out from a shared
  // counter rather than split evenly up front: the threads work on the same tile at once (it stays in their
  // caches), and a thread that is descheduled or slower leaves its share to the others. A chunk is ~256k
  // weight entries of one K panel (4x that with several panels: more features per panel while it is in L2)
  // times the tile's 16-row blocks, at most a quarter of a thread's share, and a multiple of
  // 16 features (the m > 1 kernels' output group; 4 at m == 1). Each output is computed the same way
  // whichever thread takes it.
  const int64_t tiles = m > 1 ? (m + mt - 1) / mt : 1, blocks = m > 1 ? mt / sc::kLanes : 1;
  const int64_t threads = at::get_num_threads(), grp = m > 1 ? 16 : 4;
  const int64_t share = (n * tiles + 4 * threads - 1) / (4 * threads);
  const int64_t fit = (tl.kpanel < kp ? 4 : 1) * 262144 / std::max<int64_t>(1, tl.kpanel * blocks);
  const int64_t chunk = std::max<int64_t>(grp, std::min<int64_t>(fit, m > 1 ? share : n) / grp * grp);
  const int64_t per_tile = (n + chunk - 1) / chunk, items = tiles * per_tile;
  const int64_t tasks = std::min<int64_t>(threads, items);
  float* const bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  std::atomic<int64_t> next{0};
  if (m > 0 && n > 0) {
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
        const int64_t t = i / per_tile, r0 = i % per_tile * chunk, m0 = t * mt;
        const sc::Activations a{act.tile(t), kp, m > 1 ? std::min(mt, m - m0) : 1, mt,
                                tl.kpanel};
        const sc::Output o{y.data_ptr<float>() + m0 * n, n, bias_ptr};
        fn(a, o, r0, std::min(n, r0 + chunk));
      }
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void check_x(const at::Tensor& x, const at::Tensor& values, int64_t k, Isa isa) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), "sparsecore CPU kernels need CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "x dtype ", x.scalar_type(), " differs from the weight's ",
              values.scalar_type());
  TORCH_CHECK(isa >= kPortable && isa <= kAvx512, "isa must be 0 (portable), 1 (avx2) or 2 (avx512), got ",
              static_cast<int64_t>(isa));
  TORCH_CHECK(cpu_has(isa), "this CPU cannot run the requested instruction set (code ", static_cast<int64_t>(isa), ")");
}

}  // namespace

// Row-major bitmap layout from the tiled format (sparsecore/formats/unstructured.py):
// returns (words int64 [n, ceil(k / 64)], values [nnz + 16] in row order, row_ptr int64 [n + 1]).
std::vector<at::Tensor> bitmap_layout(const at::Tensor& bitmap, const at::Tensor& values,
                                      const at::Tensor& tile_offsets, int64_t n, int64_t k) {
  TORCH_CHECK(bitmap.dim() == 4 && bitmap.scalar_type() == at::kInt && bitmap.is_contiguous(),
              "bitmap must be a contiguous int32 [TN, TK, tile_n, tile_k / 32] tensor");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && tile_offsets.is_contiguous() &&
                  tile_offsets.scalar_type() == at::kInt, "values must be 1-D contiguous, tile_offsets int32");
  const int64_t tn = bitmap.size(0), tk = bitmap.size(1), tile_n = bitmap.size(2), qw = bitmap.size(3);
  const int64_t tile_k = qw * 32, n_words = (k + 63) / 64;
  TORCH_CHECK(tn * tile_n >= n && tk * tile_k >= k && tile_offsets.numel() == tn * tk + 1,
              "bitmap ", bitmap.sizes(), " does not cover a ", n, " x ", k, " matrix");
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int32_t>());
  const int32_t* offs = tile_offsets.data_ptr<int32_t>();
  at::Tensor words = at::zeros({n, n_words}, bitmap.options().dtype(at::kLong));
  uint64_t* w = reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>());
  at::Tensor row_ptr = at::zeros({n + 1}, words.options());
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  for (int64_t i = 0; i < tn; ++i)
    for (int64_t j = 0; j < tk; ++j)
      for (int64_t rr = 0; rr < tile_n; ++rr) {
        const int64_t r = i * tile_n + rr;
        const uint32_t* src = bits + ((i * tk + j) * tile_n + rr) * qw;
        for (int64_t q = 0; q < qw; ++q) {
          if (!src[q]) continue;
          const int64_t c = j * tile_k + q * 32;
          TORCH_CHECK(r < n && c < n_words * 64, "bitmap sets bits outside the ", n, " x ", k, " matrix");
          w[r * n_words + c / 64] |= static_cast<uint64_t>(src[q]) << (c % 64);
          rp[r + 1] += __builtin_popcount(src[q]);
        }
      }
  for (int64_t r = 0; r < n; ++r) rp[r + 1] += rp[r];
  TORCH_CHECK(rp[n] == values.numel(), "bitmap keeps ", rp[n], " values, values has ", values.numel());
  at::Tensor out = at::zeros({values.numel() + 16}, values.options());
  const int64_t e = values.element_size();
  const char* vsrc = static_cast<const char*>(values.data_ptr());
  char* vdst = static_cast<char*>(out.data_ptr());
  std::vector<int64_t> cursor(rp, rp + n);
  for (int64_t i = 0; i < tn; ++i)
    for (int64_t j = 0; j < tk; ++j) {
      int64_t s = offs[i * tk + j];
      for (int64_t rr = 0; rr < tile_n && i * tile_n + rr < n; ++rr) {
        const uint32_t* src = bits + ((i * tk + j) * tile_n + rr) * qw;
        int64_t cnt = 0;
        for (int64_t q = 0; q < qw; ++q) cnt += __builtin_popcount(src[q]);
        std::memcpy(vdst + cursor[i * tile_n + rr] * e, vsrc + s * e, cnt * e);
        cursor[i * tile_n + rr] += cnt;
        s += cnt;
      }
    }
  return {words, out, row_ptr};
}

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& words, const at::Tensor& values,
                         const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias, int64_t k, int64_t isa) {
  check_x(x, values, k, static_cast<Isa>(isa));
  TORCH_CHECK(words.dim() == 2 && words.size(1) == (k + 63) / 64 && words.scalar_type() == at::kLong &&
                  words.is_contiguous() && row_ptr.numel() == words.size(0) + 1 && row_ptr.is_contiguous() &&
                  values.is_contiguous(), "bitmap layout tensors do not match K = ", k);
  const sc::BitmapWeight w{reinterpret_cast<const uint64_t*>(words.data_ptr<int64_t>()), words.size(1),
                           values.data_ptr(), row_ptr.data_ptr<int64_t>()};
  const sc::DType d = dtype_of(values);
#ifdef SPARSECORE_PORTABLE_ONLY
  const auto fn = sc::bitmap_linear_portable;
#else
  const auto fn = isa == kAvx512 ? sc::bitmap_linear_avx512 : isa == kAvx2 ? sc::bitmap_linear_avx2
                                                                           : sc::bitmap_linear_portable;
#endif
  return run_rows(x, words.size(0), words.size(1) * 64, bias, static_cast<Isa>(isa),
                  [&](const sc::Activations& a, const sc::Output& o, int64_t r0, int64_t r1) { fn(d, w, a, o, r0, r1); });
}

// Column-index layout from the row-major bitmap words: uint16 columns (stored as int16) [nnz + 16], increasing
// per row; the values and row_ptr of the bitmap layout are shared as they are.
at::Tensor column_layout(const at::Tensor& words, const at::Tensor& row_ptr, int64_t k) {
  TORCH_CHECK(words.dim() == 2 && words.scalar_type() == at::kLong && words.is_contiguous() &&
                  row_ptr.numel() == words.size(0) + 1, "words must be int64 [N, W] with row_ptr [N + 1]");
  TORCH_CHECK(k <= 65536, "column indices are 16-bit: K must be <= 65536, got ", k);
  const int64_t n = words.size(0), nw = words.size(1);
  const uint64_t* w = reinterpret_cast<const uint64_t*>(words.data_ptr<int64_t>());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  at::Tensor cols = at::zeros({rp[n] + 16}, words.options().dtype(at::kShort));
  uint16_t* c = reinterpret_cast<uint16_t*>(cols.data_ptr<int16_t>());
  for (int64_t r = 0; r < n; ++r) {
    int64_t j = rp[r];
    for (int64_t wi = 0; wi < nw; ++wi)
      for (uint64_t b = w[r * nw + wi]; b; b &= b - 1) c[j++] = static_cast<uint16_t>(wi * 64 + __builtin_ctzll(b));
    TORCH_CHECK(j == rp[r + 1], "row_ptr disagrees with the bitmap words at row ", r);
  }
  return cols;
}

at::Tensor columns_linear(const at::Tensor& x, const at::Tensor& cols, const at::Tensor& values,
                          const at::Tensor& row_ptr, const c10::optional<at::Tensor>& bias, int64_t k, int64_t isa) {
  check_x(x, values, k, static_cast<Isa>(isa));
  TORCH_CHECK(k <= 65536 && cols.scalar_type() == at::kShort && cols.is_contiguous() && values.is_contiguous() &&
                  row_ptr.dim() == 1 && row_ptr.numel() >= 1 && row_ptr.scalar_type() == at::kLong &&
                  row_ptr.is_contiguous(), "column layout tensors are inconsistent");
  const int64_t nnz = row_ptr.data_ptr<int64_t>()[row_ptr.numel() - 1];
  TORCH_CHECK(cols.numel() >= nnz && values.numel() >= nnz, "column layout holds fewer entries than row_ptr says");
  const sc::ColumnWeight w{reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>()), values.data_ptr(),
                           row_ptr.data_ptr<int64_t>()};
  const sc::DType d = dtype_of(values);
#ifdef SPARSECORE_PORTABLE_ONLY
  const auto fn = sc::columns_linear_portable;
#else
  const auto fn = isa == kAvx512 ? sc::columns_linear_avx512 : isa == kAvx2 ? sc::columns_linear_avx2
                                                                            : sc::columns_linear_portable;
#endif
  return run_rows(x, row_ptr.numel() - 1, round_up(std::max<int64_t>(k, 1), 64), bias, static_cast<Isa>(isa),
                  [&](const sc::Activations& a, const sc::Output& o, int64_t r0, int64_t r1) { fn(d, w, a, o, r0, r1); });
}

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK((m == 4 || m == 8) && n > 0 && n < m, "N:M needs m in (4, 8) and 0 < n < m, got ", n, ":", m);
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.size(1) % n == 0,
              "values must be a contiguous [N, S] tensor with S a multiple of n");
  const int64_t slots = values.size(1), k = slots / n * m, bits = m == 4 ? 2 : 3;
  check_x(x, values, k, static_cast<Isa>(isa));
  TORCH_CHECK(positions.dim() == 2 && positions.scalar_type() == at::kByte && positions.is_contiguous() &&
                  positions.size(0) == values.size(0) && positions.size(1) == (slots * bits + 7) / 8,
              "positions must be contiguous uint8 [", values.size(0), ", ", (slots * bits + 7) / 8, "]");
  const sc::NMWeight w{values.data_ptr(), slots, positions.data_ptr<uint8_t>(), positions.size(1),
                       static_cast<int>(n), static_cast<int>(m)};
  const sc::DType d = dtype_of(values);
#ifdef SPARSECORE_PORTABLE_ONLY
  const auto fn = sc::nm_linear_portable;
#else
  const auto fn = isa == kAvx512 ? sc::nm_linear_avx512 : isa == kAvx2 ? sc::nm_linear_avx2 : sc::nm_linear_portable;
#endif
  return run_rows(x, values.size(0), round_up(std::max<int64_t>(k, 1), 64), bias, static_cast<Isa>(isa),
                  [&](const sc::Activations& a, const sc::Output& o, int64_t r0, int64_t r1) { fn(d, w, a, o, r0, r1); });
}

// The launchers as torch operators, for torch.compile graphs and autograd-enabled calls: the graph calls them
// through the dispatcher straight into C++ (the Python side adds their fake implementations when it loads
// this module). They have no derivative: with autograd on, backward through them raises instead of
// returning a silently wrong gradient (sparsecore.autograd differentiates the sparse modules).
TORCH_LIBRARY_FRAGMENT(sparsecore, m) {
  m.def("cpu_bitmap_linear(Tensor x, Tensor words, Tensor values, Tensor row_ptr, Tensor? bias, int k, int isa) -> Tensor");
  m.def("cpu_columns_linear(Tensor x, Tensor cols, Tensor values, Tensor row_ptr, Tensor? bias, int k, int isa) -> Tensor");
  m.def("cpu_nm_linear(Tensor x, Tensor values, Tensor positions, int n, int m, Tensor? bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("cpu_bitmap_linear", &bitmap_linear);
  m.impl("cpu_columns_linear", &columns_linear);
  m.impl("cpu_nm_linear", &nm_linear);
}

TORCH_LIBRARY_IMPL(sparsecore, Autograd, m) {
  m.impl("cpu_bitmap_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("cpu_columns_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("cpu_nm_linear", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("available_isas", &available_isas, "instruction sets this CPU can run, plainest first");
  mod.def("set_poison", [](bool on) { g_poison.store(on); }, "outputs start as NaN while on (tests)");
  mod.def("bitmap_layout", &bitmap_layout, "row-major bitmap layout from the tiled unstructured format");
  mod.def("bitmap_linear", &bitmap_linear, "y = x @ W^T (+ bias), W in the row-major bitmap layout");
  mod.def("column_layout", &column_layout, "uint16 column indices from the row-major bitmap words");
  mod.def("columns_linear", &columns_linear, "y = x @ W^T (+ bias), W in the column-index layout");
  mod.def("nm_linear", &nm_linear, "y = x @ W^T (+ bias), W in the N:M format");
}
