// Randomised harness for the condensed kernel's row blocks (every ISA variant this CPU runs) against a
// double-precision reference, built with AddressSanitizer/UBSan by tests/test_kernel_harness.py:
//   kernel_harness <configs> <mode> <seed>
// mode 0: exact-size malloc buffers (ASan), 1/2: each buffer ends/starts at a PROT_NONE guard page (catches
// the AVX-512 loads, stores and gathers that ASan does not instrument), 3: 1 or 2 at random per buffer.
// Each configuration: random layer (n_in 1-300, n_out 1-70, k 0-n_in with edge values, batch 1-70 covering
// every panel width and the gathered columns, ablation 0-100%, int16/int32 indices, sometimes bad indices),
// the batch panels packed in two tasks, and the rows computed over a random partition (or sub-range) of
// [0, n_out) as the thread chunks do. Checked: values, the bad-index flag, and that rows outside the ranges
// are never written. Every third configuration also runs a random condensed convolution (RunConvConfig).
// Exit status 0 when everything matched.
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
  bool scalar;  // gathered columns by scalar loads (the other batch-1 formulation)
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
        got_bad |= isas[t].fn(i16, x, packed, n_in_c, B, starts[s], V, ai.p, k, ro, bias, outT, rg.first, rg.second,
                              isas[t].scalar);
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

// ---------------------------------------------------------------------------------------------- convolution
// One random condensed convolution (srigl_condensed_conv2d's pieces: packing over random row tasks, the tap
// table over random group ranges, blocks over a random partition of runs x groups), every ISA variant, against
// a double reference. The packed input ends at a guard page (mode 1) or is exact-size: the kernel may read its
// slack but nothing after. Checked: values, the bad-index flag, every output element written exactly where
// expected (a sentinel elsewhere would show).
static long n_conv_cfg = 0;

