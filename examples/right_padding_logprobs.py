"""Why rlhf_fast.generate warns on right-padded prompts: the log-probs it
returns vs the trainer's forward over the same sequences (response_logprobs),
left- vs right-padded prompts, on a tiny random Llama built in code.

    PYTHONPATH=. python examples/right_padding_logprobs.py   (from the repository root)
"""

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_fast
from rlhf_fast.trainer.models import response_logprobs

warnings.simplefilter("ignore")  # the right-padding warning is the point of this script
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
model = LlamaForCausalLM(cfg).eval()
B, P, R = 8, 9, 12
ids = torch.randint(3, 97, (B, P), generator=torch.Generator().manual_seed(0))
lengths = torch.tensor([9, 6, 4, 9, 2, 7, 5, 3])
col = torch.arange(P)
for side in ("left", "right"):
    mask = ((col[None] >= P - lengths[:, None]) if side == "left" else (col[None] < lengths[:, None])).long()
    out = rlhf_fast.generate(
        model,
        ids.masked_fill(mask == 0, 0),
        mask,
        max_new_tokens=R,
        eos_token_id=None,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(1),
    )
    attn = torch.cat([mask, out.response_mask.long()], 1)
    with torch.no_grad():
        lp, _ = response_logprobs(model, out.sequences, attn, out.response_mask, P)
    print(f"{side}-padded: max |generate log-prob - trainer log-prob| = {float((lp - out.logprobs).abs().max()):.2g}")
