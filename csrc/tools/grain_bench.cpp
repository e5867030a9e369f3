// The measurement behind kTaskElems (csrc/cpu/parallel.cpp): the cheapest
// per-element sweeps of the CPU kernels (the KL k3 estimator, the backward
// row scaling) run serially and split over 2 OpenMP threads, n = 2 tasks.
// Not part of the extension (setup.py builds csrc/ops.cpp and csrc/cpu/ only):
//   g++ -O3 -std=c++20 -fopenmp -ffp-contract=off -fno-trapping-math \
//       -march=x86-64-v4 -Icsrc/include csrc/tools/grain_bench.cpp -o /tmp/grain_bench
//   /tmp/grain_bench
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
#include "rlhf_fast/kl_estimators.h"
using namespace rlhf_fast::cpu;
static void k3(const float* a, const float* b, float* o, long n) {
#pragma omp simd
  for (long i = 0; i < n; ++i) { float v, d; kl_term<kK3>(a[i], b[i], v, d); o[i] = v; }
}
static void scale(const float* a, const float*, float* o, long n) {
#pragma omp simd
  for (long i = 0; i < n; ++i) o[i] = 0.37f * a[i];
}
template <class F> static void stats(const char* name, F f, long n, std::vector<float>& a, std::vector<float>& b, std::vector<float>& o) {
  auto now = [] { return std::chrono::steady_clock::now(); };
  for (int threads : {1, 2}) {
    std::vector<double> ts;
    for (int rep = 0; rep < 3000; ++rep) {
      auto t0 = now();
      if (threads == 1) f(a.data(), b.data(), o.data(), n);
      else {
#pragma omp parallel num_threads(2)
        { long h = n / 2, s = omp_get_thread_num() * h; f(a.data() + s, b.data() + s, o.data() + s, h); }
      }
      ts.push_back(std::chrono::duration<double, std::micro>(now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    printf("%-6s n=%6ld threads=%d  min %7.2f us  median %7.2f us\n", name, n, threads, ts[0], ts[ts.size() / 2]);
  }
}
int main() {
  long N = 1 << 18;
  std::vector<float> a(N), b(N), o(N);
  for (long i = 0; i < N; ++i) a[i] = -1.0f + 1e-6f * i, b[i] = -1.1f + 2e-6f * (i % 977);
  for (long n : {4096L, 8192L, 16384L, 32768L, 65536L, 131072L}) {
    stats("kl_k3", k3, n, a, b, o);
    stats("scale", scale, n, a, b, o);
  }
}
