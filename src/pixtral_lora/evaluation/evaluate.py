"""Evaluation: the held-out split of a run, base model and fine-tuned model side by side.

Three modes, each reported separately:

- `generate`: greedy decoding of a free answer, parsed by `answers.AnswerParser` (what the study did).
- `constrained`: greedy decoding through a prefix tree of the valid answers (HF `generate`'s
  `prefix_allowed_tokens_fn`), so only a class from the set can come out: zero hallucinations by
  construction.
- `score`: every class answer is scored by its log-likelihood given the image (batched, the shared
  answer prefix scored once, the classes' own tokens packed after each prompt: `scoring.py`); the
  argmax is the prediction and the softmax over classes a confidence per image (its calibration,
  ECE, is in the report).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixtral_lora.classify.score import score_batch
from pixtral_lora.evaluation.calibration import abstain, abstention_threshold, run_temperature
from pixtral_lora.evaluation.metrics import classification_report, expected_calibration_error, outcome
from pixtral_lora.evaluation.reports import write_report
from pixtral_lora.model.render import Renderer, pad_batch, prompt_messages
from pixtral_lora.run.reader import Run, load_eval_model  # noqa: F401  (load_eval_model: part of this module's API)
from pixtral_lora.task.answers import AnswerParser
from pixtral_lora.task.prompt import PromptConfig

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
    error: str | None = None  # why the image could not be read (outcome `unreadable`)
    top: list[tuple[str, float]] | None = None  # score mode: the three most probable classes
    class_scores: list[float] | None = None  # score mode: each class's log-likelihood, class order
    calibrated: bool = False  # score mode: confidence from softmax(scores / T) of the run's calibration
    abstained: bool = False  # confidence under the chosen threshold: the label is kept, not given

    def top3(self) -> list[list] | None:
        """The three most probable classes with their probabilities, rounded (score mode), else None."""
        return [[label, round(prob, 6)] for label, prob in self.top] if self.top else None

    @property
    def outcome(self) -> str:
        return outcome(
            self.gold, self.label, self.raw_label, unreadable=self.error is not None, abstained=self.abstained
        )

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
            "calibrated": self.calibrated,
            "outcome": self.outcome,
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------------
# Models


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


def _batch_inputs(
    model, renderer: Renderer, rows: list[dict], loaded_images: list[list] | None = None
) -> dict:
    """Left-padded prompt ids of the rows and their images, on the model's device and dtype."""
    prompts, images = [], []
    if loaded_images is None:
        loaded_images = [renderer.load_images(row["images"]) for row in rows]
    for row, loaded in zip(rows, loaded_images, strict=True):
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
    model,
    renderer: Renderer,
    rows: list[dict],
    max_new_tokens: int,
    trie: AnswerTrie | None = None,
    loaded_images: list[list] | None = None,
) -> tuple[list[str], list[float]]:
    """Greedy answers for one batch of conversation rows (prompts left-padded), and each answer's
    probability: the product of its tokens' probabilities up to and including </s> (under the
    answer trie's constraint in constrained mode). Not calibrated: no temperature is fit for it."""
    inputs = _batch_inputs(model, renderer, rows, loaded_images)
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
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        generated = output.sequences[:, width:]
        step_log_probs = torch.stack(
            [torch.log_softmax(scores.float(), dim=-1) for scores in output.scores], dim=1
        ).gather(2, generated[:, : len(output.scores), None])[..., 0]
    # count each answer's tokens up to its first </s> (what follows is padding of a finished row)
    ended = torch.cumsum((generated == eos).int(), dim=1)
    counted = (ended - (generated == eos).int()) == 0
    counted = counted[:, : step_log_probs.shape[1]]  # where() and not a product: padding may hold NaN
    probabilities = torch.exp(torch.where(counted, step_log_probs, 0.0).sum(dim=1))
    answers = [renderer.tokenizer.decode(seq, skip_special_tokens=True) for seq in generated]
    return answers, [float(p) if torch.isfinite(p) else None for p in probabilities]


# ---------------------------------------------------------------------------------------------------
# Evaluation of one model in one mode


