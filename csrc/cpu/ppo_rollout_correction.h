// Torch-side half of the fused policy loss's rollout correction: option
// parsing and the rollout_corr/* metrics from the row sums. The per-token
// math is torch-free in rlhf_fast/rollout_correction.h.
#pragma once

#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "rlhf_fast/rollout_correction.h"

namespace rlhf_fast {
namespace cpu {

constexpr int64_t kRcStats = 18;  // RC_STATS in rlhf_fast/ops/_ppo_loss.py

rc::Cfg parse_rc(c10::string_view is_s, double is_hi, std::optional<double> is_lo, c10::string_view rs_s,
                 double rs_lo, double rs_hi, const char* op);

// kRcStats metrics, from the row sums in row order.
std::vector<double> rc_metrics(const rc::Cfg& c, const std::vector<rc::Row>& rows);

}  // namespace cpu
}  // namespace rlhf_fast