static bool RunConvConfig() {
  ConvGeom g0{};
  const int r = rng() % 4;
  g0.B = r == 0 ? rnd(15, 40) : rnd(1, 6);
  g0.H = rnd(1, 12), g0.W = rnd(1, 12), g0.C = rng() % 5 == 0 ? rnd(16, 40) : rnd(1, 9);
  g0.kh = rnd(1, 5), g0.kw = rnd(1, 5), g0.sh = rnd(1, 3), g0.sw = rnd(1, 3);
  g0.pt = rnd(0, 4), g0.pl = rnd(0, 4);
  const int64_t pb = rnd(0, 4), pr = rnd(0, 4);
  const int64_t hp = g0.H + g0.pt + pb, wp = g0.W + g0.pl + pr;
  if (hp < g0.kh || wp < g0.kw) return true;  // no output (the handler returns before any of this)
  g0.OH = (hp - g0.kh) / g0.sh + 1, g0.OW = (wp - g0.kw) / g0.sw + 1;
  g0.n_out = rnd(1, 40);
  const int64_t n_taps = g0.kh * g0.kw * g0.C;
  const int64_t k = rng() % 3 == 0 ? pick_edge(n_taps) : rnd(0, n_taps);
  const bool i16 = rng() % 2;
  const double ablate_p = (double[]){0.0, 0.0, 0.2, 0.5, 1.0}[rng() % 5];
  std::vector<int32_t> active, ablated;
  std::uniform_real_distribution<double> U(0, 1);
  for (int64_t o = 0; o < g0.n_out; ++o) (U(rng) >= ablate_p ? active : ablated).push_back((int32_t)o);
  if (rng() % 3 == 0) std::shuffle(active.begin(), active.end(), rng);  // any order of active channels
  const int64_t n_active = (int64_t)active.size();
  std::normal_distribution<float> N(0, 1);
  std::vector<float> x(g0.B * g0.H * g0.W * g0.C), V(n_active * k), bias(g0.n_out);
  for (auto& v : x) v = N(rng);
  for (auto& v : V) v = N(rng);
  for (auto& v : bias) v = N(rng);
  std::vector<int64_t> idx(n_active * k);
  for (auto& i : idx) i = (int64_t)(rng() % (uint64_t)n_taps);
  const bool inject = n_active > 0 && k > 0 && rng() % 6 == 0;
  if (inject) idx[rnd(0, n_active * k - 1)] = (int64_t[]){-1, n_taps, i16 ? 32767 : INT32_MAX, i16 ? -32768 : INT32_MIN}[rng() % 4];
  std::vector<int16_t> I16(idx.begin(), idx.end());
  std::vector<int32_t> I32(idx.begin(), idx.end());

  // reference
  const int64_t n_outs = g0.B * g0.OH * g0.OW * g0.n_out;
  std::vector<double> ref(n_outs), scale(n_outs);
  for (int64_t b = 0; b < g0.B; ++b)
    for (int64_t oh = 0; oh < g0.OH; ++oh)
      for (int64_t ow = 0; ow < g0.OW; ++ow) {
        const int64_t at = ((b * g0.OH + oh) * g0.OW + ow) * g0.n_out;
        for (int64_t o = 0; o < g0.n_out; ++o) ref[at + o] = bias[o], scale[at + o] = std::fabs(bias[o]);
        for (int64_t rr = 0; rr < n_active && !inject; ++rr)
          for (int64_t j = 0; j < k; ++j) {
            const int64_t i = idx[rr * k + j], dy = i / (g0.kw * g0.C), dx = (i / g0.C) % g0.kw, c = i % g0.C;
            const int64_t h = oh * g0.sh + dy - g0.pt, w = ow * g0.sw + dx - g0.pl;
            if (h < 0 || h >= g0.H || w < 0 || w >= g0.W) continue;
            const double p = (double)V[rr * k + j] * x[((b * g0.H + h) * g0.W + w) * g0.C + c];
            ref[at + active[rr]] += p;
            scale[at + active[rr]] += std::fabs(p);
          }
      }

  bool ok = true;
  const int n_isas = 1 + BestIsaLevel();
  for (int t = 0; t < n_isas; ++t) {
    const ConvIsa& isa = kConvIsas[t];
    ConvGeom g = g0;
    g.TP = isa.tile_width();
    PlanConv(g);
    const int64_t slack = ConvSlack(g), R = isa.group(), n_groups = (n_active + R - 1) / R;
    Alloc apk, aout, ax;
    ax.make(std::max<size_t>(1, x.size()) * 4);
    memcpy(ax.p, x.data(), x.size() * 4);
    apk.make((g.packed_floats() + slack) * 4);
    aout.make(std::max<int64_t>(1, n_outs) * 4);
    float* packed = (float*)apk.p;
    float* out = (float*)aout.p;
    const uint32_t sentinel = 0x7fc0beefu;
    for (int64_t i = 0; i < n_outs; ++i) memcpy(out + i, &sentinel, 4);
    for (int64_t i = 0; i < g.packed_floats() + slack; ++i) memcpy(packed + i, &sentinel, 4);  // NaN: must be overwritten or discarded
    ConvZeroUnpacked(g, packed, slack);
    std::vector<float> scratch(g.TP * g.W);
    for (int64_t bo = 0; bo < g.Bo; ++bo) {  // rows in random task splits
      int64_t h0 = 0;
      while (h0 < g.Hq * g.sh) {
        const int64_t h1 = std::min(g.Hq * g.sh, h0 + rnd(1, 5));
        isa.pack((const float*)ax.p, g, bo, h0, h1, packed, scratch.data());
        h0 = h1;
      }
    }
    std::vector<int32_t> tap_off(n_taps);
    for (int64_t i = 0; i < n_taps; ++i) tap_off[i] = (int32_t)g.tap_offset(i);
    std::vector<ConvTap> taps(n_groups * k * R);
    bool good = true;
    for (int64_t a = 0; a < n_groups;) {
      const int64_t b = std::min(n_groups, a + rnd(1, 3));
      good &= i16 ? ConvTapTable(tap_off, I16.data(), V.data(), n_active, k, R, a, b, taps.data())
                  : ConvTapTable(tap_off, I32.data(), V.data(), n_active, k, R, a, b, taps.data());
      a = b;
    }
    if (good == inject) {
      ok = false;
      printf("[conv %d] bad-index flag %d, injected %d\n", t, !good, inject);
    }
    if (!good) continue;
    const int64_t runs_per = rnd(1, 4), groups_per = rnd(1, 3);
    std::vector<int64_t> out_at;
    for (int64_t r0 = 0; r0 < g.n_runs(); r0 += runs_per)
      for (int64_t a = 0; a < std::max<int64_t>(1, n_groups); a += groups_per)
        ConvBlock(isa, g, packed, taps.data(), k, active.data(), n_active, a, std::min(n_groups, a + groups_per),
                  r0, std::min(g.n_runs(), r0 + runs_per), a == 0, ablated, bias.data(), out_at, out);
    int shown = 0;
    for (int64_t i = 0; i < n_outs; ++i) {
      const double err = std::fabs((double)out[i] - ref[i]);
      if (!(err <= 1e-5 * scale[i] + 1e-30)) {  // also catches the sentinel (NaN): an element never written
        ok = false;
        if (shown++ < 5) printf("[conv %d] mismatch at %ld: got %.9g ref %.9g\n", t, (long)i, out[i], ref[i]);
      }
    }
  }
  ++n_conv_cfg;
  if (!ok) {
    printf("conv config: B=%ld H=%ld W=%ld C=%ld k=%ldx%ld s=%ldx%ld pads=%ld,%ld,%ld,%ld out=%ld k=%ld n_active=%ld "
           "i16=%d inject=%d\n", (long)g0.B, (long)g0.H, (long)g0.W, (long)g0.C, (long)g0.kh, (long)g0.kw,
           (long)g0.sh, (long)g0.sw, (long)g0.pt, (long)pb, (long)g0.pl, (long)pr, (long)g0.n_out, (long)k,
           (long)n_active, (int)i16, (int)inject);
  }
  return ok;
}

int main(int argc, char** argv) {
  long iters = argc > 1 ? atol(argv[1]) : 10000;
  g_mode = argc > 2 ? atoi(argv[2]) : 0;
  uint64_t seed = argc > 3 ? strtoull(argv[3], nullptr, 10) : 12345;
  rng.seed(seed);
  std::vector<Isa2> isas = {{"generic", &generic::BlockAnyIndex, &generic::PackRange, false}};
#ifdef SRIGL_HAVE_ISA_VARIANTS
  // only the variants this CPU runs (the others would fault on an illegal instruction), each with both
  // formulations of the gathered columns (vector gathers, scalar loads)
  if (BestIsaLevel() >= 1) {
    isas.push_back({"avx2", &avx2::BlockAnyIndex, &avx2::PackRange, false});
    isas.push_back({"avx2+scalar-loads", &avx2::BlockAnyIndex, &avx2::PackRange, true});
  }
  if (BestIsaLevel() >= 2) {
    isas.push_back({"avx512", &avx512::BlockAnyIndex, &avx512::PackRange, false});
    isas.push_back({"avx512+scalar-loads", &avx512::BlockAnyIndex, &avx512::PackRange, true});
  }
  const bool ok = BestIsaLevel() >= 2 ? TestLaneSums() : true;
#else
  const bool ok = true;
#endif
  printf("variants:");
  for (const Isa2& isa : isas) printf(" %s", isa.name);
  printf("\n");
  long fails = 0;
  for (long i = 0; i < iters; ++i) {
    if (!RunConfig(isas.data(), static_cast<int>(isas.size()), false) || (i % 3 == 0 && !RunConvConfig())) {
      ++fails;
      if (fails > 10) break;
    }
  }
  printf("mode=%d seed=%lu configs=%ld (with injected bad indices: %ld) block calls=%ld conv configs=%ld failures=%ld\n",
         g_mode, (unsigned long)seed, n_cfg, n_bad_cfg, n_calls, n_conv_cfg, fails);
  return ok && fails == 0 ? 0 : 1;
}