def parsed_predictions(
    rows: list[dict], answers: list[str], parser: AnswerParser, probabilities: list[float] | None = None
) -> list[Prediction]:
    """One Prediction per (row, free answer), the label read by `parser`; its confidence the answer's
    probability when known."""
    predictions = []
    probabilities = probabilities or [None] * len(rows)
    for row, answer, probability in zip(rows, answers, probabilities, strict=True):
        parsed = parser.parse(answer)
        predictions.append(
            Prediction(row["id"], row["label"], answer, parsed.raw_label, parsed.label, probability)
        )
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
    unreadable: dict[str, str] | None = None,
    temperature: float | None = None,
) -> tuple[list[Prediction], float]:
    """Predictions for every row (none dropped) and the throughput in images/s.

    A row whose image cannot be decoded (or is listed in `unreadable`, id -> reason) gets the outcome
    `unreadable`; the others in its batch go on. Score mode's probabilities are softmax(scores / T)
    with a calibration's `temperature` (marked `calibrated`), else the raw softmax.
    """
    from pixtral_lora.data.images import ImageError

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parser = AnswerParser(class_names, strict=strict)
    candidates = answer_token_ids(renderer.tokenizer, prompt, class_names)
    trie = AnswerTrie(candidates) if mode == "constrained" else None
    rows = list(rows)
    predictions: list[Prediction] = []
    start = time.perf_counter()
    unreadable = unreadable or {}
    for begin in tqdm(range(0, len(rows), batch_size), desc=desc or mode, unit="batch"):
        chunk = rows[begin : begin + batch_size]
        slots: list[Prediction | None] = [None] * len(chunk)
        ready, loaded = [], []
        for index, row in enumerate(chunk):
            error = unreadable.get(row["id"])
            if error is None:
                try:
                    loaded.append(renderer.load_images(row["images"]))
                    ready.append(index)
                    continue
                except ImageError as err:
                    error = str(err)
            slots[index] = Prediction(row["id"], row["label"], "", None, None, error=error)
        ready_rows = [chunk[i] for i in ready]
        if mode == "score" and ready:
            inputs = _batch_inputs(model, renderer, ready_rows, loaded)
            for index, scores in zip(ready, score_batch(model, inputs, candidates), strict=True):
                row = chunk[index]
                names = list(scores)
                values = torch.tensor(list(scores.values()), dtype=torch.float64)
                probs = torch.softmax(values / (temperature or 1.0), 0)
                best = int(values.argmax())
                ranked = torch.argsort(probs, descending=True)[:3].tolist()
                slots[index] = Prediction(
                    row["id"],
                    row["label"],
                    prompt.answer(names[best]),
                    names[best],
                    names[best],
                    float(probs[best]),
                    top=[(names[i], float(probs[i])) for i in ranked],
                    class_scores=[float(v) for v in values],
                    calibrated=temperature is not None,
                )
        elif ready:
            answers, probabilities = generate_answers(
                model, renderer, ready_rows, max_new_tokens, trie, loaded
            )
            parsed = parsed_predictions(ready_rows, answers, parser, probabilities)
            for index, prediction in zip(ready, parsed, strict=True):
                slots[index] = prediction
        predictions += slots
    elapsed = time.perf_counter() - start
    if len(predictions) != len(rows):
        raise AssertionError(f"{len(rows) - len(predictions)} test items lost")
    return predictions, len(rows) / elapsed if elapsed > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------
# Reports


