"""Constrained mode inside vLLM's engine: the answer trie as a per-request logits processor.

vLLM's engine process imports this module by name (`vllm_engine.CONSTRAIN_PROCESSOR`); it needs vllm.
A request carries its valid answers' token ids in `SamplingParams.extra_args`; every other request
passes untouched. At each step only the tokens the trie allows after what was generated keep their
logits, and `</s>` once an answer is complete: the rule transformers' `prefix_allowed_tokens_fn`
applies in `classify/generate.py`.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from pixtral_lora.classify.vllm_engine import ANSWERS_KEY, EOS_KEY
from pixtral_lora.task.answers import AnswerTrie


class AnswerTrieProcessor(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is greedy's

    def new_req_logits_processor(self, params):
        extra = params.extra_args or {}
        if ANSWERS_KEY not in extra:
            return None
        trie, eos = AnswerTrie(extra[ANSWERS_KEY]), extra[EOS_KEY]

        def constrain(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            allowed = torch.tensor(trie.allowed(list(output_ids)) or [eos], device=logits.device)
            kept = torch.full_like(logits, float("-inf"))
            kept[allowed] = logits[allowed]
            return kept

        return constrain
