"""Data parallelism under torchrun, through torch.distributed only.

Two modes, chosen by TrainConfig.parallel:
- "ddp": every rank holds the whole model; DistributedDataParallel all-reduces
  the gradients of the trained models (frozen ones are left alone).
- "fsdp2": every model is sharded with FSDP2's `fully_shard`: first each decoder
  layer (the classes HF lists in `_no_split_modules`), then the root. A rank
  holds 1/world of every weight, gradient and Adam moment; each layer's weights
  are all-gathered just before its forward/backward and freed after, so a
  model that does not fit one device trains on several. Frozen models (the
  reference policy, a learned reward model) are sharded the same way.

What FSDP2 asks of the loop, and where it is handled:
- every rank runs the same number of forwards (each one all-gathers):
  `generate(..., sync_group=...)` exits early only once every rank is done;
- a method that reads the weights outside `forward` (DPO's fused log-probs,
  models.register_fused_logprobs) is registered as an FSDP forward method by
  its user, after sharding; this module knows no model code;
- checkpoints hold full (unsharded) tensors gathered with
  torch.distributed.checkpoint.state_dict, so a checkpoint written by N ranks
  loads into 1 process or into M ranks alike.
"""

from __future__ import annotations

import torch
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp2")


def check_mode(mode: str) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    return mode


def is_sharded(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: every submodule whose class an HF model
    lists in `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def fsdp2_shard(model: nn.Module, mesh=None) -> nn.Module:
    """fully_shard each decoder layer, then the root (which keeps the
    embeddings, final norm and heads). In place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"parallel='fsdp2': found no decoder layers to shard in {type(model).__name__} "
            "(none of its modules lists _no_split_modules)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---------------------------------------------------------------- checkpoint adaptors


class ModelState:
    """state_dict adaptor: the full state dict of a sharded model (a collective:
    every rank calls it; rank 0 gets the tensors, on CPU), plain otherwise."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        if not is_sharded(self.model):
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        if not is_sharded(self.model):
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class OptimizerState:
    """The same for an optimizer over a sharded model's parameters: Adam's
    moments gathered to full tensors keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        if not is_sharded(self.model):
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def load_state_dict(self, state: dict) -> None:
        if not is_sharded(self.model):
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state, options=opts)
