// Every rlhf_fast schema, declared once. Kernels register against these names
// from csrc/cpu/*.cpp (CPU) and csrc/cuda/*_ops.cpp (CUDA); Python adds
// register_fake / register_autograd in rlhf_fast/ops/.
#include <torch/library.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(rlhf_fast, m) {
  // ---- log-probs and entropy from logits (rlhf_fast/ops/logprobs.py) ----
  // logits: (A, B, V), any strides on A and B, stride 1 on V; labels: (A, B).
  // Returns fp32 (fp64 for fp64 logits) log p(label), entropy and the per-row
  // log-sum-exp of logits / temperature, which backward reuses. Rows whose
  // label == ignore_index are never read and give 0.
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float temperature, "
      "int ignore_index) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // d logits = (g_lp * (onehot - p) - g_H * p * (z - E_p[z])) / T, one pass,
  // p recomputed from lse; E_p[z] = lse - entropy. grad_entropy may be None.
  m.def(
      "logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor lse, Tensor entropy, float temperature, "
      "int ignore_index) -> Tensor");

  // ---- fused linear log-probs (rlhf_fast/ops/linear_logprobs.py) ----
  // hidden: (N, H), weight: (V, H), bias: (V,) or None, labels: (N,).
  // Same outputs as logprobs_fwd(hidden @ weight.T + bias, ...) without the
  // (N, V) logits: CPU runs chunk_size tokens at a time (matmul + the fused
  // row pass), so the scratch is chunk_size * V floats. The CPU kernels are
  // Python compositions of logprobs_fwd / logprobs_bwd and at::mm, registered
  // from rlhf_fast/ops/linear_logprobs.py.
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, float temperature, int ignore_index, int chunk_size) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // Recomputes each chunk's logits; grad_weight / grad_bias are accumulated
  // over tokens in fp32 and cast once. grad_bias is (0,) when bias is None.
  m.def(
      "linear_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, "
      "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index, int chunk_size) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

namespace {

// Facts about this build, shown by rlhf_fast.info() / `rlhf-fast info`.
pybind11::dict build_info() {
  pybind11::dict info;
  std::vector<std::string> backends{"cpp"};
#ifdef RLHF_FAST_WITH_CUDA
  backends.push_back("cuda");
  info["cuda_archs"] = std::string(RLHF_FAST_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string("");
#endif
  info["backends"] = backends;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#if defined(__x86_64__)
  __builtin_cpu_init();
  info["cpu_avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  info["cpu_avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast compiled kernels; the ops live under torch.ops.rlhf_fast";
  m.def("build_info", &build_info, "Facts about how this extension was built");
}
