"""Optional vLLM backend for `pixtral-lora eval --backend vllm` (pip install vllm; a CUDA GPU).

Free generation (`generate` mode) over large test sets, on a Mistral-format export, with the same
prompts, parser and reports as the transformers path.
"""

from __future__ import annotations

from pathlib import Path

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.classify.generate import AnswerEngine
from pixtral_lora.errors import UserError
from pixtral_lora.evaluation.evaluate import run_facts
from pixtral_lora.evaluation.metrics import summarise
from pixtral_lora.evaluation.reports import write_report
from pixtral_lora.model.render import Renderer, prompt_messages
from pixtral_lora.run.reader import Run


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


class VllmEngine(AnswerEngine):
    """Greedy answers from vLLM serving a Mistral-format checkpoint (e.g. convert_to_mistral.py's
    output), with `lora_dir` (an --adapter-only export) applied as LoRA when given, all of it
    (projector and vision tower included). The classify loop hands it the rows it could read."""

    def __init__(
        self,
        model_dir: str | Path,
        max_images: int,
        dtype: str = "auto",
        lora_dir: str | Path | None = None,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise UserError("the vLLM backend needs vllm (pip install vllm) and a CUDA GPU") from err
        lora: dict = {}
        self._request = None
        if lora_dir is not None:
            import json

            from vllm.lora.request import LoRARequest

            from pixtral_lora.model.loading import VLLM_LORA_RANKS

            rank = json.loads((Path(lora_dir) / "adapter_config.json").read_text(encoding="utf-8"))["r"]
            lora = {
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
            **lora,
        )
        self._sampling = SamplingParams

    def answers(
        self, renderer: Renderer, rows: list[dict], images: list[list], max_new_tokens: int
    ) -> tuple[list[str], list[float | None]]:
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens)
        messages = [openai_messages(row, loaded) for row, loaded in zip(rows, images, strict=True)]
        outputs = self._llm.chat(messages, params, use_tqdm=False, lora_request=self._request)
        return [output.outputs[0].text for output in outputs], [None] * len(outputs)


def evaluate_run_vllm(
    run_dir: str | Path,
    models: dict[str, str | tuple[str, str]],
    limit: int | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """`generate`-mode evaluation of a run's held-out split with vLLM; models: name -> Mistral-format
    dir, or (base dir, --adapter-only LoRA dir) to evaluate the adapter as vLLM serves it. The rows go
    through the classify loop the transformers path runs, so an unreadable image is counted, not fatal."""
    from pixtral_lora.evaluation.reports import EVAL_KIND
    from pixtral_lora.outputs import EVAL_REPORT_FILES, check_replaceable

    run = Run.open(run_dir, needs_adapter=False, needs_base=False, force=force)
    run_dir, config, class_names = run.run_dir, run.config, run.class_names
    out = Path(out_dir or run_dir / "eval-vllm")
    check_replaceable(out, EVAL_REPORT_FILES, overwrite, EVAL_KIND)
    rows, unreadable = run.test_rows(limit)
    renderer = run.renderer()
    results, predictions = {}, {}
    for name, model_dir in models.items():
        base, lora_dir = model_dir if isinstance(model_dir, tuple) else (model_dir, None)
        engine = VllmEngine(base, max(len(row["images"]) for row in rows), config.model.dtype, lora_dir)
        # one batch: vLLM schedules its own
        options = ClassifyOptions.for_run(config, "generate", batch_size=max(len(rows), 1), desc=name)
        preds, speed = predict_rows(engine, renderer, rows, class_names, config.prompt, options, unreadable)
        del engine
        results[name] = {"generate": {"report": summarise(preds, class_names), "images_per_second": speed}}
        predictions[(name, "generate")] = preds
    facts = run_facts(run_dir, config) | ({"warnings": "; ".join(run.warnings)} if run.warnings else {})
    write_report(out, results, class_names, predictions, overwrite, facts=facts, warnings=run.warnings)
    return out
