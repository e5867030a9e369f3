"""One module per op family: validation, backend dispatch, autograd and
register_fake. Importing this package registers every op with torch.library."""
from .logprobs import logprobs_from_logits
from .linear_logprobs import linear_logprobs

__all__ = ["logprobs_from_logits", "linear_logprobs"]
