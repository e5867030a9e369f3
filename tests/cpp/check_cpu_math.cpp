// Bit-exactness of cpu_math.h's fast paths against the forms they replace,
// run by tests/test_cpu_math_exact.py (compiled for the AVX2 and the
// baseline copy). Prints one line per check and exits non-zero on a
// mismatch.
//   exp_pm20 (vector and scalar) == exp_nonpos for x in [-20, 20]: every
//     STRIDE-th float bit pattern of each sign, both ends and NaN;
//   clampv (min-then-max form) == clamping on x by two selects, for NaN,
//     +-inf, +-0, the bounds, their neighbours and strided patterns.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "rlhf_fast/cpu_math.h"

using namespace rlhf_fast::cpu;
using vf = Vec<8>::f;
using vu = Vec<8>::u;

static uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

static vf clamp_by_x(vf x, vf lo, vf hi) { return x < lo ? lo : (x > hi ? hi : x); }

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  long bad = 0, n = 0;
  const uint32_t top = bits(20.f);
  auto check_exp = [&](vf x) {
    const vf got = exp_pm20(x), want = exp_nonpos<8>(x);
    for (int l = 0; l < 8; ++l) {
      const float s = exp_pm20(x[l]);
      const bool same = bits(got[l]) == bits(want[l]) && bits(s) == bits(want[l]);
      const bool nan = std::isnan(x[l]) && std::isnan(got[l]) && std::isnan(s);
      if (!same && !nan && bad++ < 5) std::printf("exp_pm20(%a): %a / scalar %a, want %a\n", x[l], got[l], s, want[l]);
    }
    n += 8;
  };
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint64_t u = 0; u <= top; u += 8 * stride) {
      vu b;
      for (int l = 0; l < 8; ++l) b[l] = uint32_t(u + l * stride > top ? top : u + l * stride) | sign;
      check_exp((vf)b);
    }
  check_exp(vf{20.f, -20.f, 0.f, -0.f, NAN, -NAN, 1e-30f, -1e-30f});
  std::printf("exp_pm20: %ld of %ld differ\n", bad, n);

  long cbad = 0, cn = 0;
  const float inf = std::numeric_limits<float>::infinity();
  const float bounds[][2] = {{-20.f, 20.f}, {0.8f, 1.28f}, {-0.f, 0.f}, {0.f, -0.f}, {1.f, 1.f}, {-inf, inf}};
  for (const auto& lh : bounds) {
    const vf lo = splat<8>(lh[0]), hi = splat<8>(lh[1]);
    auto check = [&](vf x) {
      const vf a = clampv(x, lo, hi), b = clamp_by_x(x, lo, hi);
      for (int l = 0; l < 8; ++l)
        if (bits(a[l]) != bits(b[l]) && !(std::isnan(a[l]) && std::isnan(b[l])) && cbad++ < 5)
          std::printf("clampv(%a, %a, %a) = %a, want %a\n", x[l], lh[0], lh[1], a[l], b[l]);
      cn += 8;
    };
    check(vf{NAN, -NAN, inf, -inf, 0.f, -0.f, lh[0], lh[1]});
    check(vf{std::nextafter(lh[0], -inf), std::nextafter(lh[0], inf), std::nextafter(lh[1], -inf),
             std::nextafter(lh[1], inf), 1e-45f, -1e-45f, 3.4e38f, -3.4e38f});
    for (uint64_t u = 0; u < (1ull << 32); u += 8 * 4099) {
      vu b;
      for (int l = 0; l < 8; ++l) b[l] = uint32_t(u + l * 4099);
      check((vf)b);
    }
  }
  std::printf("clampv: %ld of %ld differ\n", cbad, cn);
  return bad || cbad ? 1 : 0;
}
