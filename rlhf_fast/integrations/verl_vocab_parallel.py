"""Drop-in replacements for verl's vocab-parallel log-prob / entropy functions
of its Megatron path (verl 0.9.1, verl/utils/megatron/tensor_parallel.py),
on rlhf_fast.vocab_parallel_logprobs.

Replaced names (module -> names; verl's Megatron engine imports three of them
by name, so its bindings need replacing too):

    verl.utils.megatron.tensor_parallel:
        vocab_parallel_log_probs_from_logits(logits, labels)
        vocab_parallel_entropy(vocab_parallel_logits)
        vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size=2048)
        vocab_parallel_log_probs_from_logits_response_rmpad(input_ids, attention_mask, logits_rmpad, response_length)
    verl.workers.engine.megatron.transformer_impl:
        vocab_parallel_log_probs_from_logits, vocab_parallel_entropy, vocab_parallel_entropy_with_chunking

REPLACEMENTS below maps each module to {name: function}, for whoever wires
these into rlhf_fast.integrations.verl.patch().

Semantics kept (read from verl 0.9.1 and Megatron-core's
vocab_parallel_cross_entropy, which verl's log-prob function negates):
- logits (..., V / tp) on the tensor-model-parallel group of
  megatron.core.parallel_state, Megatron's even partition: rank r holds
  [r * V_r, (r + 1) * V_r). labels (...) are global ids. No temperature: verl
  divides the logits in place before calling these (`logits.div_(temperature)`).
- log-probs are float32 (Megatron upcasts to fp32), entropy is float32 (verl's
  chunked variant fills an fp32 tensor; its unchunked one returned the logits'
  dtype, so bf16 logits now give an fp32 entropy, not a bf16 one).
- Gradients: d/dlogits of each shard, as Megatron's / verl's autograd
  Functions give (softmax - onehot, and -p * (z - E[z])).
Differences, all on inputs verl does not produce: Megatron's cross-entropy
subtracts the max from fp32 logits *in place* (verl clones the logits
before it for that reason); nothing here mutates its inputs. A label of -100
gives 0 (ignored) where Megatron would return -logsumexp; a label outside
[0, V) raises instead of being read as "on no rank". chunk_size is accepted
and unused: the op keeps O(N) scratch, no (chunk, V) temporaries.
Cost per call: one MAX all-reduce of N fp32 and one SUM all-reduce of 3N
fp32 (verl's entropy: three all-reduces of N values plus the (N, V_r)
softmax temporaries; Megatron's cross-entropy: three all-reduces).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import vocab_parallel_logprobs

__all__ = [
    "REPLACEMENTS",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_with_chunking",
    "vocab_parallel_log_probs_from_logits",
    "vocab_parallel_log_probs_from_logits_response_rmpad",
]


def _tp_group(group):
    """The group to reduce over: the caller's, else Megatron's tensor-model-
    parallel group (what verl's functions use)."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state as mpu
    except ImportError as exc:
        raise ImportError(
            "rlhf_fast.integrations.verl_vocab_parallel: megatron-core is not importable, so the tensor-parallel "
            "group is unknown; pass group=<ProcessGroup> or install megatron-core"
        ) from exc
    return mpu.get_tensor_model_parallel_group()


def _megatron_layout(logits: torch.Tensor, group):
    """Megatron's even vocabulary partition: rank r of the group holds
    [r * V_r, (r + 1) * V_r)."""
    group = _tp_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    v_r = logits.shape[-1]
    return dict(group=group, vocab_start=rank * v_r, vocab_size=world * v_r, validate=False)


def vocab_parallel_log_probs_from_logits(logits, labels, *, group=None):
    """log p(labels) from vocab-sharded logits (..., V / tp): float32 (...),
    as verl's `-vocab_parallel_cross_entropy(logits, labels)`."""
    return vocab_parallel_logprobs(logits, labels, **_megatron_layout(logits, group))


def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor, *, group=None) -> torch.Tensor:
    """Entropy of softmax over the sharded vocabulary: (..., V / tp) -> float32 (...)."""
    logits = vocab_parallel_logits
    # the op also returns a log-prob; label 0 (on rank 0) costs one gathered element per row
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = vocab_parallel_logprobs(logits, labels, return_entropy=True, **_megatron_layout(logits, group))
    return entropy


def vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits: torch.Tensor, chunk_size: int = 2048, *, group=None
) -> torch.Tensor:
    """verl's memory-saving variant: the same entropy (chunk_size unused, the
    op never holds (chunk, V) temporaries)."""
    return vocab_parallel_entropy(vocab_parallel_logits, group=group)


def vocab_parallel_log_probs_from_logits_response_rmpad(
    input_ids, attention_mask, logits_rmpad, response_length, *, group=None
):
    """verl's padding-removed variant without flash-attn's pad / unpad:
    input_ids, attention_mask (B, S); logits_rmpad (total_nnz, V / tp) for
    the unmasked positions in row-major order; returns float32
    (B, response_length): the log-prob of each response token given the
    position before it."""
    batch_size, seqlen = input_ids.shape
    indices = torch.nonzero(attention_mask.reshape(-1), as_tuple=False).reshape(-1)
    ids_rmpad = input_ids.reshape(-1)[indices]
    labels = torch.roll(ids_rmpad, shifts=-1, dims=0)
    lp_rmpad = vocab_parallel_log_probs_from_logits(logits_rmpad, labels, group=group)
    full = lp_rmpad.new_zeros(batch_size * seqlen)
    full = full.index_put((indices,), lp_rmpad)  # out of place: gradients reach lp_rmpad
    return full.view(batch_size, seqlen)[:, -response_length - 1 : -1]


REPLACEMENTS = {
    "verl.utils.megatron.tensor_parallel": {
        "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
        "vocab_parallel_entropy": vocab_parallel_entropy,
        "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
        "vocab_parallel_log_probs_from_logits_response_rmpad": vocab_parallel_log_probs_from_logits_response_rmpad,
    },
    "verl.workers.engine.megatron.transformer_impl": {
        "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
        "vocab_parallel_entropy": vocab_parallel_entropy,
        "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    },
}
