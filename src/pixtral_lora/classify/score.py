"""Score mode, batched: the log-likelihood of every class's answer for several images at once.

Every candidate answer is the same text up to the label (```` ```json\\n{"label": " ````): those tokens are
appended to each prompt and scored in the one batched prompt forward (left-padded, positions from the
mask). The rest of every candidate (label, closing, `</s>`) is packed into one sequence per image
after its prompt, with a block attention mask: each candidate's tokens see the prompt and their own
earlier tokens only, and restart at the same position, so no prompt cache is copied per class. The
language-model head runs over the packed positions in chunks, keeping only each position's
log-normaliser and its target logit, never a (positions x 131k) tensor.

The result equals scoring each candidate with its own full forward pass (`tests/classify/test_scoring.py`).
"""

from __future__ import annotations

import functools
import inspect

import torch

# Packed positions whose 131k-way log-normaliser is computed at once (memory: chunk x vocab floats).
_HEAD_CHUNK = 64


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    prefix = []
    for tokens in zip(*sequences, strict=False):
        if any(token != tokens[0] for token in tokens):
            break
        prefix.append(tokens[0])
    return prefix


def _shared_prefix(sequences: list[list[int]]) -> list[int]:
    """The tokens every candidate starts with, short of the last when one candidate is all prefix."""
    prefix = _common_prefix(sequences)
    if any(len(s) == len(prefix) for s in sequences):  # one candidate is a prefix of another: no branch
        prefix = prefix[:-1]
    return prefix


def score_positions(candidates: dict[str, list[int]]) -> dict:
    """Positions per image that score mode projects onto the vocabulary (its cost on a model whose LM
    head dominates), against the mean answer length free generation projects; for benchmarks."""
    sequences = list(candidates.values())
    prefix = _shared_prefix(sequences)
    contexts = [tuple(s[len(prefix) : k + 1]) for s in sequences for k in range(len(prefix), len(s) - 1)]
    return {
        "shared_prefix": len(prefix),
        "packed": len(contexts),
        "packed_distinct_contexts": len(set(contexts)),
        "score": len(prefix) + 1 + len(contexts),
        "generate_mean": sum(map(len, sequences)) / len(sequences),
    }


@functools.cache
def _cache_argument() -> str:
    """The prompt cache's name in the installed transformers: `cache` (5.2x on; the old name warns
    and goes in 5.40) or `past_key_values` (5.17, a GPU image's)."""
    from transformers import LlavaForConditionalGeneration

    parameters = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _head_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each hidden state (n, width) -> (n,), the LM head applied in chunks."""
    head = model.get_output_embeddings()
    out = []
    for start in range(0, hidden.shape[0], _HEAD_CHUNK):
        logits = head(hidden[start : start + _HEAD_CHUNK]).float()
        chosen = logits.gather(1, targets[start : start + _HEAD_CHUNK, None])[:, 0]
        out.append(chosen - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


def score_batch(model, inputs: dict, candidates: dict[str, list[int]]) -> list[dict[str, float]]:
    """Log-likelihood of each candidate (token ids, answer then </s>) after each prompt of the batch.

    inputs: the left-padded prompt batch (`input_ids`, `attention_mask`, and the images'
    `pixel_values`/`image_sizes`) on the model's device.
    """
    names = list(candidates)
    sequences = [candidates[name] for name in names]
    prefix = _shared_prefix(sequences)
    device = inputs["input_ids"].device
    batch = inputs["input_ids"].shape[0]
    prefix_ids = torch.tensor(prefix, dtype=torch.long, device=device).expand(batch, -1)
    input_ids = torch.cat([inputs["input_ids"], prefix_ids], 1)
    attention = torch.cat([inputs["attention_mask"], torch.ones_like(prefix_ids)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        # 1. prompt + shared prefix: the prefix's tokens and the first token after it are scored here
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=len(prefix) + 1,
            **extra,
        )
        log_probs = torch.log_softmax(out.logits.float(), -1)  # (batch, prefix + 1, vocab)
        prefix_score = torch.zeros(batch, device=device)
        for k, token in enumerate(prefix):
            prefix_score += log_probs[:, k, token]
        first = log_probs[:, len(prefix)]  # predicts every candidate's first own token
        # 2. the candidates' own tokens, packed: candidate c feeds rest_c[:-1] to predict rest_c[1:]
        rests = [s[len(prefix) :] for s in sequences]
        fed = [(c, j, rest[j]) for c, rest in enumerate(rests) for j in range(len(rest) - 1)]
        scores = prefix_score[:, None] + torch.stack([first[:, rest[0]] for rest in rests], 1)  # (batch, C)
        if fed:
            packed = torch.tensor([token for _, _, token in fed], device=device).expand(batch, -1)
            owner = torch.tensor([c for c, _, _ in fed], device=device)
            offset = torch.tensor([j for _, j, _ in fed], device=device)
            start = attention.sum(-1, keepdim=True)  # each image's first position after the prefix
            packed_positions = start + offset[None, :]
            sees = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # (S, S)
            allowed = torch.cat(
                [attention[:, None, :].bool().expand(-1, len(fed), -1), sees.expand(batch, -1, -1)], -1
            )
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
            out = model(
                input_ids=packed,
                attention_mask=mask[:, None],
                position_ids=packed_positions,
                **{_cache_argument(): getattr(out, _cache_argument())},
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=True,
            )
            hidden = out.hidden_states[-1]  # (batch, S, width), after the final norm
            targets = torch.tensor([rests[c][j + 1] for c, j, _ in fed], device=device)
            token_scores = _head_log_probs(
                model, hidden.reshape(-1, hidden.shape[-1]), targets.repeat(batch)
            ).view(batch, -1)
            scores = scores.index_add(1, owner, token_scores)
    return [{name: float(scores[b, c]) for c, name in enumerate(names)} for b in range(batch)]
