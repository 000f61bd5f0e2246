"""Evaluation: the held-out split of a run, base model and fine-tuned model side by side.

Three modes, each reported separately:

- `generate`: greedy decoding of a free answer, parsed by `answers.AnswerParser` (what the study did).
- `constrained`: greedy decoding through a prefix tree of the valid answers (HF `generate`'s
  `prefix_allowed_tokens_fn`), so only a class from the set can come out: zero hallucinations by
  construction.
- `score`: every class answer is scored by its log-likelihood given the image (the prompt is encoded
  once and its KV cache shared by all candidates); the argmax is the prediction and the softmax over
  classes a confidence per image (its calibration, ECE, is in the report).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pixtral_lora.answers import AnswerParser
from pixtral_lora.metrics import (
    classification_report,
    expected_calibration_error,
    outcome,
    plot_confusion,
    write_confusion_csv,
)
from pixtral_lora.prompt import PromptConfig
from pixtral_lora.render import Renderer, pad_batch, prompt_messages

logger = logging.getLogger(__name__)

MODES = ("generate", "constrained", "score")


@dataclass
class Prediction:
    id: str
    gold: str
    raw_answer: str
    raw_label: str | None
    label: str | None
    confidence: float | None = None

    def as_dict(self, model: str, mode: str) -> dict:
        return {
            "id": self.id,
            "model": model,
            "mode": mode,
            "gold": self.gold,
            "raw_answer": self.raw_answer,
            "raw_label": self.raw_label,
            "label": self.label,
            "confidence": self.confidence,
            "outcome": outcome(self.gold, self.label, self.raw_label),
        }


# ---------------------------------------------------------------------------------------------------
# Models


def load_eval_model(
    base: str, adapter: str | Path | None = None, quantization: str | None = None, dtype: str = "auto"
):
    """The base model, with a LoRA adapter applied when given; in eval mode."""
    from pixtral_lora.modeling import load_model

    model = load_model(base, quantization=quantization, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return model


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------
# Answers as token sequences


class AnswerTrie:
    """Prefix tree over the token ids of every valid answer (answer text + </s>)."""

    def __init__(self, sequences: dict[str, list[int]]):
        self.sequences = sequences
        self.root: dict = {}
        for label, ids in sequences.items():
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[None] = label  # leaf marker

    def allowed(self, generated: list[int]) -> list[int]:
        """Tokens that may follow `generated`; empty when it is a complete answer or left the tree."""
        node = self.root
        for token in generated:
            if token not in node:
                return []
            node = node[token]
        return [token for token in node if token is not None]


def answer_token_ids(tokenizer, prompt: PromptConfig, class_names: list[str]) -> dict[str, list[int]]:
    """Token ids each class's answer is trained as (answer text then </s>), as the renderer produces them."""
    return {
        name: tokenizer(prompt.answer(name), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for name in class_names
    }


# ---------------------------------------------------------------------------------------------------
# Batched inference


def _batch_inputs(model, renderer: Renderer, rows: list[dict]) -> dict:
    """Left-padded prompt ids of the rows and their images, on the model's device and dtype."""
    prompts, images = [], []
    for row in rows:
        loaded = renderer.load_images(row["images"])
        prompts.append(renderer.prompt_ids(prompt_messages(row), loaded)[0])
        images.extend(loaded)
    batch = pad_batch(prompts, renderer.pad_token_id, side="left")
    if images:
        pixel_inputs = renderer.processor.image_processor(images, return_tensors="pt")
        batch["pixel_values"] = pixel_inputs["pixel_values"].to(getattr(model, "dtype", torch.float32))
        batch["image_sizes"] = pixel_inputs["image_sizes"]
    device = _device_of(model)
    return {key: value.to(device) for key, value in batch.items()}


def generate_answers(
    model, renderer: Renderer, rows: list[dict], max_new_tokens: int, trie: AnswerTrie | None = None
) -> list[str]:
    """Greedy answers for one batch of conversation rows (prompts left-padded)."""
    inputs = _batch_inputs(model, renderer, rows)
    width = inputs["input_ids"].shape[1]
    eos = renderer.tokenizer.eos_token_id
    kwargs = {}
    if trie is not None:

        def allowed(batch_id, input_ids):
            tokens = trie.allowed(input_ids[width:].tolist())
            return tokens or [eos]

        kwargs["prefix_allowed_tokens_fn"] = allowed
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=renderer.pad_token_id,
            **kwargs,
        )
    return [renderer.tokenizer.decode(seq[width:], skip_special_tokens=True) for seq in output]


