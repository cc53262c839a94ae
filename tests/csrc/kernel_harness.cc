// Randomised harness for the condensed kernel's row blocks (every ISA variant this CPU runs) against a
// double-precision reference, built with AddressSanitizer/UBSan by tests/test_kernel_harness.py:
//   kernel_harness <configs> <mode> <seed>
// mode 0: exact-size malloc buffers (ASan), 1/2: each buffer ends/starts at a PROT_NONE guard page (catches
// the AVX-512 loads, stores and gathers that ASan does not instrument), 3: 1 or 2 at random per buffer.
// Each configuration: random layer (n_in 1-300, n_out 1-70, k 0-n_in with edge values, batch 1-70 covering
// every panel width and the gathered columns, ablation 0-100%, int16/int32 indices, sometimes bad indices),
// the batch panels packed in two tasks, and the rows computed over a random partition (or sub-range) of
// [0, n_out) as the thread chunks do. Checked: values, the bad-index flag, and that rows outside the ranges
// are never written. Exit status 0 when everything matched.
#include "condensed_kernel.cc"  // -I srigl_jax/csrc

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

using namespace srigl_condensed;

static int g_mode = 0;  // 0 malloc (ASan), 1 guard page after, 2 guard page before, 3 random of 1/2
static std::mt19937_64 rng(12345);
static const size_t kPage = 4096;

struct Alloc {
  void* base = nullptr;
  size_t len = 0;
  void* p = nullptr;
  bool mm = false;
  Alloc() = default;
  Alloc(const Alloc&) = delete;
  Alloc& operator=(const Alloc&) = delete;
  void make(size_t bytes) {
    int mode = g_mode == 3 ? 1 + (int)(rng() % 2) : g_mode;
    if (mode == 0) {
      p = malloc(bytes);
      mm = false;
      return;
    }
    size_t pages = (bytes + kPage - 1) / kPage;
    len = (pages + 1) * kPage;
    base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); exit(2); }
    mm = true;
    if (mode == 1) {  // data ends exactly at a guard page
      mprotect((char*)base + pages * kPage, kPage, PROT_NONE);
      p = (char*)base + pages * kPage - bytes;
    } else {  // data starts exactly after a guard page
      mprotect(base, kPage, PROT_NONE);
      p = (char*)base + kPage;
    }
  }
  ~Alloc() {
    if (mm) munmap(base, len);
    else free(p);
  }
};

struct Isa2 {
  const char* name;
  BlockFn fn;
  PackFn pack;
};

static int64_t rnd(int64_t lo, int64_t hi) {  // inclusive
  return lo + (int64_t)(rng() % (uint64_t)(hi - lo + 1));
}
static int64_t pick_edge(int64_t hi) {  // values near multiples of 16 or the ends, in [0, hi]
  static const int64_t e[] = {0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 95, 96, 97};
  if (rng() % 3 == 0) return std::max<int64_t>(0, hi - (int64_t)(rng() % 3));
  int64_t v = e[rng() % (sizeof(e) / sizeof(e[0]))];
  return v > hi ? hi : v;
}

static long n_cfg = 0, n_calls = 0, n_bad_cfg = 0;

