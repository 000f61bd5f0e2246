"""`pixtral-lora eval --backend vllm` (pip install vllm): the run's held-out split through vLLM's engine.

Every mode from one engine (`classify/vllm_engine.py`), on a Mistral-format export, with the same prompts, parser,
calibration and reports as the transformers path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.classify.vllm_engine import VllmEngine
from pixtral_lora.evaluation.calibration import lora_export_temperature
from pixtral_lora.evaluation.evaluate import run_facts
from pixtral_lora.evaluation.metrics import summarise
from pixtral_lora.evaluation.reports import write_report
from pixtral_lora.run.reader import Run

logger = logging.getLogger(__name__)


def _temperature(run: Run, name: str, lora_dir: str | Path | None) -> float | None:
    """The run's calibration applies to an --adapter-only export of the run's own adapter only."""
    if name != "finetuned" or lora_dir is None:
        return None  # the base, or a merged export: raw probabilities, as in the transformers path
    temperature, note = lora_export_temperature(run, lora_dir)
    logger.info("%s", note)
    return temperature


def evaluate_run_vllm(
    run_dir: str | Path,
    models: dict[str, str | tuple[str, str]],
    modes: tuple[str, ...] | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """Evaluation of a run's held-out split with vLLM in `modes` (default: the config's eval.modes);
    models: name -> Mistral-format dir, or (base dir, --adapter-only LoRA dir) to evaluate the adapter
    as vLLM serves it. The rows go through the classify loop the transformers path runs, so an
    unreadable image is counted, not fatal. One engine per model answers every mode."""
    from pixtral_lora.evaluation.reports import EVAL_KIND
    from pixtral_lora.outputs import EVAL_REPORT_FILES, check_replaceable

    run = Run.open(run_dir, needs_adapter=False, needs_base=False, force=force)
    run_dir, config, class_names = run.run_dir, run.config, run.class_names
    out = Path(out_dir or run_dir / "eval-vllm")
    check_replaceable(out, EVAL_REPORT_FILES, overwrite, EVAL_KIND)
    rows, unreadable = run.test_rows(limit)
    renderer = run.renderer()
    results, predictions = {}, {}
    max_images = max((len(row["images"]) for row in rows), default=1)
    for name, model_dir in models.items():
        base, lora_dir = model_dir if isinstance(model_dir, tuple) else (model_dir, None)
        temperature = _temperature(run, name, lora_dir)
        results[name] = {}
        engine = VllmEngine(base, max_images, config.model.dtype, lora_dir)
        for mode in modes or config.eval.modes:
            options = ClassifyOptions.for_run(
                config,
                mode,
                batch_size=max(len(rows), 1),  # one batch: vLLM schedules its own
                desc=f"{name}/{mode}",
                temperature=temperature if mode == "score" else None,
            )
            preds, speed = predict_rows(
                engine, renderer, rows, class_names, config.prompt, options, unreadable
            )
            report = summarise(preds, class_names, temperature if mode == "score" else None)
            results[name][mode] = {"report": report, "images_per_second": speed}
            predictions[(name, mode)] = preds
        del engine
    facts = run_facts(run_dir, config) | ({"warnings": "; ".join(run.warnings)} if run.warnings else {})
    facts["backend"] = "vllm"
    write_report(out, results, class_names, predictions, overwrite, facts=facts, warnings=run.warnings)
    return out