def summarise(predictions: list[Prediction], class_names: list[str], temperature: float | None = None):
    """The classification report of a model's predictions; in score mode also how far its confidences
    can be trusted, raw and (with a calibration's `temperature`) calibrated."""
    report = classification_report(
        [p.gold for p in predictions],
        [p.label for p in predictions],
        [p.raw_label for p in predictions],
        class_names,
        [p.error is not None for p in predictions],
        [p.abstained for p in predictions],
    )
    scored = [p for p in predictions if p.error is None]
    if scored and all(p.confidence is not None for p in scored):
        confidences = [p.confidence for p in scored]
        report.mean_confidence = float(sum(confidences) / len(confidences))
        report.calibration_ece = expected_calibration_error(confidences, [p.label == p.gold for p in scored])
    if (
        scored
        and all(p.confidence is not None for p in scored)
        and any(p.class_scores is None for p in scored)
    ):
        from pixtral_lora.evaluation.calibration import confidence_measures

        correct = [p.label == p.gold for p in scored]  # generate/constrained: the answer's probability
        report.confidence = {
            "temperature": None,
            "raw": confidence_measures([p.confidence for p in scored], correct),
            "calibrated": None,
            "of": "answer probability",
        }
    elif scored and all(p.class_scores is not None and p.gold in class_names for p in scored):
        from pixtral_lora.evaluation.calibration import class_measures

        scores = np.array([p.class_scores for p in scored])
        gold = np.array([class_names.index(p.gold) for p in scored])
        report.confidence = {
            "of": "softmax over the classes",
            "temperature": temperature,
            "raw": class_measures(scores, gold),
            "calibrated": class_measures(scores, gold, temperature) if temperature else None,
        }
    return report


# ---------------------------------------------------------------------------------------------------
# Entry points


def predict_for_run(
    model,
    renderer: Renderer,
    rows,
    class_names,
    config,
    mode,
    strict=None,
    desc="",
    unreadable=None,
    batch_size: int | None = None,
    temperature: float | None = None,
):
    """`predict_rows` with the run config's eval settings (batch size, answer length, strictness)."""
    return predict_rows(
        model,
        renderer,
        rows,
        class_names,
        config.prompt,
        mode,
        batch_size=batch_size or config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        strict=config.eval.strict if strict is None else strict,
        desc=desc,
        unreadable=unreadable,
        temperature=temperature,
    )


class RunClassifier:
    """A run's fine-tuned model classifying new images (`predict`, `map`): the run's config, classes
    and prompt. The model loads at the first batch, so a rerun with nothing left to do loads none."""

    def __init__(
        self,
        run_dir: str | Path,
        model_path: str | None = None,
        resize_to: int | None = None,
        abstain_below: float | None = None,
        target_accuracy: float | None = None,
    ):
        from pixtral_lora.task.prompt import messages_to_json

        self.run = Run.open(run_dir, needs_adapter=model_path is None, needs_base=model_path is None)
        self.run_dir, self.config, self.class_names = self.run.run_dir, self.run.config, self.run.class_names
        self._messages = messages_to_json(self.config.prompt.messages(self.class_names))
        self._model_path, self._resize_to = model_path, resize_to
        self._model = self._renderer = None
        self.temperature: float | None = None
        if model_path is None:  # a calibration belongs to the adapter; a merged checkpoint is raw
            self.temperature, note = run_temperature(self.run)
            logger.info("%s", note)
        self.abstain_below, self.abstention = abstention_threshold(self.run, abstain_below, target_accuracy)
        if self.abstention:
            logger.info("%s", self.abstention)

    def identity(self) -> str:
        """What the answers come from (`Run.model_identity`): resumed results must share it."""
        identity = self.run.model_identity(self._model_path)
        identity += f"+T:{self.temperature:.6f}" if self.temperature is not None else ""
        return identity + (f"+abstain:{self.abstain_below:.6f}" if self.abstain_below is not None else "")

    def row(self, key: str, image: dict) -> dict:
        """A row to classify: the run's prompt and one image (`{"path": ..., "bytes": ...}`)."""
        return {"id": key, "messages": self._messages, "images": [image], "label": ""}

    def __call__(self, rows: list[dict], mode: str, batch_size: int | None = None) -> list[Prediction]:
        if self._model is None:
            self._model = self.run.model("finetuned", self._model_path)
            self._renderer = self.run.renderer(self._resize_to)
        predictions, _ = predict_for_run(
            self._model,
            self._renderer,
            rows,
            self.class_names,
            self.config,
            mode,
            batch_size=batch_size,
            temperature=self.temperature if mode == "score" else None,
        )
        return abstain(predictions, self.abstain_below)


