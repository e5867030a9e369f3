// Which vector ISA the CPU kernels use: the widest the CPU supports, unless
// RLHF_FAST_CPU_ISA (avx512 | avx2 | baseline) or rlhf_fast._backend.set_cpu_isa()
// asks for a narrower one, so tests can run every copy on one machine.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace rlhf_fast {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_supported_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// Parses a name; returns false for an unknown one.
inline bool parse_isa(const char* name, Isa* out) {
  if (!std::strcmp(name, "avx512")) *out = Isa::kAvx512;
  else if (!std::strcmp(name, "avx2")) *out = Isa::kAvx2;
  else if (!std::strcmp(name, "baseline")) *out = Isa::kBaseline;
  else return false;
  return true;
}

inline std::atomic<int>& isa_slot() {
  static std::atomic<int> slot([] {
    Isa best = best_supported_isa(), want = best;
    const char* env = std::getenv("RLHF_FAST_CPU_ISA");
    if (env && parse_isa(env, &want) && static_cast<int>(want) < static_cast<int>(best)) best = want;
    return static_cast<int>(best);
  }());
  return slot;
}

inline Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

// Each vectorised kernel is compiled three times (AVX-512, AVX2+FMA and
// plain x86-64) and isa_call picks one at run time: wheels must run on any
// x86-64, wider vectors only where the CPU has them. (This replaces GCC's
// target_clones, whose loader-time choice ignored the switch above.)
#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_FAST_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define RLHF_FAST_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define RLHF_FAST_TARGET_AVX512
#define RLHF_FAST_TARGET_AVX2
#endif

// A kernel is a type K with `template <int W> static void|R run(args...)`,
// marked always-inline so that its whole body is compiled into each copy
// below with that copy's instruction set. W is the copy's fp32 lanes per
// vector (16, 8, 4); a kernel whose lane count is part of its summation
// order ignores W and fixes its own, so every copy gives the same bits.
template <typename K, typename... A>
RLHF_FAST_TARGET_AVX512 __attribute__((noinline)) auto isa_copy_avx512(A&&... a) {
  return K::template run<16>(std::forward<A>(a)...);
}
template <typename K, typename... A>
RLHF_FAST_TARGET_AVX2 __attribute__((noinline)) auto isa_copy_avx2(A&&... a) {
  return K::template run<8>(std::forward<A>(a)...);
}
template <typename K, typename... A>
__attribute__((noinline)) auto isa_copy_baseline(A&&... a) {
  return K::template run<4>(std::forward<A>(a)...);
}

// K::run on `isa`'s copy, for a caller that sizes its work by the ISA's
// lanes and must read the ISA once (set_cpu_isa may run in between).
template <typename K, typename... A>
inline auto isa_call_on(Isa isa, A&&... a) {
  switch (isa) {
    case Isa::kAvx512: return isa_copy_avx512<K>(std::forward<A>(a)...);
    case Isa::kAvx2: return isa_copy_avx2<K>(std::forward<A>(a)...);
    default: return isa_copy_baseline<K>(std::forward<A>(a)...);
  }
}

// K::run on the active ISA's copy: the one way every CPU kernel is called.
template <typename K, typename... A>
inline auto isa_call(A&&... a) {
  return isa_call_on<K>(active_isa(), std::forward<A>(a)...);
}

// fp32 lanes per vector of an ISA copy (the W its kernels get).
inline int isa_lanes(Isa isa) { return isa == Isa::kAvx512 ? 16 : isa == Isa::kAvx2 ? 8 : 4; }

}  // namespace cpu
}  // namespace rlhf_fast
