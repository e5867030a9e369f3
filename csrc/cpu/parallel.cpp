#include "parallel.h"

namespace rlhf_fast {
namespace cpu {

// Break-even of a 2-thread at::parallel_for for the cheapest sweep here.
// csrc/tools/grain_bench.cpp (2-core x86-64, AVX-512, minimum of 3000 runs;
// medians on the shared machine were dominated by multi-ms scheduling stalls):
//   forking 2 threads costs ~2 us (n = 4096 row scaling: 0.42 us serial, 2.1 us split);
//   row scaling (0.13 ns / element): tasks of 16384 tie with serial (4.1 vs 4.2 us at
//   n = 32768), tasks of 32768 win 1.5x (8.9 vs 6.1 us);
//   KL k3 (1.2 ns / element): tasks of 16384 win 1.7x (39 vs 21 us at n = 32768).
// 16384 never loses to serial and splits every sweep of >= 1 ns / element
// (KL, value loss, policy loss, GAE, log-probs) from 32k elements on; 32768
// (the old constant of the log-prob, sampler, KL and backward loops) kept
// those serial up to 64k. The old 16384 of the loss and GAE loops stays.
const int64_t kTaskElems = 16384;

}  // namespace cpu
}  // namespace rlhf_fast
