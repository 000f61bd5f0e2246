"""Rows -> predictions: the one classification loop that training's validation, `eval`, `calibrate`,
`predict` and `map` share.

Three modes:

- `generate`: greedy decoding of a free answer, parsed by `task.answers.AnswerParser` (what the study did).
- `constrained`: greedy decoding through a prefix tree of the valid answers (HF `generate`'s
  `prefix_allowed_tokens_fn`), so only a class from the set can come out: zero hallucinations by
  construction.
- `score`: every class answer is scored by its log-likelihood given the image (batched, the shared
  answer prefix scored once, the classes' own tokens packed after each prompt: `classify/score.py`);
  the argmax is the prediction and the softmax over classes a confidence per image.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm import tqdm

from pixtral_lora.classify.generate import AnswerEngine, batch_inputs, generate_answers
from pixtral_lora.classify.prediction import Prediction
from pixtral_lora.classify.score import score_batch
from pixtral_lora.model.render import Renderer
from pixtral_lora.task.answers import AnswerParser, AnswerTrie, answer_token_ids
from pixtral_lora.task.prompt import PromptConfig

MODES = ("generate", "constrained", "score")


@dataclasses.dataclass(frozen=True)
class ClassifyOptions:
    """How rows become predictions, built once by the command that classifies (`for_run` reads a run
    config's eval section); adding an option touches this class and the command that sets it."""

    mode: str = "generate"
    batch_size: int = 8
    max_new_tokens: int = 32
    strict: bool = False
    temperature: float | None = None  # score mode's calibration: softmax(scores / T)
    desc: str = ""  # the progress bar's label

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @classmethod
    def for_run(cls, config, mode: str, **changes) -> ClassifyOptions:
        """The run config's eval settings (batch size, answer length, strictness) for `mode`, with
        `changes` (a None leaves the config's value)."""
        options = cls(
            mode=mode,
            batch_size=config.eval.batch_size,
            max_new_tokens=config.eval.max_new_tokens,
            strict=config.eval.strict,
        )
        return dataclasses.replace(options, **{k: v for k, v in changes.items() if v is not None})


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
    options: ClassifyOptions = ClassifyOptions(),
    unreadable: dict[str, str] | None = None,
) -> tuple[list[Prediction], float]:
    """Predictions for every row (none dropped) and the throughput in images/s.

    A row whose image cannot be decoded (or is listed in `unreadable`, id -> reason) gets the outcome
    `unreadable`; the others in its batch go on. Score mode's probabilities are softmax(scores / T)
    with a calibration's `temperature` (marked `calibrated`), else the raw softmax. `model` is a
    transformers model, or an `AnswerEngine` (vLLM) in a mode it answers.
    """
    from pixtral_lora.data.images import ImageError

    mode, batch_size, temperature = options.mode, options.batch_size, options.temperature
    if isinstance(model, AnswerEngine) and mode not in model.modes:
        raise ValueError(f"{type(model).__name__} answers in {', '.join(model.modes)} mode, not {mode}")
    parser = AnswerParser(class_names, strict=options.strict)
    candidates = answer_token_ids(renderer.tokenizer, prompt, class_names)
    trie = AnswerTrie(candidates) if mode == "constrained" else None
    rows = list(rows)
    predictions: list[Prediction] = []
    start = time.perf_counter()
    unreadable = unreadable or {}
    for begin in tqdm(range(0, len(rows), batch_size), desc=options.desc or mode, unit="batch"):
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
            if isinstance(model, AnswerEngine):
                batch_scores = model.scores(renderer, ready_rows, loaded, candidates)
            else:
                batch_scores = score_batch(
                    model, batch_inputs(model, renderer, ready_rows, loaded), candidates
                )
            for index, scores in zip(ready, batch_scores, strict=True):
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
                model, renderer, ready_rows, options.max_new_tokens, trie, loaded
            )
            parsed = parsed_predictions(ready_rows, answers, parser, probabilities)
            for index, prediction in zip(ready, parsed, strict=True):
                slots[index] = prediction
        predictions += slots
    elapsed = time.perf_counter() - start
    if len(predictions) != len(rows):
        raise AssertionError(f"{len(rows) - len(predictions)} test items lost")
    return predictions, len(rows) / elapsed if elapsed > 0 else float("inf")