def evaluate_run(
    run_dir: str | Path,
    modes: list[str] | None = None,
    models: tuple[str, ...] = ("base", "finetuned"),
    limit: int | None = None,
    out_dir: str | Path | None = None,
    strict: bool | None = None,
    merged: str | Path | None = None,
    overwrite: bool = False,
    gallery_limit: int = 200,
    abstain_below: float | None = None,
    target_accuracy: float | None = None,
) -> Path:
    """Evaluate a run's held-out split with the base and the fine-tuned model; returns the report dir.

    The fine-tuned model is the run's adapter on the base, or `merged` (an HF checkpoint) when given.
    The report directory replaces a previous report only (anything else needs `overwrite`).
    """
    from pixtral_lora.outputs import EVAL_REPORT_FILES, check_replaceable, check_writable

    needs_adapter = "finetuned" in models and merged is None
    run = Run.open(run_dir, needs_adapter=needs_adapter, needs_base="base" in models or needs_adapter)
    run_dir, config, class_names = run.run_dir, run.config, run.class_names
    out = Path(out_dir or config.eval.output_dir or run_dir / "eval")
    check_replaceable(out, EVAL_REPORT_FILES, overwrite)
    check_writable(out.parent, "--out")
    threshold, abstention = abstention_threshold(run, abstain_below, target_accuracy)
    if abstention:
        logger.info("%s", abstention)
    rows, unreadable = run.test_rows(limit)
    renderer = run.renderer()
    results: dict = {}
    predictions: dict = {}
    for model_name in models:
        model = run.model(model_name, merged)
        results[model_name] = {}
        temperature = None
        if model_name == "finetuned" and merged is None:  # a calibration belongs to the run's adapter
            temperature, note = run_temperature(run)
            logger.info("%s", note)
        for mode in modes or config.eval.modes:
            preds, speed = predict_for_run(
                model,
                renderer,
                rows,
                class_names,
                config,
                mode,
                strict=strict,
                desc=f"{model_name}/{mode}",
                unreadable=unreadable,
                temperature=temperature if mode == "score" else None,
            )
            report = summarise(
                # a threshold chosen for a target accuracy is one of score mode's calibrated confidences
                abstain(preds, threshold if target_accuracy is None or mode == "score" else None),
                class_names,
                temperature if mode == "score" else None,
            )
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
    thumbnails = _thumbnails(rows, predictions, renderer, gallery_limit)
    facts = run_facts(run_dir, config, merged)
    if abstention:
        facts["abstention"] = abstention
    write_report(out, results, class_names, predictions, overwrite, thumbnails, facts, gallery_limit)
    return out


def _thumbnails(rows: list[dict], predictions: dict, renderer: Renderer, limit: int, size: int = 160) -> dict:
    """Image id -> JPEG data URI of the image as the model saw it (resized), for the gallery's items."""
    from pixtral_lora.data.images import ImageError, encode_data_uri
    from pixtral_lora.evaluation.report_html import gallery_items

    by_id = {row["id"]: row for row in rows}
    wanted = {p.id for (_, mode), preds in predictions.items() for p in gallery_items(preds, mode, limit)}
    thumbnails = {}
    for image_id in sorted(wanted):
        try:
            image = renderer.load_images(by_id[image_id]["images"])[0].copy()
        except (ImageError, IndexError):
            continue
        image.thumbnail((size, size))
        thumbnails[image_id] = encode_data_uri(image)
    return thumbnails


def run_facts(run_dir: Path, config, merged: str | Path | None = None) -> dict:
    """The run's key facts for a report: model, adapter, data, split sizes, config hash, date, versions."""
    import datetime
    import hashlib

    split = json.loads((run_dir / "split.json").read_text())
    environment = run_dir / "environment.json"
    versions = json.loads(environment.read_text()).get("versions", {}) if environment.is_file() else {}
    config_text = (run_dir / "config.yaml").read_bytes()
    return {
        "run": str(run_dir),
        "base model": config.model.name_or_path,
        "fine-tuned model": str(merged) if merged else str(run_dir / "adapter"),
        "data": config.data.path,
        "split sizes": ", ".join(f"{name} {len(ids)}" for name, ids in split["ids"].items()),
        "classes": len(split["class_names"]),
        "config sha256": hashlib.sha256(config_text).hexdigest()[:16],
        "evaluated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    }
