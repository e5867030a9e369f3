// CPU registrations of the advantage and PPO-loss kernels (kernels.h), in
// one file: <torch/library.h> is parsed here once instead of in each
// kernel's file. (logprobs.cpp and sampling.cpp register their own.)
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  using namespace rlhf_fast::cpu;
  m.impl("gae", &gae_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("whiten", &whiten_cpu);
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("ppo_loss_fwd", &ppo_loss_fwd_cpu);
  m.impl("ppo_loss_bwd", &ppo_loss_bwd_cpu);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_cpu);
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_cpu);
  m.impl("kl_penalty_bwd", &kl_penalty_bwd_cpu);
}
