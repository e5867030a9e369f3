// The slice of ATen the CPU kernel files use: Tensor with its methods,
// parallel_for and the dtype dispatch, without <ATen/ATen.h> (every
// operator's header) or <torch/library.h> (the registrations are in
// register_cpu.cpp). Parsing those two took 7.1 s of every file's compile
// (GCC 12, -O3 -g0, an otherwise empty file), against ~2 s for these.
// Factories go through Tensor methods (new_empty, new_full): the
// ATen/ops/<factory>.h headers pull in ATen/Context.h, ~2 s more a file.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstring>
#include <vector>

namespace rlhf_fast {
namespace cpu {

// A 1-D tensor of `v` (computed in fp64) as dtype dt: at::tensor(v).to(dt).
inline at::Tensor tensor_of(const at::Tensor& like, const std::vector<double>& v, at::ScalarType dt) {
  at::Tensor t = like.new_empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(double));
  return t.to(dt);
}

// A 0-dim tensor of x (fp64) as dtype dt: at::scalar_tensor(x).to(dt).
inline at::Tensor scalar_of(const at::Tensor& like, double x, at::ScalarType dt) {
  return like.new_full({}, x, at::TensorOptions().dtype(at::kDouble)).to(dt);
}

}  // namespace cpu
}  // namespace rlhf_fast