def score_answers(model, renderer: Renderer, row: dict, candidates: dict[str, list[int]]) -> dict[str, float]:
    """Log-likelihood of each candidate answer given one image prompt; the prompt is encoded once."""
    device = _device_of(model)
    inputs = _batch_inputs(model, renderer, [row])
    names = list(candidates)
    with torch.inference_mode():
        prompt_out = model(**inputs, use_cache=True, logits_to_keep=1)
        first_logprobs = torch.log_softmax(
            prompt_out.logits[0, -1].float(), -1
        )  # predicts the 1st answer token
        cache = prompt_out.past_key_values
        cache.batch_repeat_interleave(len(names))
        lengths = [len(candidates[n]) for n in names]
        longest = max(lengths)
        ids = torch.full((len(names), longest), renderer.pad_token_id, dtype=torch.long, device=device)
        for i, name in enumerate(names):
            ids[i, : lengths[i]] = torch.tensor(candidates[name], device=device)
        prompt_mask = inputs["attention_mask"].repeat(len(names), 1)
        cand_mask = (
            torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        ).long()
        out = model(
            input_ids=ids, attention_mask=torch.cat([prompt_mask, cand_mask], 1), cache=cache, use_cache=True
        )
        logprobs = torch.log_softmax(out.logits.float(), -1)
    scores = {}
    for i, name in enumerate(names):
        seq = candidates[name]
        total = first_logprobs[seq[0]].item()
        for t in range(1, len(seq)):
            total += logprobs[i, t - 1, seq[t]].item()
        scores[name] = total
    return scores


# ---------------------------------------------------------------------------------------------------
# Evaluation of one model in one mode


def parsed_predictions(rows: list[dict], answers: list[str], parser: AnswerParser) -> list[Prediction]:
    """One Prediction per (row, free answer), the label read by `parser`."""
    predictions = []
    for row, answer in zip(rows, answers, strict=True):
        parsed = parser.parse(answer)
        predictions.append(Prediction(row["id"], row["label"], answer, parsed.raw_label, parsed.label))
    return predictions