// Returns false on mismatch (prints details).
static bool RunConfig(const Isa2* isas, int n_isas, bool verbose) {
  const int64_t n_in = rng() % 4 == 0 ? pick_edge(300) + (pick_edge(300) == 0 ? 1 : 0) : rnd(1, 300);
  const int64_t n_in_c = n_in < 1 ? 1 : n_in;
  int64_t n_out = rng() % 3 == 0 ? pick_edge(70) : rnd(1, 70);
  if (n_out < 1) n_out = 1;
  const int64_t k = rng() % 2 == 0 ? pick_edge(n_in_c) : rnd(0, n_in_c);
  int64_t B;
  {
    const int r = rng() % 10;
    if (r < 4) B = rnd(1, 3);
    else if (r < 8) B = rnd(5, 7);
    else B = rnd(4, 70);
  }
  const bool i16 = rng() % 2;
  const double ablate_p = (double[]){0.0, 0.0, 0.1, 0.3, 0.5, 0.9, 1.0}[rng() % 7];
  // active rows: a random permutation of outputs, dropping ablated
  std::vector<int32_t> perm(n_out);
  for (int64_t o = 0; o < n_out; ++o) perm[o] = (int32_t)o;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> active;
  std::uniform_real_distribution<double> U(0, 1);
  for (int64_t o = 0; o < n_out; ++o)
    if (U(rng) >= ablate_p) active.push_back(perm[o]);
  const int64_t n_active = (int64_t)active.size();
  std::vector<int32_t> row_of(n_out, -1);
  for (int64_t r = 0; r < n_active; ++r) row_of[active[r]] = (int32_t)r;

  const size_t nx = (size_t)(B * n_in_c), nv = (size_t)(n_active * k), nb = (size_t)n_out, no = (size_t)(n_out * B);
  Alloc ax, av, ai, ab, aro;
  ax.make(nx * 4);
  av.make(nv * 4);
  ai.make(nv * (i16 ? 2 : 4));
  ab.make(nb * 4);
  aro.make(nb * 4);
  float* x = (float*)ax.p;
  float* V = (float*)av.p;
  float* bias = (float*)ab.p;
  int32_t* ro = (int32_t*)aro.p;
  memcpy(ro, row_of.data(), nb * 4);
  std::normal_distribution<float> N(0, 1);
  for (size_t i = 0; i < nx; ++i) x[i] = N(rng);
  for (size_t i = 0; i < nv; ++i) V[i] = N(rng);
  for (size_t i = 0; i < nb; ++i) bias[i] = N(rng);
  std::vector<int64_t> idx(nv);
  for (size_t i = 0; i < nv; ++i) idx[i] = (int64_t)(rng() % (uint64_t)n_in_c);

  // bad indices
  std::vector<char> row_bad(n_active, 0);
  const bool inject = n_active > 0 && k > 0 && rng() % 4 == 0;
  if (inject) {
    int nbad = 1 + (int)(rng() % 3);
    for (int t = 0; t < nbad; ++t) {
      int64_t r = rnd(0, n_active - 1), j = rnd(0, k - 1);
      int64_t val;
      const int c = rng() % 6;
      if (i16) {
        const int64_t opts[] = {-1, n_in_c, 32767, -32768, n_in_c + 1, -(int64_t)rnd(1, 32768)};
        val = opts[c];
      } else {
        const int64_t opts[] = {-1, n_in_c, INT32_MAX, INT32_MIN, n_in_c + (int64_t)rnd(1, 1000000), -(int64_t)rnd(1, 100000)};
        val = opts[c];
      }
      idx[r * k + j] = val;
      row_bad[r] = 1;
    }
  }
  if (i16) {
    int16_t* I = (int16_t*)ai.p;
    for (size_t i = 0; i < nv; ++i) I[i] = (int16_t)idx[i];
  } else {
    int32_t* I = (int32_t*)ai.p;
    for (size_t i = 0; i < nv; ++i) I[i] = (int32_t)idx[i];
  }

  // reference (double) and scale for tolerance
  std::vector<double> ref(no), scale(no);
  for (int64_t o = 0; o < n_out; ++o) {
    const int32_t r = row_of[o];
    for (int64_t b = 0; b < B; ++b) {
      double s = bias[o], a = std::fabs(bias[o]);
      if (r >= 0 && !row_bad[r]) {
        for (int64_t j = 0; j < k; ++j) {
          const double p = (double)V[r * k + j] * (double)x[b * n_in_c + idx[r * k + j]];
          s += p;
          a += std::fabs(p);
        }
      }
      ref[o * B + b] = s;
      scale[o * B + b] = a;
    }
  }

  // row ranges: whole, random partition, or a single sub-range
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int rm = rng() % 3;
  if (rm == 0) {
    ranges.push_back({0, n_out});
  } else if (rm == 1) {
    int64_t o = 0;
    while (o < n_out) {
      int64_t len = rng() % 2 ? rnd(1, 40) : (int64_t)(16 * rnd(1, 3) + rnd(-1, 1));
      if (len < 1) len = 1;
      int64_t e = std::min(n_out, o + len);
      ranges.push_back({o, e});
      o = e;
    }
    std::shuffle(ranges.begin(), ranges.end(), rng);
  } else {
    int64_t a = rnd(0, n_out), b = rnd(0, n_out);
    if (a > b) std::swap(a, b);
    ranges.push_back({a, b});
  }
  std::vector<char> computed(n_out, 0);
  bool expect_bad = false;
  for (auto& rg : ranges)
    for (int64_t o = rg.first; o < rg.second; ++o) {
      computed[o] = 1;
      if (row_of[o] >= 0 && row_bad[row_of[o]]) expect_bad = true;
    }

  // block starts as in CondensedMatmulImpl
  std::vector<int64_t> starts;
  bool any_panel = false;
  for (int64_t b0 = 0; b0 < B;) {
    starts.push_back(b0);
    const int64_t w = generic::PanelWidth(b0, B);
    if (w > 0) any_panel = true;
    b0 = w > 0 ? b0 + w : B;
  }

  bool ok = true;
  for (int t = 0; t < n_isas; ++t) {
    Alloc aout, apk;
    aout.make(no * 4);
    float* outT = (float*)aout.p;
    const uint32_t sentinel = 0x7fc0beefu;
    for (size_t i = 0; i < no; ++i) memcpy(outT + i, &sentinel, 4);
    float* packed = nullptr;
    if (any_panel) {
      apk.make(nx * 4);
      packed = (float*)apk.p;
      for (size_t s = 0; s < starts.size(); ++s) {
        if (generic::PanelWidth(starts[s], B) == 0) continue;
        // split the pack at a random multiple of 16
        int64_t mid = 16 * rnd(0, n_in_c / 16);
        isas[t].pack(x, n_in_c, B, starts[s], 0, mid, packed);
        isas[t].pack(x, n_in_c, B, starts[s], mid, n_in_c, packed);
      }
    }
    bool got_bad = false;
    for (size_t s = 0; s < starts.size(); ++s)
      for (auto& rg : ranges) {
        got_bad |= isas[t].fn(i16, x, packed, n_in_c, B, starts[s], V, ai.p, k, ro, bias, outT, rg.first, rg.second);
        ++n_calls;
      }
    if (got_bad != expect_bad) {
      ok = false;
      printf("[%s] bad flag: got %d expected %d\n", isas[t].name, got_bad, expect_bad);
    }
    int shown = 0;
    for (int64_t o = 0; o < n_out; ++o)
      for (int64_t b = 0; b < B; ++b) {
        const float got = outT[o * B + b];
        if (!computed[o]) {
          if (memcmp(&got, &sentinel, 4) != 0) {
            ok = false;
            if (shown++ < 5) printf("[%s] wrote outside range: o=%ld b=%ld\n", isas[t].name, (long)o, (long)b);
          }
          continue;
        }
        if (row_of[o] >= 0 && row_bad[row_of[o]]) continue;  // value unspecified for a row with a bad index
        const double err = std::fabs((double)got - ref[o * B + b]);
        if (!(err <= 1e-5 * scale[o * B + b] + 1e-30)) {
          ok = false;
          if (shown++ < 5)
            printf("[%s] mismatch o=%ld b=%ld row=%d got=%.9g ref=%.9g scale=%g\n", isas[t].name, (long)o, (long)b,
                   row_of[o], got, ref[o * B + b], scale[o * B + b]);
        }
      }
  }
  ++n_cfg;
  if (inject) ++n_bad_cfg;
  if (!ok || verbose) {
    printf("config: n_in=%ld n_out=%ld k=%ld B=%ld i16=%d n_active=%ld ablate_p=%g inject=%d expect_bad=%d ranges=",
           (long)n_in_c, (long)n_out, (long)k, (long)B, (int)i16, (long)n_active, ablate_p, (int)inject,
           (int)expect_bad);
    for (auto& rg : ranges) printf("[%ld,%ld) ", (long)rg.first, (long)rg.second);
    printf("\n");
  }
  return ok;
}

