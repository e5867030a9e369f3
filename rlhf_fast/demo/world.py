"""The demo's little world, all made in code: a word tokenizer, a synthetic
review corpus, a tiny Llama, and the hidden rule that plays the human rater.

Prompt:     <bos> the movie was            (3 determiners x 12 nouns x 4 verbs = 144 prompts)
Completion: "great ." | "very dull ." | "lovely and loud ." | "quite sad but fun ." then <eos>
Adjectives: 5 positive, 5 negative, 5 neutral, drawn uniformly in the SFT corpus,
so the SFT model writes a positive adjective about 1/3 of the time.
Hidden rule (the "rater"): the share of a completion's adjectives that are
positive (0 if it has none). It is never shown to the reward model or PPO;
they only see pairwise preferences between the SFT model's own samples.
"""

from __future__ import annotations

import random

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>"]
DETS = ["the", "my", "our"]
NOUNS = ["food", "movie", "trip", "book", "game", "song", "room", "class", "team", "show", "party", "view"]
VERBS = ["was", "is", "felt", "seemed"]
POSITIVE = ["good", "great", "lovely", "fun", "nice"]
NEGATIVE = ["bad", "awful", "dull", "sad", "poor"]
NEUTRAL = ["long", "short", "loud", "quiet", "odd"]
GLUE = ["very", "quite", "and", "but", "."]
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary."""

    def __init__(self, words):
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            words = ", ".join(w for w in self.vocab if w not in SPECIALS)
            raise ValueError(
                f"tiny-demo tokenizer: {text!r} has word(s) outside its vocabulary: {', '.join(map(repr, unknown))}; "
                f"it knows only these {len(self.vocab) - len(SPECIALS)}: {words}"
            )
        out = [self.bos_token_id] if bos else []
        out += [self.ids[w] for w in text.split()]
        return out + ([self.eos_token_id] if eos else [])

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_token_id:
                break
            if i in (self.pad_token_id, self.bos_token_id):
                continue
            words.append(self.vocab[i])
        return " ".join(words)


def make_tokenizer() -> WordTokenizer:
    return WordTokenizer(DETS + NOUNS + VERBS + ADJECTIVES + GLUE)


def all_prompts() -> list[str]:
    return [f"{d} {n} {v}" for d in DETS for n in NOUNS for v in VERBS]


def split_prompts(seed: int = 0, n_eval: int = 36):
    """(train, held_out) prompt texts; the held-out ones are never trained on."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[n_eval:], prompts[:n_eval]


def sample_completion(rng: random.Random) -> str:
    a, b = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    form = rng.randrange(4)
    if form == 0:
        return f"{a} ."
    if form == 1:
        return f"very {a} ."
    if form == 2:
        return f"{a} and {b} ."
    return f"quite {a} but {b} ."


def sft_corpus(prompts, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(prompts)} {sample_completion(rng)}" for _ in range(n)]


_POS, _ADJ = set(POSITIVE), set(ADJECTIVES)


def hidden_score_text(completion: str) -> float:
    """The rater: share of the completion's adjectives that are positive."""
    adj = [w for w in completion.split() if w in _ADJ]
    return sum(w in _POS for w in adj) / len(adj) if adj else 0.0


def hidden_score(tok: WordTokenizer, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """(N, P+R) token ids -> (N,) hidden-rule scores of the responses."""
    return torch.tensor([hidden_score_text(tok.decode(row[prompt_length:])) for row in sequences.tolist()])


def tiny_llama(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):
    """A ~0.1M-parameter LlamaForCausalLM built from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def encode_batch(tok: WordTokenizer, texts, *, eos: bool = False, pad_left: bool = False):
    """texts -> (ids (B, T), attention_mask (B, T)), padded with <pad>."""
    rows = [tok.encode(t, eos=eos) for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if pad_left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask
