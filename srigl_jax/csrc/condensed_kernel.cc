// XLA FFI CPU kernel for the condensed product of srigl_jax.condensed:
//   out[b, o] = bias[o] + sum_j V[r, j] * x[b, I[r, j]]   for o = active[r];   out[b, o] = bias[o] otherwise.
// x (B, in) is packed per call into batch panels (in, <=64) so the inner loops walk contiguous batch slices;
// the output is produced transposed (XLA honours the column-major output layout the Python side requests).
// Thread safety: no mutable global state; each call owns its work state (shared with pool tasks by
// shared_ptr so late-starting tasks never touch freed memory).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "condensed_conv.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace srigl_condensed {

namespace generic {
#include "condensed_kernel_impl.inc"
#include "condensed_conv_impl.inc"
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SRIGL_HAVE_ISA_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
namespace avx2 {
#define SRIGL_ISA_AVX2 1
#include "condensed_kernel_impl.inc"
#include "condensed_conv_impl.inc"
#undef SRIGL_ISA_AVX2
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,prefer-vector-width=512")
namespace avx512 {
#define SRIGL_ISA_AVX512 1
#include "condensed_kernel_impl.inc"
#include "condensed_conv_impl.inc"
#undef SRIGL_ISA_AVX512
}  // namespace avx512
#pragma GCC pop_options
#endif

using BlockFn = bool (*)(bool, const float*, const float*, int64_t, int64_t, int64_t, const float*, const void*,
                         int64_t, const int32_t*, const float*, float*, int64_t, int64_t, bool);
using PackFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

struct Isa {
  BlockFn fn;
  PackFn pack;
  bool (*scalar_loads_faster)();  // the batch-1 formulation this variant runs fastest here (measured once)
};

// Variants by level: 0 generic, 1 AVX2+FMA, 2 AVX-512 (F/VL/BW/DQ).
static const Isa kIsas[] = {
    {&generic::BlockAnyIndex, &generic::PackRange, &generic::ScalarLoadsFaster},
#ifdef SRIGL_HAVE_ISA_VARIANTS
    {&avx2::BlockAnyIndex, &avx2::PackRange, &avx2::ScalarLoadsFaster},
    {&avx512::BlockAnyIndex, &avx512::PackRange, &avx512::ScalarLoadsFaster},
#endif
};

// The formulation of gathered columns (batch < 4, the last < 4 columns of a batch): the "gather" attribute.
enum GatherMode : int64_t { kGatherAuto = 0, kGatherVector = 1, kGatherScalar = 2 };

// Whether `isa` reads gathered columns by scalar loads under gather_mode: the generic variant has nothing else;
// "auto" measures which is faster (once per process, ScalarLoadsFaster). The kernel and the Python query
// (SriglCondensedScalarLoads) both decide here.
static bool UsesScalarLoads(const Isa& isa, int64_t gather_mode) {
  if (&isa == &kIsas[0]) return true;
  return gather_mode == kGatherAuto ? isa.scalar_loads_faster() : gather_mode == kGatherScalar;
}

static int DetectIsaLevel() {
#ifdef SRIGL_HAVE_ISA_VARIANTS
  __builtin_cpu_init();
  // Both variants are compiled with BMI/BMI2 as well (see the target pragmas above).
  if (!__builtin_cpu_supports("bmi") || !__builtin_cpu_supports("bmi2")) return 0;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

static int BestIsaLevel() {
  static const int level = DetectIsaLevel();  // thread-safe static init
  return level;
}

// The variant for a requested level (< 0: the best); never one the CPU cannot run.
static const Isa& GetIsa(int64_t requested) {
  const int best = BestIsaLevel();
  return kIsas[requested < 0 || requested > best ? best : requested];
}

// Cost of a gathered multiply-add relative to a packed-panel one (see the thread decision below).
constexpr int64_t kGatherWeight = 4;

// Inputs per packing task (a multiple of the 16-wide transpose blocks).
constexpr int64_t kPackRows = 512;
// A thread keeps its packing buffer between calls up to this size (64 MB); larger ones are freed after use.
constexpr size_t kMaxKeptPackedFloats = size_t{1} << 24;

struct Work {
  const Isa* isa;
  bool int16_indices;
  bool scalar_loads;  // gathered columns by scalar loads instead of vector gathers
  const float* x;
  float* packed;
  int64_t n_in, batch;
  const float* values;
  const void* indices;
  int64_t k;
  std::vector<int32_t> row_of;
  const float* bias;
  float* outT;
  int64_t n_out, rows_per_chunk, n_row_chunks, n_chunks, pack_per_panel, n_pack;
  std::vector<int64_t> block_starts;  // first batch column of each panel (and of the gathered remainder)
  int64_t n_panels = 0;               // block_starts entries that are packed panels
  std::atomic<int64_t> next_pack{0};
  std::atomic<int64_t> done_pack{0};
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> done_chunks{0};
  std::atomic<bool> bad_index{false};

  // Two phases, both split into tasks claimed from atomic counters by every participating thread: pack the
  // batch panels, wait until all are packed, then compute output chunks. Chunks are panel-major, so the
  // threads share one batch panel (hot in cache) at a time while splitting its output rows. The calling
  // thread always drains, so the call completes even if no pool thread ever starts.
  void Drain() {
    for (int64_t c = next_pack.fetch_add(1); c < n_pack; c = next_pack.fetch_add(1)) {
      const int64_t i0 = (c % pack_per_panel) * kPackRows;
      isa->pack(x, n_in, batch, block_starts[c / pack_per_panel], i0, std::min(n_in, i0 + kPackRows), packed);
      done_pack.fetch_add(1, std::memory_order_acq_rel);
    }
    while (done_pack.load(std::memory_order_acquire) < n_pack) std::this_thread::yield();
    for (int64_t c = next_chunk.fetch_add(1); c < n_chunks; c = next_chunk.fetch_add(1)) {
      const int64_t b0 = block_starts[c / n_row_chunks];
      const int64_t o0 = (c % n_row_chunks) * rows_per_chunk;
      const int64_t o1 = std::min(n_out, o0 + rows_per_chunk);
      if (isa->fn(int16_indices, x, packed, n_in, batch, b0, values, indices, k, row_of.data(), bias, outT, o0,
                  o1, scalar_loads)) {
        bad_index.store(true, std::memory_order_relaxed);
      }
      done_chunks.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

static ffi::Error CondensedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values,
                                      ffi::AnyBuffer indices, ffi::Buffer<ffi::F32> bias,
                                      ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::F32> out,
                                      int64_t max_threads, int64_t min_thread_work, int64_t isa_level,
                                      int64_t gather_mode) {
  const auto xd = x.dimensions();
  const auto vd = values.dimensions();
  const auto id = indices.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || vd.size() != 2 || id.size() != 2 || od.size() != 2 || bias.dimensions().size() != 1 ||
      active.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("condensed_matmul: expected x (B, in), values/indices (n_active, k), "
                                       "bias (out,), active (n_active,), out (B, out)");
  }
  const int64_t batch = xd[0], n_in = xd[1], n_active = vd[0], k = vd[1], n_out = od[1];
  if (id[0] != n_active || id[1] != k || active.dimensions()[0] != n_active || od[0] != batch ||
      bias.dimensions()[0] != n_out || n_active > n_out) {
    return ffi::Error::InvalidArgument("condensed_matmul: inconsistent shapes");
  }
  const ffi::DataType idx_type = indices.element_type();
  if (idx_type != ffi::DataType::S16 && idx_type != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("condensed_matmul: indices must be int16 or int32");
  }
  if (gather_mode != kGatherAuto && gather_mode != kGatherVector && gather_mode != kGatherScalar) {
    return ffi::Error::InvalidArgument("condensed_matmul: gather must be 0 (auto), 1 (vector) or 2 (scalar)");
  }
  if (n_in > INT32_MAX) return ffi::Error::InvalidArgument("condensed_matmul: more than 2^31 inputs");
  if (n_in == 0 && k > 0 && n_active > 0) {  // every index is out of range, and there is no x[0] to clamp to
    return ffi::Error::InvalidArgument("condensed_matmul: an index is outside [0, in_features) (no inputs)");
  }

  auto work = std::make_shared<Work>();
  work->isa = &GetIsa(isa_level);
  work->int16_indices = idx_type == ffi::DataType::S16;
  work->x = x.typed_data();
  work->n_in = n_in;
  work->batch = batch;
  work->values = values.typed_data();
  work->indices = indices.untyped_data();
  work->k = k;
  work->bias = bias.typed_data();
  work->outT = out->typed_data();
  work->n_out = n_out;
  work->row_of.assign(static_cast<size_t>(n_out), -1);
  const int32_t* act = active.typed_data();
  for (int64_t r = 0; r < n_active; ++r) {
    const int32_t o = act[r];
    if (o < 0 || o >= n_out || work->row_of[o] != -1) {
      return ffi::Error::InvalidArgument("condensed_matmul: active neuron ids must be distinct and in [0, out)");
    }
    work->row_of[o] = static_cast<int32_t>(r);
  }
  if (batch == 0 || n_out == 0) return ffi::Error::Success();

  int64_t panel_columns = 0;
  for (int64_t b0 = 0; b0 < batch;) {
    work->block_starts.push_back(b0);
    const int64_t w = generic::PanelWidth(b0, batch);
    if (w > 0) ++work->n_panels;
    panel_columns += w;
    b0 = w > 0 ? b0 + w : batch;
  }
  // Batch panels (see PackRange); reused across calls of this thread: a call finishes all its tasks before
  // it returns, so no other thread touches this buffer afterwards.
  // Panels start on a cache line (64 bytes): whether malloc returned an aligned block used to decide whether
  // every 64-wide panel row straddled two lines, and made the same call up to 1.6x slower from one process
  // to the next.
  thread_local std::vector<float> packed;
  constexpr size_t kLineFloats = 64 / sizeof(float);
  if (work->n_panels > 0) packed.resize(static_cast<size_t>(batch * n_in) + kLineFloats);
  const size_t misalign = (reinterpret_cast<uintptr_t>(packed.data()) / sizeof(float)) % kLineFloats;
  work->packed = packed.data() + (misalign == 0 ? 0 : kLineFloats - misalign);
  // Measured (once per process) only when this call has gathered columns at all.
  work->scalar_loads = batch > panel_columns && UsesScalarLoads(*work->isa, gather_mode);
  work->pack_per_panel = std::max<int64_t>(1, (n_in + kPackRows - 1) / kPackRows);
  work->n_pack = work->n_panels * work->pack_per_panel;

  // No more threads in all, the caller included, than XLA's pool has (one per CPU this process may use):
  // one thread too many means a preempted thread holding a chunk stalls the whole call.
  const int64_t pool_threads = pool.num_threads();
  int64_t workers = std::max<int64_t>(1, pool_threads);
  if (max_threads > 0) workers = std::min(workers, max_threads);
  // Every thread gets at least min_thread_work of work (so small calls stay on this thread): waking a pool
  // thread and sharing the work cost more than they save below that, and on a many-core machine a small
  // call must not schedule a task on every core. Work is counted in multiply-adds, those of gathered columns
  // (batch < 4, the last < 4 columns) weighted kGatherWeight times, as a gather costs about that much more
  // than a packed-panel multiply-add.
  const int64_t work_estimate = n_active * k * (panel_columns + kGatherWeight * (batch - panel_columns));
  if (min_thread_work > 0) {
    workers = std::min(workers, std::max<int64_t>(1, (work_estimate + min_thread_work - 1) / min_thread_work));
  }
  const int64_t chunks_wanted = workers == 1 ? 1 : workers * 4;
  // Chunks of whole register tiles: a multiple of 24 rows is a multiple of every R in use (1 to 12), so
  // only a chunk's last tile can be short (a short tile still computes R rows).
  constexpr int64_t kRowQuantum = 24;
  const int64_t rows = (n_out + chunks_wanted - 1) / chunks_wanted;
  work->rows_per_chunk = std::max<int64_t>(kRowQuantum, (rows + kRowQuantum - 1) / kRowQuantum * kRowQuantum);
  work->n_row_chunks = (n_out + work->rows_per_chunk - 1) / work->rows_per_chunk;
  work->n_chunks = work->n_row_chunks * static_cast<int64_t>(work->block_starts.size());

  for (int64_t t = 1; t < workers; ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->done_chunks.load(std::memory_order_acquire) < work->n_chunks) std::this_thread::yield();

  if (packed.size() > kMaxKeptPackedFloats) std::vector<float>().swap(packed);  // don't keep huge buffers
  if (work->bad_index.load()) {
    return ffi::Error::InvalidArgument("condensed_matmul: an index is outside [0, in_features)");
  }
  return ffi::Error::Success();
}

}  // namespace srigl_condensed

XLA_FFI_DEFINE_HANDLER_SYMBOL(SriglCondensedMatmul, srigl_condensed::CondensedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, physically (in, B)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values (n_active, k)
                                  .Arg<ffi::AnyBuffer>()         // indices (n_active, k) int16 / int32
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (out,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // active (n_active,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out, physically (out, B)
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_thread_work")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("gather"));

// The level of the best instruction-set variant this CPU runs (0, 1, 2; names in srigl_jax/_ffi_kernels.py).
extern "C" int SriglCondensedIsaLevel() { return srigl_condensed::BestIsaLevel(); }

// 1 if the variant of this level (< 0: the best) reads gathered columns by scalar loads under gather_mode (the
// "gather" attribute; "auto" measures on first use), 0 if by vector gathers.
extern "C" int SriglCondensedScalarLoads(int level, int gather_mode) {
  return srigl_condensed::UsesScalarLoads(srigl_condensed::GetIsa(level), gather_mode) ? 1 : 0;
}

// The condensed convolution (srigl_condensed_conv2d) shares the ISA copies and thread conventions above.
#include "condensed_conv_ffi.inc"

// The exact top-n selection of srigl_jax/selection.py in one call (srigl_top_select).
#include "top_select_ffi.inc"
