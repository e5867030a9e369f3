// The one grain rule of the CPU kernels' at::parallel_for: a task gets at
// least kTaskElems elements (defined, with how it was measured, in
// parallel.cpp, so that retuning it recompiles one file).
#pragma once

#include <algorithm>
#include <cstdint>

namespace rlhf_fast {
namespace cpu {

extern const int64_t kTaskElems;

// Grain for a loop over rows of row_len elements each (at least min_rows).
inline int64_t rows_per_task(int64_t row_len, int64_t min_rows = 1) {
  return std::max<int64_t>(min_rows, kTaskElems / std::max<int64_t>(row_len, 1));
}

}  // namespace cpu
}  // namespace rlhf_fast
