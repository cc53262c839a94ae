// Floor of the batch-1 condensed product on this CPU: the 16-lane AVX-512 gathers alone, over the exact index
// stream of a layer (full 16-index steps plus one masked step per neuron for the k % 16 tail, as the kernel
// does), with no value loads, multiply-adds or reductions. Driven by bench/batch1_bound.py, which writes the
// int16 indices of its layer to a file and compiles this with -O3 -march=native.
//   usage: gather_floor <indices.bin> <n_active> <k> <n_in> <reps> [cpu]   (cpu: pin to that CPU first)
// Prints "min_us median_us" over <reps> passes over all neurons (x is 4 * n_in bytes, L1/L2-resident as at batch 1).
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) static float GatherPass(
    const float* x, const int16_t* idx, int64_t n_active, int64_t k) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t r = 0; r < n_active; ++r) {
    const int16_t* row = idx + r * k;
    int64_t j = 0;
    int t = 0;
    for (; j + 16 <= k; j += 16, t = (t + 1) & 3) {  // four independent chains: throughput, not latency
      const __m512i i = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)));
      acc[t] = _mm512_add_ps(acc[t], _mm512_i32gather_ps(i, x, 4));
    }
    if (j < k) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << (k - j)) - 1u);
      const __m512i i = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(lanes, row + j));
      acc[t] = _mm512_add_ps(acc[t], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, i, x, 4));
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s <indices.bin> <n_active> <k> <n_in> <reps> [cpu]\n", argv[0]);
    return 2;
  }
  if (argc == 7) {
#ifdef __linux__
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(std::atoi(argv[6]), &one);
    if (sched_setaffinity(0, sizeof(one), &one) != 0) {
      std::perror("sched_setaffinity");
      return 2;
    }
#else
    std::fprintf(stderr, "pinning to a CPU is only implemented on Linux\n");
    return 2;
#endif
  }
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl")) {
    std::fprintf(stderr, "this CPU has no AVX-512 (F/BW/VL): no gather floor\n");
    return 3;
  }
  const int64_t n_active = std::atoll(argv[2]), k = std::atoll(argv[3]), n_in = std::atoll(argv[4]);
  const int reps = std::atoi(argv[5]);
  std::vector<int16_t> idx(static_cast<size_t>(n_active * k));
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr || std::fread(idx.data(), sizeof(int16_t), idx.size(), f) != idx.size()) {
    std::fprintf(stderr, "cannot read %lld int16 indices from %s\n", static_cast<long long>(idx.size()), argv[1]);
    return 2;
  }
  std::fclose(f);
  for (int16_t i : idx) {
    if (i < 0 || i >= n_in) {
      std::fprintf(stderr, "index %d outside [0, %lld)\n", i, static_cast<long long>(n_in));
      return 2;
    }
  }
  std::vector<float> x(static_cast<size_t>(n_in));
  for (int64_t i = 0; i < n_in; ++i) x[i] = static_cast<float>(i % 7) * 0.25f;
  std::vector<double> us;
  volatile float sink = 0.0f;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + GatherPass(x.data(), idx.data(), n_active, k);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  std::printf("%.3f %.3f\n", us.front(), us[us.size() / 2]);
  return 0;
}
