"""Reference sampler: sort-based truncation, the same counter-based noise as
the kernels, float64-capable. Written for clarity: it sorts every row
(O(V log V)) and materialises (B, V) noise and masks.

Semantics shared by every backend (the kernels find the same thresholds
without sorting):
  z = (logits - max logits) * (1 / temperature)       (fp32; fp64 for fp64 logits)
                                                       (max z = 0: exact to the row's spread at any offset)
  top_k:  keep z >= the k-th largest z                 (ties at the boundary all kept)
  top_p:  among those, keep z >= tau_p, tau_p the largest value whose mass
          sum(exp(z) over the top-k survivors with z >= tau_p) >= top_p * (their total mass)
          i.e. the smallest set of highest-probability tokens reaching top_p
          (HF / vLLM semantics; ties kept; never empty)
  min_p:  keep z - max(z) >= log(min_p)                (p >= min_p * p_max)
Order: temperature, top-k, top-p (on the top-k-renormalised distribution),
min-p. All three keep a prefix of the descending order, so the kept set is
{z >= max(tau_k, tau_p, tau_min)}.
Sampling is an exponential race: token = argmax over kept i of z_i - log(E_i),
E_i = -log(u_i), u_i from noise_uniform(seed_row, i), which is an exact draw
from softmax(z) restricted to the kept set.
temperature == 0 rows are greedy: the first argmax of the logits.
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D  # lowbias32 (C. Wellons' hash-prospector), bias ~0.17
_C2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split c in 16-bit halves so
    no int64 product overflows (each partial product < 2^48)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def noise_bits(seeds: torch.Tensor, V: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, V) int64 holding 32 random bits per (row, token):
    mix(mix(token ^ seed_lo) + seed_hi). Counter-based: any token of any row
    can be drawn independently, in any order, on any device."""
    lo = (seeds & _M32).unsqueeze(-1)
    hi = ((seeds >> 32) & _M32).unsqueeze(-1)
    t = torch.arange(V, device=seeds.device, dtype=torch.int64).unsqueeze(0)
    return _mix32((_mix32(t ^ lo) + hi) & _M32)


def gumbel_noise(seeds: torch.Tensor, V: int) -> torch.Tensor:
    """(B, V) fp32 -log(E), E = -log(u) ~ Exp(1), u = ((bits >> 9) + 0.5) / 2^23
    in (0, 1): 23 bits so that u's largest value 1 - 2^-24 is exact in fp32
    (24 bits would round it to 1.0 and give E = 0, an infinite key). The noise
    is therefore capped at |g| <= 16.6 (a true Gumbel exceeds 16.6 with
    probability 6e-8)."""
    u = ((noise_bits(seeds, V) >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


def _thresholds(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """(B, V) tempered logits -> (B,) threshold: keep z >= threshold."""
    V = z.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    zs, _ = z.sort(dim=-1, descending=True)
    m = zs[:, :1]
    k = top_k.to(torch.int64)
    k_on = (k > 0) & (k < V)
    tau_k = torch.where(k_on, zs.gather(1, (k - 1).clamp(0, V - 1).unsqueeze(1)).squeeze(1), neg_inf)
    in_k = zs >= tau_k.unsqueeze(1)
    e = torch.where(in_k, torch.exp(zs - m), torch.zeros_like(zs))
    cum = e.cumsum(-1)
    target = top_p.to(z.dtype) * e.sum(-1)
    # first index (descending) where the cumulative mass reaches the target;
    # every earlier tie group has mass < target, so that value is tau_p
    reach = (cum >= target.unsqueeze(1)) & in_k
    n_in_k = in_k.sum(-1)
    idx = torch.where(reach.any(-1), reach.int().argmax(-1), n_in_k - 1)
    p_on = top_p < 1
    tau_p = torch.where(p_on, zs.gather(1, idx.unsqueeze(1)).squeeze(1), neg_inf)
    mp_on = min_p > 0
    log_min_p = torch.log(torch.where(mp_on, min_p, torch.ones_like(min_p))).to(torch.float32).to(z.dtype)
    tau_min = torch.where(mp_on, m.squeeze(1) + log_min_p, neg_inf)
    return torch.maximum(torch.maximum(tau_k, tau_p), tau_min)


def sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    filtered: bool = True,
):
    """logits: (B, V); seeds: (B,) int64; temperature, top_p, min_p: (B,)
    float; top_k: (B,) int. Returns tokens (B,) int64, logprobs (B,) (token
    under softmax(z), z = logits / T; T = 1 for greedy rows) and
    processed_logprobs (B,) (under the kept, renormalised distribution; 0
    for greedy rows), fp32 (fp64 for fp64 logits)."""
    acc = acc_dtype(logits.dtype)
    B, V = logits.shape
    if V == 0 and B > 0:
        raise ValueError("rlhf_fast.sample: logits have an empty vocabulary dim (V=0): no token to draw")
    if B == 0:  # as the kernels: empty outputs
        empty = logits.new_empty((0,), dtype=acc)
        return logits.new_empty((0,), dtype=torch.int64), empty, empty.clone()
    greedy = temperature == 0
    t64 = temperature.to(torch.float64)
    inv_t = torch.where(greedy, torch.ones_like(t64), 1.0 / torch.where(greedy, torch.ones_like(t64), t64))
    x = logits.to(acc)
    # the kernels' shifted coordinates (x - max x) * fp32(1 / T), max z = 0
    # (reference/_logprobs.shifted_logits says why)
    m = x.amax(-1, keepdim=True) if V else x.new_zeros((B, 1))
    z = (x - m) * inv_t.to(acc).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    if filtered:
        thr = _thresholds(z, top_k, top_p, min_p)
    else:
        thr = torch.full((B,), float("-inf"), dtype=acc, device=logits.device)
    kept = z >= thr.unsqueeze(1)
    key = torch.where(kept, z + gumbel_noise(seeds, V).to(acc), torch.full_like(z, float("-inf")))
    sampled = key.argmax(-1)
    tokens = torch.where(greedy, z.argmax(-1), sampled)
    z_tok = z.gather(1, tokens.unsqueeze(1)).squeeze(1)
    lse_kept = torch.logsumexp(torch.where(kept, z, torch.full_like(z, float("-inf"))), dim=-1)
    logprobs = z_tok - lse
    processed = torch.where(greedy, torch.zeros_like(z_tok), z_tok - lse_kept)
    return tokens, logprobs, processed
