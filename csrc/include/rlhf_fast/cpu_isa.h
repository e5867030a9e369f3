// Which vector ISA the CPU kernels use: the widest the CPU supports, unless
// RLHF_FAST_CPU_ISA (avx512 | avx2 | baseline) or rlhf_fast._C.set_cpu_isa()
// asks for a narrower one, so tests can run every copy on one machine.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

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

// Picks the copy of a kernel for the active ISA.
#define RLHF_FAST_ISA_DISPATCH(fn, ...)                                   \
  (::rlhf_fast::cpu::active_isa() == ::rlhf_fast::cpu::Isa::kAvx512       \
       ? fn##_avx512(__VA_ARGS__)                                          \
       : ::rlhf_fast::cpu::active_isa() == ::rlhf_fast::cpu::Isa::kAvx2   \
             ? fn##_avx2(__VA_ARGS__)                                      \
             : fn##_baseline(__VA_ARGS__))

}  // namespace cpu
}  // namespace rlhf_fast
