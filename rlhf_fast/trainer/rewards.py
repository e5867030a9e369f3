"""Reward functions and reward models written for TRL, as an rlhf_fast reward.

rlhf_fast's trainers score token ids: reward(sequences, response_mask,
prompt_length) -> (N,). TRL's GRPOTrainer scores text, and `TextRewards`
adapts one to the other, calling each reward the way TRL 1.16 does
(trl/trainer/grpo_trainer.py, `_calculate_rewards`):

  - a function: fn(prompts=..., completions=..., completion_ids=...,
    trainer_state=..., log_extra=..., log_metric=..., **dataset columns)
    -> list of float or None, one per completion. prompts are the dataset's
    "prompt" values (text or messages), repeated for each of the n samples;
    completions are the decoded responses (skip_special_tokens=True), or
    [{"role": "assistant", "content": text}] for conversational prompts;
    completion_ids are the response token ids up to and including EOS.
    None becomes NaN. `async def` functions are run to completion.
  - a Hugging Face sequence-classification model (instance, or a path loaded
    with AutoModelForSequenceClassification(num_labels=1)): prompt + completion
    text (the chat template for messages) tokenised with the model's own
    tokenizer, right-padded, without special tokens; the score is logits[:, 0].

Several rewards are combined as TRL's default "sum_then_normalize": the
weighted sum over the rewards that are not NaN; a completion that every
reward left as None is NaN, which the trainer zero-weights.
Everything that can be checked is checked at construction, before the
first rollout: a function's signature against the keywords it will get, a
model's type, the weights' count.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import types

import torch
from torch import nn

from .data import is_conversational

OP = "rlhf_fast.trainer.TextRewards"
EXPECTED_FN = "fn(prompts, completions, **kwargs) -> list[float | None]"
EXPECTED_MODEL = "a transformers AutoModelForSequenceClassification (num_labels=1) or a path to one"
_TOKEN_REWARD_ARGS = ("sequences", "response_mask", "prompt_length")  # rlhf_fast's own reward fn


class RewardError(RuntimeError):
    """A reward function raised: the message names the function and its
    error in one line; the original exception (and its traceback) is chained."""


def reward_error(fn, e: Exception) -> RewardError:
    """The RewardError for fn having raised e (raise it `from e`)."""
    if isinstance(e, RewardError):
        return e
    text = " ".join(str(e).split())
    return RewardError(f"reward function {_name(fn)!r} raised {type(e).__name__}" + (f": {text}" if text else ""))


def _name(r) -> str:
    if isinstance(r, nn.Module):
        return (getattr(getattr(r, "config", None), "_name_or_path", "") or type(r).__name__).split("/")[-1]
    return getattr(r, "__name__", None) or type(r).__name__


def _check_model(model, i: int) -> None:
    cls = type(model).__name__
    if not cls.endswith("ForSequenceClassification"):
        hint = ""
        if cls.endswith("ForCausalLM"):
            hint = " (a causal LM scores no sequences; load the reward model with AutoModelForSequenceClassification)"
        elif cls == "ScalarHeadModel":
            hint = " (an rlhf_fast ScalarHeadModel scores token ids: give it to rlhf_fast.trainer.GRPOTrainer directly)"
        raise TypeError(f"{OP}: reward_funcs[{i}] is a {cls}; expected {EXPECTED_MODEL}, or {EXPECTED_FN}{hint}")
    if getattr(model.config, "num_labels", 1) < 1:
        raise TypeError(f"{OP}: reward_funcs[{i}] ({cls}) has num_labels={model.config.num_labels}; expected >= 1")


def _check_signature(fn, i: int, keywords: list[str]) -> None:
    if not callable(fn):
        raise TypeError(f"{OP}: reward_funcs[{i}] is a {type(fn).__name__}; expected {EXPECTED_FN} or {EXPECTED_MODEL}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: checked at the first call
        return
    try:
        sig.bind(**{k: None for k in keywords})
    except TypeError as e:
        params = list(sig.parameters)
        P = inspect.Parameter
        kinds = {n: p.kind for n, p in sig.parameters.items()}
        never = [
            n
            for n, p in sig.parameters.items()
            if p.default is P.empty and n not in keywords and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
        ]
        takes_any = P.VAR_KEYWORD in kinds.values()
        refused = [] if takes_any else [k for k in keywords if k not in kinds or kinds[k] == P.POSITIONAL_ONLY]
        why = "; ".join(
            x
            for x in (
                f"it requires {', '.join(never)}, which are never passed" if never else "",
                f"it does not accept {', '.join(refused)} (add **kwargs)" if refused else "",
            )
            if x
        )
        why = why or str(e)
        hint = ""
        if params[:3] == list(_TOKEN_REWARD_ARGS):
            hint = (
                " It looks like rlhf_fast's token-level reward fn(sequences, response_mask, prompt_length): "
                "give that one to rlhf_fast.trainer.GRPOTrainer directly."
            )
        raise TypeError(
            f"{OP}: reward function {_name(fn)!r}{sig} cannot be called TRL's way: {why}. Expected {EXPECTED_FN}; "
            f"it is called with the keyword arguments {', '.join(keywords)}.{hint}"
        ) from None


class TextRewards:
    """A reward(sequences, response_mask, prompt_length) -> (N,) fp32 made of
    TRL-style reward functions and HF sequence-classification models.

    reward_funcs: one or a list of functions / models / model paths.
    tokenizer: the policy's tokenizer (decodes the completions).
    rows: the prompt dataset's rows (dicts with "prompt" and any other columns,
        as data.load_prompt_rows returns them).
    num_samples: completions per prompt (rows of a batch are prompt-major).
    reward_weights: one float per reward (default all 1).
    reward_processing_classes: per model, its tokenizer (default: loaded from
        the model's path with AutoTokenizer); ignored for functions.
    Call set_batch(prompt_index) before each scoring with the dataset row of
    each prompt in the batch; the trainer in rlhf_fast.trl does this."""

    def __init__(
        self,
        reward_funcs,
        tokenizer,
        rows: list[dict],
        num_samples: int,
        *,
        reward_weights=None,
        reward_processing_classes=None,
        chat_template_kwargs: dict | None = None,
    ):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError(
                f"{OP}: no reward functions given; expected at least one {EXPECTED_FN} or {EXPECTED_MODEL}"
            )
        procs = reward_processing_classes
        procs = list(procs) if isinstance(procs, (list, tuple)) else [procs] * len(funcs)
        if len(procs) != len(funcs):
            raise ValueError(f"{OP}: {len(procs)} reward_processing_classes for {len(funcs)} reward functions")
        self.columns = sorted({k for r in rows for k in r} - {"prompt", "completion", "completion_ids"})
        keywords = ["prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"]
        keywords += self.columns
        self.funcs, self.tokenizers = [], []
        for i, (f, proc) in enumerate(zip(funcs, procs)):
            if isinstance(f, str):
                f, proc = _load_reward_model(f, proc, i)
            if isinstance(f, nn.Module):
                _check_model(f, i)
                if proc is None:
                    proc = _load_tokenizer(f, i)
                f.eval().requires_grad_(False)
            else:
                _check_signature(f, i, keywords)
                proc = None
            self.funcs.append(f)
            self.tokenizers.append(proc)
        self.names = [_name(f) for f in self.funcs]
        w = [1.0] * len(self.funcs) if reward_weights is None else [float(x) for x in reward_weights]
        if len(w) != len(self.funcs):
            raise ValueError(
                f"{OP}: {len(w)} reward_weights for {len(self.funcs)} reward functions; give one per reward"
            )
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"{OP}: reward_weights must be finite, got {w}")
        self.weights = torch.tensor(w, dtype=torch.float32)
        self.tokenizer, self.rows, self.n = tokenizer, rows, int(num_samples)
        self.chat_kw = dict(chat_template_kwargs or {})
        self.trainer_state = types.SimpleNamespace(global_step=0, max_steps=0)
        self.prompt_index: list[int] | None = None
        self.expected: torch.Tensor | None = None
        self.metrics: dict = {}
        self.extra_logs: dict = {}

    def set_batch(self, prompt_index, expected_prompt_ids: torch.Tensor | None = None) -> None:
        """prompt_index: the dataset row of each prompt of the next batch.
        expected_prompt_ids (B, P): those prompts' tokens, checked against the
        scored sequences so that a mismatch fails instead of mis-scoring."""
        self.prompt_index = [int(i) for i in prompt_index]
        self.expected = expected_prompt_ids

    def _log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def _log_extra(self, column: str, values: list) -> None:
        self.extra_logs[column] = list(values)

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, response_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        if self.prompt_index is None or len(self.prompt_index) * self.n != sequences.shape[0]:
            raise RuntimeError(
                f"{OP}: set_batch(prompt_index) must name the dataset row of each of the "
                f"{sequences.shape[0] // max(self.n, 1)} prompts before scoring"
            )
        if self.expected is not None:
            got = sequences[:: self.n, :prompt_length]
            if got.shape != self.expected.shape or not torch.equal(got, self.expected.to(got.device)):
                raise RuntimeError(
                    f"{OP}: the scored prompts are not the ones set_batch named; the trainer's prompt "
                    "rows and the rollout disagree"
                )
        rows = [self.rows[self.prompt_index[r // self.n]] for r in range(sequences.shape[0])]
        prompts = [r["prompt"] for r in rows]
        resp, m = sequences[:, prompt_length:].cpu(), response_mask.cpu()
        completion_ids = [resp[i][m[i]].tolist() for i in range(resp.shape[0])]
        if hasattr(self.tokenizer, "batch_decode"):
            texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        else:  # the demo's word tokenizer: decode() already drops <bos>, <pad> and stops at <eos>
            texts = [self.tokenizer.decode(ids) for ids in completion_ids]
        chat = is_conversational(prompts[0])
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        kwargs = {k: [r.get(k) for r in rows] for k in self.columns}
        kwargs.update(trainer_state=self.trainer_state, log_extra=self._log_extra, log_metric=self._log_metric)
        N = len(prompts)
        per_func = torch.full((N, len(self.funcs)), float("nan"))
        for j, (f, tok) in enumerate(zip(self.funcs, self.tokenizers)):
            if isinstance(f, nn.Module):
                per_func[:, j] = self._model_scores(f, tok, prompts, completions, chat)
            else:
                per_func[:, j] = self._fn_scores(j, f, prompts, completions, completion_ids, kwargs)
        for j, name in enumerate(self.names):
            col = per_func[:, j]
            ok = ~col.isnan()
            self.metrics[f"rewards/{name}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
        unscorable = per_func.isnan().all(-1)
        total = (per_func * self.weights).nansum(-1)
        return total.masked_fill(unscorable, float("nan"))

    def _fn_scores(self, j, f, prompts, completions, completion_ids, kwargs) -> torch.Tensor:
        try:
            out = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if inspect.isawaitable(out):
                out = asyncio.run(_await(out))
        except Exception as e:
            raise reward_error(f, e) from e
        try:
            out = list(out)
        except TypeError:
            raise TypeError(
                f"{OP}: reward function {self.names[j]!r} returned a {type(out).__name__}; expected "
                f"a list of {len(prompts)} floats (or None), one per completion"
            ) from None
        if len(out) != len(prompts):
            raise ValueError(
                f"{OP}: reward function {self.names[j]!r} returned {len(out)} rewards for "
                f"{len(prompts)} completions; expected one per completion"
            )
        vals = []
        for i, v in enumerate(out):
            if v is None:
                vals.append(float("nan"))
                continue
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                raise TypeError(
                    f"{OP}: reward function {self.names[j]!r} returned {v!r} for completion {i}; "
                    "expected a float or None"
                ) from None
        return torch.tensor(vals, dtype=torch.float32)

    def _model_scores(self, model, tok, prompts, completions, chat) -> torch.Tensor:
        if chat:
            texts = [
                tok.apply_chat_template(p + c, tokenize=False, **self.chat_kw) for p, c in zip(prompts, completions)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        seqs = tok(texts, add_special_tokens=False)["input_ids"]
        T = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), T), int(pad if pad is not None else 0), dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):  # right-padded, as TRL does
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        device = next(model.parameters()).device
        # HF's sequence-classification heads find each row's last token as the
        # last one != config.pad_token_id: it must be this tokenizer's pad id.
        # Set for the call only, so the caller's model is left as it was.
        cfg = model.config
        saved = cfg.pad_token_id
        cfg.pad_token_id = pad
        try:
            was = model.training
            model.eval()
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            model.train(was)
        finally:
            cfg.pad_token_id = saved
        return logits[:, 0].float().cpu()


async def _await(x):
    return await x


def _load_reward_model(path: str, proc, i: int):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    except Exception as e:
        raise ValueError(
            f"{OP}: reward_funcs[{i}] = {path!r} could not be loaded as {EXPECTED_MODEL}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return model, proc


def _load_tokenizer(model, i: int):
    from transformers import AutoTokenizer

    path = getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        raise ValueError(
            f"{OP}: reward_funcs[{i}] ({type(model).__name__}) has no tokenizer at {path!r}; pass its "
            "tokenizer in reward_processing_classes"
        ) from None


def check_token_reward(reward) -> None:
    """What PPOTrainer / GRPOTrainer take as `reward`, checked when they are
    built: a ScalarHeadModel, a TextRewards, or fn(sequences, response_mask,
    prompt_length) -> (N,). Raises TypeError naming what was expected."""
    from .models import ScalarHeadModel

    expected = (
        "a ScalarHeadModel, fn(sequences, response_mask, prompt_length) -> (N,) scores, or a "
        "rlhf_fast.trainer.rewards.TextRewards"
    )
    if isinstance(reward, (ScalarHeadModel, TextRewards)):
        return
    cls = type(reward).__name__
    if isinstance(reward, nn.Module) and cls.endswith(("ForSequenceClassification", "ForCausalLM")):
        hint = ""
        if cls.endswith("ForSequenceClassification"):
            hint = (
                "; a Hugging Face reward model scores text: wrap it in TextRewards([model], tokenizer, rows, n) "
                "or use rlhf_fast.trl.GRPOTrainer"
            )
        raise TypeError(f"reward is a {cls}; expected {expected}{hint}")
    if not callable(reward):
        raise TypeError(f"reward is a {type(reward).__name__}; expected {expected}")
    try:
        sig = inspect.signature(reward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None, None)
    except TypeError:
        hint = ""
        if {"prompts", "completions"} & set(sig.parameters):
            hint = (
                "; it looks like a TRL reward function on text: wrap it in TextRewards([fn], tokenizer, rows, n) "
                "or use rlhf_fast.trl.GRPOTrainer"
            )
        raise TypeError(
            f"reward function {_name(reward)!r}{sig} cannot be called as reward(sequences, "
            f"response_mask, prompt_length); expected {expected}{hint}"
        ) from None