def predict_rows(
    model,
    renderer: Renderer,
    rows,
    class_names: list[str],
    prompt: PromptConfig,
    mode: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    strict: bool = False,
    desc: str = "",
) -> tuple[list[Prediction], float]:
    """Predictions for every row (none dropped) and the throughput in images/s."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parser = AnswerParser(class_names, strict=strict)
    candidates = answer_token_ids(renderer.tokenizer, prompt, class_names)
    trie = AnswerTrie(candidates) if mode == "constrained" else None
    rows = list(rows)
    predictions: list[Prediction] = []
    start = time.perf_counter()
    step = 1 if mode == "score" else batch_size
    for begin in tqdm(range(0, len(rows), step), desc=desc or mode, unit="batch" if step > 1 else "img"):
        chunk = rows[begin : begin + step]
        if mode == "score":
            scores = score_answers(model, renderer, chunk[0], candidates)
            values = torch.tensor(list(scores.values()))
            probs = torch.softmax(values, 0)
            best = int(values.argmax())
            label = list(scores)[best]
            predictions.append(
                Prediction(
                    chunk[0]["id"], chunk[0]["label"], prompt.answer(label), label, label, float(probs[best])
                )
            )
            continue
        answers = generate_answers(model, renderer, chunk, max_new_tokens, trie)
        predictions += parsed_predictions(chunk, answers, parser)
    elapsed = time.perf_counter() - start
    if len(predictions) != len(rows):
        raise AssertionError(f"{len(rows) - len(predictions)} test items lost")
    return predictions, len(rows) / elapsed if elapsed > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------
# Reports


def summarise(predictions: list[Prediction], class_names: list[str]):
    report = classification_report(
        [p.gold for p in predictions],
        [p.label for p in predictions],
        [p.raw_label for p in predictions],
        class_names,
    )
    if predictions and all(p.confidence is not None for p in predictions):
        confidences = [p.confidence for p in predictions]
        report.mean_confidence = float(sum(confidences) / len(confidences))
        report.calibration_ece = expected_calibration_error(
            confidences, [p.label == p.gold for p in predictions]
        )
    return report


def write_report(out_dir: Path, results: dict, class_names: list[str], predictions: dict) -> None:
    """report.json, report.md, predictions.jsonl, confusion_<model>[_<mode>].csv/png."""
    from pixtral_lora.io import atomic_file, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "report.json",
        {
            "class_names": class_names,
            "results": {
                k: {
                    m: r["report"].as_dict() | {"images_per_second": r["images_per_second"]}
                    for m, r in v.items()
                }
                for k, v in results.items()
            },
        },
    )
    with atomic_file(out_dir / "predictions.jsonl") as handle:
        for (model_name, mode), preds in predictions.items():
            for p in preds:
                handle.write(json.dumps(p.as_dict(model_name, mode)) + "\n")
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            stem = f"confusion_{model_name}" + ("" if mode == "generate" else f"_{mode}")
            write_confusion_csv(result["report"], class_names, out_dir / f"{stem}.csv")
            plot_confusion(result["report"], class_names, out_dir / f"{stem}.png", f"{model_name} ({mode})")
    with atomic_file(out_dir / "report.md") as handle:
        handle.write(markdown_report(results, class_names))


def markdown_report(results: dict, class_names: list[str]) -> str:
    lines = ["# Evaluation report", ""]
    any_result = next(iter(next(iter(results.values())).values()))["report"]
    lines.append(
        f"{any_result.n} test images, {len(class_names)} classes. Every image has exactly one outcome; "
        "the outcome columns add up to n."
    )
    lines += [
        "",
        "| model | mode | accuracy (95% CI) | macro-F1 | hallucinated | unparseable | correct | wrong | n | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            lines.append(
                f"| {model_name} | {mode} | {r.accuracy:.1%} ({r.accuracy_ci95[0]:.1%}-{r.accuracy_ci95[1]:.1%}) | "
                f"{r.macro_f1:.3f} | {r.hallucination_rate:.1%} ({r.counts['hallucinated']}) | "
                f"{r.parse_failure_rate:.1%} ({r.counts['unparseable']}) | {r.counts['correct']} | {r.counts['wrong']} | "
                f"{r.n} | {result['images_per_second']:.2f} |"
            )
    calibrated = [
        f"- {model_name}: mean confidence {r['report'].mean_confidence:.3f}, expected calibration error "
        f"{r['report'].calibration_ece:.3f} (10 bins)"
        for model_name, by_mode in results.items()
        for r in by_mode.values()
        if r["report"].calibration_ece is not None
    ]
    if calibrated:
        lines += [
            "",
            "Confidence of the `score` mode (softmax over the classes' answer likelihoods):",
            *calibrated,
        ]
    lines += [
        "",
        "Modes: `generate` = free greedy answer parsed leniently (the study's setting); `constrained` = "
        "decoding restricted to valid answers; `score` = class with the highest answer likelihood.",
        "",
    ]
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            lines += [
                f"## Per class: {model_name}, {mode}",
                "",
                "| class | precision | recall | F1 | support |",
                "|---|---|---|---|---|",
            ]
            for name in class_names:
                c = r.per_class[name]
                lines.append(
                    f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Entry points


def _run_renderer(run_dir: Path, config) -> Renderer:
    """The processor the run saved with its adapter (else the base's), with the run's image size."""
    from pixtral_lora.modeling import load_processor

    adapter = run_dir / "adapter"
    processor = load_processor(adapter if adapter.is_dir() else config.model.name_or_path)
    return Renderer(processor, config.data.image_longest_edge)


def _run_model(run_dir: Path, config, which: str, merged: str | Path | None = None):
    """ "base", or the fine-tuned model: the run's adapter on the base, or a merged checkpoint."""
    if which == "base":
        return load_eval_model(config.model.name_or_path, None, config.model.quantization, config.model.dtype)
    if merged is not None:
        return load_eval_model(str(merged), None, None, config.model.dtype)
    return load_eval_model(
        config.model.name_or_path, run_dir / "adapter", config.model.quantization, config.model.dtype
    )


def _held_out_rows(run_dir: Path, limit: int | None):
    """The run's config, class names and its recorded test split as prompt rows (first `limit`)."""
    from pixtral_lora.config import load_config
    from pixtral_lora.data import as_conversations, select_ids
    from pixtral_lora.training import load_run_data

    config = load_config(run_dir / "config.yaml")
    split = json.loads((run_dir / "split.json").read_text())
    class_names = split["class_names"]
    test = select_ids(load_run_data(config).splits.test, split["ids"]["test"])
    if limit:
        test = test.select(range(min(limit, len(test))))
    return config, class_names, list(as_conversations(test, config.prompt, class_names, with_answer=False))


def _predict_for_run(model, renderer: Renderer, rows, class_names, config, mode, strict=None, desc=""):
    """`predict_rows` with the run config's eval settings (batch size, answer length, strictness)."""
    return predict_rows(
        model,
        renderer,
        rows,
        class_names,
        config.prompt,
        mode,
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        strict=config.eval.strict if strict is None else strict,
        desc=desc,
    )


def evaluate_run(
    run_dir: str | Path,
    modes: list[str] | None = None,
    models: tuple[str, ...] = ("base", "finetuned"),
    limit: int | None = None,
    out_dir: str | Path | None = None,
    strict: bool | None = None,
    merged: str | Path | None = None,
) -> Path:
    """Evaluate a run's held-out split with the base and the fine-tuned model; returns the report dir.

    The fine-tuned model is the run's adapter on the base, or `merged` (an HF checkpoint) when given.
    """
    run_dir = Path(run_dir)
    config, class_names, rows = _held_out_rows(run_dir, limit)
    renderer = _run_renderer(run_dir, config)
    results: dict = {}
    predictions: dict = {}
    for model_name in models:
        model = _run_model(run_dir, config, model_name, merged)
        results[model_name] = {}
        for mode in modes or config.eval.modes:
            preds, speed = _predict_for_run(
                model, renderer, rows, class_names, config, mode, strict=strict, desc=f"{model_name}/{mode}"
            )
            report = summarise(preds, class_names)
            results[model_name][mode] = {"report": report, "images_per_second": speed}
            predictions[(model_name, mode)] = preds
            logger.info(
                "%s/%s: accuracy %.3f, hallucinated %.3f, unparseable %.3f (n=%d)",
                model_name,
                mode,
                report.accuracy,
                report.hallucination_rate,
                report.parse_failure_rate,
                report.n,
            )
        del model
    out = Path(out_dir or config.eval.output_dir or run_dir / "eval")
    write_report(out, results, class_names, predictions)
    return out


def predict_images(
    paths: list[Path], run_dir: str | Path, model_path: str | None = None, mode: str = "score"
) -> list[dict]:
    """Classify new images with a run's prompt: label, confidence (score mode) and the raw answer."""
    from pixtral_lora.config import load_config
    from pixtral_lora.prompt import messages_to_json

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    class_names = json.loads((run_dir / "split.json").read_text())["class_names"]
    messages = messages_to_json(config.prompt.messages(class_names))
    rows = [
        {"id": str(p), "messages": messages, "images": [{"path": str(p), "bytes": None}], "label": ""}
        for p in paths
    ]
    model = _run_model(run_dir, config, "finetuned", model_path)
    preds, _ = _predict_for_run(model, _run_renderer(run_dir, config), rows, class_names, config, mode)
    return [
        {"image": p.id, "label": p.label, "confidence": p.confidence, "raw_answer": p.raw_answer}
        for p in preds
    ]


# ---------------------------------------------------------------------------------------------------
# Optional vLLM backend (pip install vllm; a CUDA GPU): fast free generation on large test sets


def openai_messages(row: dict, renderer: Renderer) -> list[dict]:
    """A conversation row as OpenAI chat messages, what vLLM's chat API takes.

    Images are resized exactly as in training and inlined as lossless PNG data URIs, so vLLM (which
    encodes with mistral_common under `--tokenizer-mode mistral`) sees the prompt the model was
    trained on; `tests/test_evaluation.py` checks the token ids against our renderer's.
    """
    from pixtral_lora.images import encode_data_uri

    images = iter(renderer.load_images(row["images"]))
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


def vllm_generate(
    model_dir: str | Path, rows: list[dict], renderer: Renderer, max_new_tokens: int
) -> list[str]:
    """Greedy answers from vLLM serving a Mistral-format checkpoint (e.g. convert_to_mistral.py's output)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise RuntimeError("the vLLM backend needs vllm (pip install vllm) and a CUDA GPU") from err
    llm = LLM(
        model=str(model_dir),
        tokenizer_mode="mistral",
        config_format="mistral",
        load_format="mistral",
        limit_mm_per_prompt={"image": max(len(row["images"]) for row in rows)},
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.chat([openai_messages(row, renderer) for row in rows], params, use_tqdm=True)
    return [output.outputs[0].text for output in outputs]


def evaluate_run_vllm(
    run_dir: str | Path, models: dict[str, str], limit: int | None = None, out_dir: str | Path | None = None
) -> Path:
    """`generate`-mode evaluation of a run's held-out split with vLLM; models: name -> Mistral-format dir."""
    run_dir = Path(run_dir)
    config, class_names, rows = _held_out_rows(run_dir, limit)
    renderer = _run_renderer(run_dir, config)
    parser = AnswerParser(class_names, strict=config.eval.strict)
    results, predictions = {}, {}
    for name, model_dir in models.items():
        start = time.perf_counter()
        answers = vllm_generate(model_dir, rows, renderer, config.eval.max_new_tokens)
        speed = len(rows) / (time.perf_counter() - start)
        preds = parsed_predictions(rows, answers, parser)
        results[name] = {"generate": {"report": summarise(preds, class_names), "images_per_second": speed}}
        predictions[(name, "generate")] = preds
    out = Path(out_dir or run_dir / "eval-vllm")
    write_report(out, results, class_names, predictions)
    return out