#ifdef SRIGL_HAVE_ISA_VARIANTS
// LaneSums16 / kSumLane: lane m of the result must be the sum of the vector stored in acc[kSumLane[m]].
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) static bool TestLaneSums() {
  bool ok = true;
  for (int trial = 0; trial < 1000; ++trial) {
    alignas(64) float a[16][16];
    double want[16];
    for (int s = 0; s < 16; ++s) {
      want[s] = 0;
      for (int l = 0; l < 16; ++l) {
        a[s][l] = (float)(int)(rng() % 2001) - 1000.0f;  // exact small integers
        want[s] += a[s][l];
      }
    }
    __m512 acc[16];
    for (int m = 0; m < 16; ++m) acc[avx512::kSumLane[m]] = _mm512_load_ps(a[m]);
    alignas(64) float out[16];
    _mm512_store_ps(out, avx512::LaneSums16(acc));
    for (int m = 0; m < 16; ++m)
      if ((double)out[m] != want[m]) {
        ok = false;
        if (trial == 0) printf("LaneSums16 lane %d: got %g want %g\n", m, out[m], want[m]);
      }
    // involution
    for (int m = 0; m < 16; ++m)
      if (avx512::kSumLane[avx512::kSumLane[m]] != m) ok = false;
  }
  printf("LaneSums16 test: %s\n", ok ? "ok" : "FAIL");
  return ok;
}
#endif

int main(int argc, char** argv) {
  long iters = argc > 1 ? atol(argv[1]) : 10000;
  g_mode = argc > 2 ? atoi(argv[2]) : 0;
  uint64_t seed = argc > 3 ? strtoull(argv[3], nullptr, 10) : 12345;
  rng.seed(seed);
  std::vector<Isa2> isas = {{"generic", &generic::BlockAnyIndex, &generic::PackRange}};
#ifdef SRIGL_HAVE_ISA_VARIANTS
  // only the variants this CPU runs (the others would fault on an illegal instruction)
  if (BestIsaLevel() >= 1) isas.push_back({"avx2", &avx2::BlockAnyIndex, &avx2::PackRange});
  if (BestIsaLevel() >= 2) isas.push_back({"avx512", &avx512::BlockAnyIndex, &avx512::PackRange});
  const bool ok = BestIsaLevel() >= 2 ? TestLaneSums() : true;
#else
  const bool ok = true;
#endif
  printf("variants:");
  for (const Isa2& isa : isas) printf(" %s", isa.name);
  printf("\n");
  long fails = 0;
  for (long i = 0; i < iters; ++i) {
    if (!RunConfig(isas.data(), static_cast<int>(isas.size()), false)) {
      ++fails;
      if (fails > 10) break;
    }
  }
  printf("mode=%d seed=%lu configs=%ld (with injected bad indices: %ld) block calls=%ld failures=%ld\n", g_mode,
         (unsigned long)seed, n_cfg, n_bad_cfg, n_calls, fails);
  return ok && fails == 0 ? 0 : 1;
}
