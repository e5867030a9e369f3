// Rollout-correction options and metrics for the fused policy loss
// (csrc/cpu/ppo_policy_loss.cpp); see ppo_rollout_correction.h.
#include "ppo_rollout_correction.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace rlhf_fast {
namespace cpu {

rc::Cfg parse_rc(c10::string_view is_s, double is_hi, std::optional<double> is_lo, c10::string_view rs_s,
                 double rs_lo, double rs_hi, const char* op) {
  rc::Cfg c;
  const std::string is(is_s), rs(rs_s);
  if (is == "none") c.is = rc::kIsNone;
  else if (is == "token") c.is = rc::kIsToken;
  else if (is == "sequence") c.is = rc::kIsSeq;
  else if (is == "geometric") c.is = rc::kIsGeo;
  else TORCH_CHECK(false, op, ": rollout_is must be none, token, sequence or geometric; got '", is, "'");
  TORCH_CHECK(is_hi > 0, op, ": rollout_is upper threshold must be > 0, got ", is_hi);
  c.is_hi = is_hi;
  c.icepop = is_lo.has_value();
  c.is_lo = is_lo.value_or(1.0 / is_hi);
  TORCH_CHECK(c.is_lo > 0 && c.is_lo <= is_hi, op, ": rollout_is lower threshold must be in (0, upper], got ",
              c.is_lo);
  if (rs == "none") return c;
  const auto under = rs.rfind('_');
  const std::string lvl = under == std::string::npos ? "" : rs.substr(0, under), k = rs.substr(under + 1);
  TORCH_CHECK(k == "k1" || k == "k2" || k == "k3", op, ": unknown rollout_rs '", rs, "'");
  c.rs_k = k[1] - '0';
  if (lvl == "token") c.rs = rc::kRsToken;
  else if (lvl == "seq_sum") c.rs = rc::kRsSum;
  else if (lvl == "seq_mean") c.rs = rc::kRsMean;
  else if (lvl == "seq_max" && c.rs_k != 1) c.rs = rc::kRsMax;
  else TORCH_CHECK(false, op, ": unknown rollout_rs '", rs, "'");
  TORCH_CHECK(c.rs_k == 1 ? rs_lo <= rs_hi : rs_hi > 0, op, ": bad rollout_rs bounds [", rs_lo, ", ", rs_hi, "]");
  c.rs_lo = rs_lo, c.rs_hi = rs_hi;
  return c;
}

// The rollout_corr/* metrics (order: RC_STATS in rlhf_fast/ops/_ppo_loss.py),
// from the row sums in row order. Token means over the caller's mask, row
// means over its non-empty rows; a mean over nothing is 0.
std::vector<double> rc_metrics(const rc::Cfg& c, const std::vector<rc::Row>& rows) {
  double N = 0, S = 0, sw = 0, nh = 0, nl = 0, nrej = 0, slr = 0, sk3 = 0, srho2 = 0;
  double mxw = -INFINITY, mnw = INFINITY, seq_rej = 0, chi2s = 0, tppl = 0, rppl = 0, tlp = 0, rlp = 0, d = 0,
         ad = 0, pr = 0, seq_hi = 0, seq_lo = 0, seq_mx = -INFINITY, seq_mn = INFINITY;
  const bool seq = c.is == rc::kIsSeq || c.is == rc::kIsGeo;
  for (const rc::Row& r : rows) {
    N += r.n0, sw += r.s_w, nh += r.n_high, nl += r.n_low, nrej += r.n_rej;
    slr += r.s_lr, sk3 += r.s_k3, srho2 += r.s_rho2;
    mxw = std::max(mxw, r.max_w), mnw = std::min(mnw, r.min_w);
    if (r.n0 == 0) continue;
    S += 1;
    seq_rej += r.n_rej > 0 ? 1.0 : 0.0;
    const double l = std::clamp(r.s_lr, -20.0, 20.0);
    chi2s += std::exp(2.0 * l);
    const double mo = r.s_old / r.n0, mr = r.s_roll / r.n0;
    tppl += std::exp(-mo), rppl += std::exp(-mr), tlp += -mo, rlp += -mr;
    d += mr - mo, ad += std::abs(mr - mo), pr += std::exp(mr - mo);
    // the row's raw weight, as the kernel made it (sequence: product, geometric: mean)
    const double raw = std::exp(std::clamp(c.is == rc::kIsGeo ? r.s_lr / r.n0 : r.s_lr, -20.0, 20.0));
    seq_hi += raw > c.is_hi ? 1.0 : 0.0, seq_lo += raw < c.is_lo ? 1.0 : 0.0;
    seq_mx = std::max(seq_mx, raw), seq_mn = std::min(seq_mn, raw);
  }
  const double iN = N > 0 ? 1.0 / N : 0.0, iS = S > 0 ? 1.0 / S : 0.0;
  const bool is = c.is != rc::kIsNone && N > 0, rs = c.rs != rc::kRsNone;
  return {
      is ? sw * iN : 0.0,
      is ? (seq ? seq_mx : mxw) : 0.0,
      is ? (seq ? seq_mn : mnw) : 0.0,
      is ? (seq ? seq_hi * iS : nh * iN) : 0.0,
      is ? (seq ? seq_lo * iS : nl * iN) : 0.0,
      rs ? nrej * iN : 0.0,
      rs ? seq_rej * iS : 0.0,
      -slr * iN,
      sk3 * iN,
      N > 0 ? srho2 * iN - 1.0 : 0.0,
      S > 0 ? chi2s * iS - 1.0 : 0.0,
      tppl * iS, rppl * iS, tlp * iS, rlp * iS, d * iS, ad * iS, pr * iS,
  };
}
}  // namespace cpu
}  // namespace rlhf_fast
