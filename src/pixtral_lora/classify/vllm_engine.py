"""vLLM as the classify loop's engine (pip install vllm): every mode, on a Mistral-format export.

- `generate`: greedy chat completions, the prompt sent as OpenAI messages (`openai_messages`).
- `constrained`: the same, through a logits processor (`classify/vllm_constrain.py`) that walks the
  answer trie the transformers path walks: only a valid answer can come out.
- `score`: each class's answer appended to the image prompt's token ids, and vLLM's prompt
  log-probabilities summed over the answer's tokens (its `</s>` included): the log-likelihood
  `classify/score.py` computes with transformers. The image prefix is computed once per image, the
  other classes read it from vLLM's prefix cache.

Probabilities are those of the processed logits (`logprobs_mode="processed_logprobs"`): under the
constraint, renormalised over the allowed tokens, as transformers' `generate` scores them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pixtral_lora.classify.generate import AnswerEngine
from pixtral_lora.errors import UserError
from pixtral_lora.model.loading import VLLM_LORA_RANKS
from pixtral_lora.model.render import Renderer, prompt_messages

# The logits processor vLLM's engine process imports (FQCN: module:class).
CONSTRAIN_PROCESSOR = "pixtral_lora.classify.vllm_constrain:AnswerTrieProcessor"
# SamplingParams.extra_args keys the processor reads.
ANSWERS_KEY = "pixtral_lora_answers"
EOS_KEY = "pixtral_lora_eos"


def openai_messages(row: dict, images: list) -> list[dict]:
    """A conversation row as OpenAI chat messages, what vLLM's chat API takes.

    `images` are the row's images resized exactly as in training (`Renderer.load_images`), inlined
    as lossless PNG data URIs, so vLLM (which encodes with mistral_common under
    `--tokenizer-mode mistral`) sees the prompt the model was trained on; `tests/classify/test_evaluation.py`
    checks the token ids against our renderer's.
    """
    from pixtral_lora.data.images import encode_data_uri

    images = iter(images)
    out = []
    for message in prompt_messages(row):
        content = [
            {"type": "image_url", "image_url": {"url": encode_data_uri(next(images), fmt="PNG")}}
            if chunk["type"] == "image"
            else {"type": "text", "text": chunk["text"]}
            for chunk in message["content"]
        ]
        if message["role"] != "user":
            content = "".join(chunk["text"] for chunk in content)
        out.append({"role": message["role"], "content": content})
    return out


def _probability(logprob: float | None) -> float | None:
    return math.exp(logprob) if logprob is not None and math.isfinite(logprob) else None


class VllmEngine(AnswerEngine):
    """Answers from vLLM serving a Mistral-format checkpoint (convert_to_mistral.py's output), with
    `lora_dir` (an --adapter-only export) applied as LoRA when given, all of it (projector and vision
    tower included). One engine answers every mode (the constraint applies only to requests that
    carry the answers); the classify loop hands it the rows it could read."""

    modes = ("generate", "constrained", "score")

    def __init__(
        self,
        model_dir: str | Path,
        max_images: int,
        dtype: str = "auto",
        lora_dir: str | Path | None = None,
    ):
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as err:
            raise UserError("the vLLM backend needs vllm (pip install vllm) and a CUDA GPU") from err
        engine: dict = {
            "logprobs_mode": "processed_logprobs",
            "logits_processors": [CONSTRAIN_PROCESSOR],  # constrained mode's requests only
            "enable_prefix_caching": True,  # score mode: an image's prefix, computed once for its classes
        }
        self._request = None
        if lora_dir is not None:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(lora_dir) / "adapter_config.json").read_text(encoding="utf-8"))["r"]
            engine |= {
                "enable_lora": True,
                "enable_tower_connector_lora": True,  # else the projector's and tower's LoRA is dropped
                "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= rank),
            }
            self._request = LoRARequest("adapter", 1, str(Path(lora_dir).resolve()))
        self._llm = LLM(
            model=str(model_dir),
            tokenizer_mode="mistral",
            config_format="mistral",
            load_format="mistral",
            dtype=dtype,  # the run's: vLLM on a CPU would otherwise run a float32 model in bfloat16
            limit_mm_per_prompt={"image": max(max_images, 1)},
            **engine,
        )
        self._sampling, self._tokens_prompt = SamplingParams, TokensPrompt

    def answers(
        self,
        renderer: Renderer,
        rows: list[dict],
        images: list[list],
        max_new_tokens: int,
        candidates: dict[str, list[int]] | None = None,
    ) -> tuple[list[str], list[float | None]]:
        extra = None
        if candidates is not None:
            extra = {ANSWERS_KEY: candidates, EOS_KEY: renderer.tokenizer.eos_token_id}
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens, logprobs=0, extra_args=extra)
        messages = [openai_messages(row, loaded) for row, loaded in zip(rows, images, strict=True)]
        outputs = self._llm.chat(messages, params, use_tqdm=False, lora_request=self._request)
        return (
            [output.outputs[0].text for output in outputs],
            [_probability(output.outputs[0].cumulative_logprob) for output in outputs],
        )

    def scores(
        self, renderer: Renderer, rows: list[dict], images: list[list], candidates: dict[str, list[int]]
    ) -> list[dict[str, float]]:
        answers = list(candidates.values())
        prompts = []
        for row, loaded in zip(rows, images, strict=True):
            ids = renderer.prompt_ids(prompt_messages(row), loaded)[0]  # mistral_common's tokens (tested)
            prompts.append(
                [
                    self._tokens_prompt(prompt_token_ids=[*ids, *a], multi_modal_data={"image": loaded})
                    for a in answers
                ]
            )
        # The first class of each image computes its whole prompt into the prefix cache; the others
        # then read the image prefix from it. vLLM skips reading the cache for prompt log-probabilities
        # by default; read anyway, a cached position's log-probability is not computed, so a request
        # whose cache reached into its answer is run again without it. (detokenize=False: vLLM 0.32
        # fails decoding the log-probabilities of cached positions.)
        computed = self._prompt_logprobs([p[0] for p in prompts], read_cache=False)
        rest = self._prompt_logprobs([q for p in prompts for q in p[1:]], read_cache=True)
        by_row = [
            [computed[i], *rest[i * (len(answers) - 1) : (i + 1) * (len(answers) - 1)]]
            for i in range(len(rows))
        ]
        again = [(i, c) for i, outputs in enumerate(by_row) for c, out in enumerate(outputs)
                 if len(out.prompt_token_ids) - (out.num_cached_tokens or 0) < len(answers[c])]  # fmt: skip
        for (i, c), out in zip(
            again, self._prompt_logprobs([prompts[i][c] for i, c in again], False), strict=True
        ):
            by_row[i][c] = out
        scored = []
        for outputs in by_row:
            row_scores = {}
            for (name, answer), output in zip(candidates.items(), outputs, strict=True):
                positions = output.prompt_logprobs[-len(answer) :]
                row_scores[name] = sum(
                    logprobs[token].logprob for logprobs, token in zip(positions, answer, strict=True)
                )
            scored.append(row_scores)
        return scored

    def _prompt_logprobs(self, prompts: list, read_cache: bool) -> list:
        if not prompts:
            return []
        params = self._sampling(
            temperature=0.0,
            max_tokens=1,
            prompt_logprobs=0,
            skip_reading_prefix_cache=not read_cache,
            detokenize=False,
        )
        return self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._request)
