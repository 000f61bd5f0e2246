"""The training recipe: config -> data -> model -> TRL SFTTrainer -> run directory.

Run directory layout (`training.output_dir`):

    config.yaml          the resolved config (overrides applied)
    split.json           class names and the ids of every split (eval uses exactly the held-out ids)
    environment.json     library versions, device, seeds
    data_report.json     samples kept and skipped (too long, unusable image), by id
    checkpoints/         Trainer checkpoints; a rerun of the same config resumes from the last one
    adapter/             adapter_model.safetensors + adapter_config.json + processor files (final)
    metrics.jsonl        one JSON object per log event (loss, lr, eval_loss, ...)
    loss_curve.png       training and validation loss
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from pixtral_lora.config.schema import Config, with_absolute_paths
from pixtral_lora.config.yaml_loading import dump_config
from pixtral_lora.data.loaders import as_conversations
from pixtral_lora.data.raster import band_options
from pixtral_lora.data.splits import load_run_data
from pixtral_lora.errors import DataError
from pixtral_lora.families import Family, config_json, family_from_config, family_of
from pixtral_lora.model.loading import best_device, load_model, load_processor
from pixtral_lora.model.render import IGNORE_INDEX, Renderer, RenderReport, TrainingCollator, render_dataset
from pixtral_lora.outputs import ADAPTER_FILES, atomic_directory, atomic_file, write_json
from pixtral_lora.run.identity import base_identity, content_sha256, trained_with
from pixtral_lora.run.layout import (
    ADAPTER_DIR,
    BASE_MODEL_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    ENVIRONMENT_FILE,
    SPLIT_FILE,
    TRAIN_SUMMARY_FILE,
)
from pixtral_lora.run.writer import (
    check_resumable,
    drop_metrics_after,
    environment,
    is_main_process,
    recorded_split,
    resume_checkpoint,
    run_directory,
)
from pixtral_lora.training.guards import DivergedError, divergence_guard
from pixtral_lora.training.preflight import preflight
from pixtral_lora.training.sharding import (
    calibrate_alone,
    check_sharded,
    fsdp_launch,
    full_state_dict,
    parameters_sharded,
    peak_memory_per_process,
    prepare_sharding,
    rehearse_on_cpu,
    separate_storage,
)

logger = logging.getLogger(__name__)

VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------
# Model


def best_metric(config: Config) -> str | None:
    """The metric that picks the best checkpoint (None without evaluation during training)."""
    if not config.training.eval_steps:
        return None
    if config.training.metric_for_best_model:
        return config.training.metric_for_best_model
    return "eval_accuracy" if config.training.eval_classification.enabled else "eval_loss"


def lora_target_regex(config: Config, family: Family) -> str:
    """PEFT target_modules regex: language model projections, plus vision tower, projector and (Mistral3)
    patch merger when asked; the family names its connector's modules."""
    parts = [rf".*language_model.*\.({'|'.join(config.lora.target_modules)})"]
    if config.lora.train_vision_tower:
        parts.append(rf".*vision_tower.*\.({'|'.join(VISION_TARGETS)})")
    connector = [
        *(family.connector_lora_modules if config.lora.train_projector else ()),
        *(family.merger_lora_modules if config.lora.train_patch_merger else ()),
    ]
    if connector:
        parts.append(rf".*multi_modal_projector\.({'|'.join(re.escape(name) for name in connector)})")
    return "^(" + "|".join(parts) + ")$"


def peft_config(config: Config, family: Family | None = None):
    from peft import LoraConfig

    family = family or family_of(config.model.name_or_path)
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=lora_target_regex(config, family),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_training_model(config: Config, device: str):
    model = load_model(
        config.model.name_or_path,
        quantization=config.model.quantization,
        dtype=config.model.dtype,
        device=device,
        attn_implementation=config.model.attn_implementation,
        quant_storage=fsdp_launch(),
    )
    model.config.use_cache = False
    # Not peft's prepare_model_for_kbit_training: it copies every weight that is not 4-bit (embeddings,
    # LM head, vision tower, projector: 1.78B parameters at the 12B shape) to float32, +3.3 GiB of
    # VRAM against the 16 GB target, and under bf16 autocast the matmuls cast them back to bf16, so
    # the copies buy nothing (RMSNorm computes in float32 either way). Its other steps are not needed
    # here: get_peft_model freezes the base, and non-reentrant activation checkpointing (the recipe's)
    # needs no input-gradient hook. Freezing here too keeps the base frozen whatever wraps it.
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model


# ---------------------------------------------------------------------------------------------------
# Trainer


def _metrics_callback(run_dir: Path):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Appends every log event to metrics.jsonl (one process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return MetricsJsonl()


def _base_identity_callback(identity: dict):
    from transformers import TrainerCallback

    class BaseIdentity(TrainerCallback):
        """Writes base_model.json into every checkpoint: `--resume` checks the base it trained on."""

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                write_json(checkpoint / BASE_MODEL_FILE, identity)

    return BaseIdentity()


def _sharded_callback():
    from transformers import TrainerCallback

    class ShardedCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            check_sharded(model)

    return ShardedCheck()


def _report_to(config: Config) -> list[str] | str:
    if config.training.report_to == "auto":
        import importlib.util

        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    return config.training.report_to


def _checkpointing_args(arguments_class, enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers uses (5.2x: activation_*, earlier 5.x:
    gradient_*), so the recipe runs on what a GPU machine ships too."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(arguments_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def sft_config(config: Config, run_dir: Path, device: str, has_validation: bool):
    from trl import SFTConfig

    t = config.training
    on_cuda = device.startswith("cuda")
    optim = t.optim if t.optim != "auto" else ("paged_adamw_8bit" if on_cuda else "adamw_torch")
    evaluate = bool(t.eval_steps) and has_validation
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        load_best_model_at_end=evaluate,
        metric_for_best_model=best_metric(config) if evaluate else None,
        greater_is_better=(best_metric(config) != "eval_loss") if evaluate else None,
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing),
        bf16=on_cuda and config.model.dtype in ("auto", "bfloat16"),
        fp16=on_cuda and config.model.dtype == "float16",
        use_cpu=not on_cuda,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=_report_to(config),
        use_liger_kernel=t.use_liger_kernel,
        # Samples are rendered by our own (tested) code; TRL must not re-tokenise or drop columns.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        disable_tqdm=False,
    )


def _answer_only_trainer_class():
    from trl import SFTTrainer

    class AnswerOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only the answer positions onto the 131k vocabulary.

        Why not TRL's fused LM head: without Triton (CPU) it falls back to a per-tile torch path that
        costs ~5 s per step on the tiny model. Our answers are ~13 tokens, so asking the model for the
        logits of those positions only (`logits_to_keep` as an index of answer columns) is as cheap on a
        GPU and ~10x cheaper on a CPU. The loss is the same token-mean cross-entropy, normalised like Trainer's.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != IGNORE_INDEX
            # Positions (columns) where any row predicts an answer token: a 1-D index, which every
            # transformers 5.x accepts as logits_to_keep; then each row's own answer positions.
            columns = keep.any(0).nonzero().squeeze(1)
            outputs = model(**inputs, logits_to_keep=columns, use_cache=False)
            logits = outputs.logits[keep[:, columns]].float()  # (answer tokens in the batch, vocab)
            answer_targets = targets[keep[:, :-1]]
            loss_sum = torch.nn.functional.cross_entropy(logits, answer_targets, reduction="sum")
            if num_items_in_batch is None:
                loss = loss_sum / answer_targets.numel()
            else:
                loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == answer_targets).float().mean()
            self._metrics[mode]["answer_token_accuracy"].append(
                self.accelerator.gather_for_metrics(accuracy).mean().item()
            )
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, separate_storage(state_dict))  # checkpoints under FSDP1: every tensor

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if rehearse_on_cpu(self.accelerator):  # train/fsdp_cpu.yaml: FSDP on CPU processes
                self.is_fsdp_enabled = True

        # Set by `train` when the validation split is classified during training.
        validation_classifier = None

        def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
            """The validation loss, plus classification metrics (accuracy, ...) of the same split.

            Added here, before `evaluate` logs them and hands them to the callbacks, so TensorBoard,
            metrics.jsonl, best-checkpoint tracking and early stopping all see them.
            """
            output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
            if self.validation_classifier is not None and metric_key_prefix == "eval":
                output.metrics.update(
                    self.validation_classifier(self.model, self.accelerator, metric_key_prefix)
                )
            return output

    return AnswerOnlySFTTrainer


def train(config: Config, resume: str = "auto", callbacks: list | None = None) -> Path:
    """Run the recipe; returns the run directory. resume: "auto" (last checkpoint if any), "never", or a path.

    One run per directory: a second process on the same output_dir fails at once naming the holder.
    """
    preflight(config, resume)
    as_given, config = config, with_absolute_paths(config)  # what the run directory records
    with run_directory(config) as run_dir:
        return _train_in(config, run_dir, resume, callbacks or [], as_given)


def _train_in(
    config: Config, run_dir: Path, resume: str, extra_callbacks: list, as_given: Config | None = None
) -> Path:
    from transformers import EarlyStoppingCallback, set_seed

    # -- Config and run directory (locked: no second run writes here) -------------------------------
    recorded = recorded_split(config, also_same=[as_given] if as_given is not None else [])
    set_seed(config.training.seed)
    device = best_device()
    main_process = is_main_process()

    # -- Data (fails before any model is loaded) ---------------------------------------------------
    run_data = load_run_data(config, recorded, leakage_check=True)
    processor = load_processor(config.model.name_or_path)
    renderer = Renderer(
        processor, config.data.image_longest_edge, config.data.max_length, bands=band_options(config.data)
    )
    reports = {"train": RenderReport(), "validation": RenderReport()}
    train_set = render_dataset(
        renderer,
        as_conversations(run_data.splits.train, config.prompt, run_data.class_names),
        reports["train"],
    )
    eval_set = None
    if run_data.splits.validation is not None:
        eval_set = render_dataset(
            renderer,
            as_conversations(run_data.splits.validation, config.prompt, run_data.class_names),
            reports["validation"],
        )
    if len(train_set) == 0:
        raise DataError(f"no training samples left after rendering: {reports['train'].summary()}")

    if main_process:  # what only the run directory needs: the other ranks of a launch skip it
        if recorded is not None and "unreadable" in recorded:  # a resume: the same split, checked before
            unreadable_test = recorded["unreadable"]["test"]
        else:
            unreadable_test = _unreadable(renderer, run_data.splits.test)
        with atomic_file(run_dir / CONFIG_FILE) as handle:
            handle.write(dump_config(config))
        write_json(
            run_dir / SPLIT_FILE,
            {
                "data_path": config.data.path,
                "class_names": run_data.class_names,
                "label_sources": run_data.label_sources,
                "ids": run_data.splits.ids(),
                # twins across the split, found before training (a resume keeps these)
                "leakage": run_data.leakage,
                # what the held-out images were, byte for byte: Run.open notices data changed since
                # (a resume keeps what the first start recorded: hashed once, compared against that)
                "content_sha256": (recorded or {}).get("content_sha256")
                or {
                    name: content_sha256(split)
                    for name, split in (
                        ("validation", run_data.splits.validation),
                        ("test", run_data.splits.test),
                    )
                    if split is not None
                },
                # Images that cannot be decoded, by split: training skipped them, eval counts them
                # as `unreadable` without trying again.
                "unreadable": {
                    "train": reports["train"].bad_image,
                    "validation": reports["validation"].bad_image,
                    "test": unreadable_test,
                },
            },
        )
        write_json(run_dir / ENVIRONMENT_FILE, environment(config, device))
        write_json(
            run_dir / DATA_REPORT_FILE,
            {name: vars(r) for name, r in reports.items()}
            | {"test": {"unreadable": unreadable_test}, "leakage": run_data.leakage}
            | (
                {
                    "excluded": {
                        "file": config.data.exclude,
                        "count": len(run_data.excluded),
                        "ids": run_data.excluded,
                    }
                }
                if run_data.excluded is not None
                else {}
            ),
        )

    # -- Model -------------------------------------------------------------------------------------
    saved, source = config_json(config.model.name_or_path)
    prepare_sharding(family_from_config(saved, source), saved)  # no-op unless an FSDP launch
    args = sft_config(config, run_dir, device, eval_set is not None)
    model = load_training_model(config, device)

    # -- Training ----------------------------------------------------------------------------------
    identity = base_identity(config.model.name_or_path)  # once: a local base's fingerprint reads its files
    callbacks = [
        _metrics_callback(run_dir),
        _base_identity_callback(identity),
        _sharded_callback(),
        *extra_callbacks,
    ]
    guard = None
    if config.training.stop_after_bad_logs:
        guard = divergence_guard(config.training.stop_after_bad_logs, config.model.dtype)
        callbacks.append(guard)
    if config.training.early_stopping_patience and eval_set is not None:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=config.training.early_stopping_patience)
        )
    trainer_class = _answer_only_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        data_collator=TrainingCollator(renderer),
        peft_config=peft_config(config),
        callbacks=callbacks,
    )
    if eval_set is not None and config.training.eval_classification.enabled:
        from pixtral_lora.training.live_eval import ValidationClassifier

        rows = as_conversations(
            run_data.splits.validation, config.prompt, run_data.class_names, with_answer=False
        )
        trainer.validation_classifier = ValidationClassifier(
            config, renderer, list(rows), run_data.class_names
        )
    checkpoint = resume_checkpoint(run_dir, resume, main_process)
    if checkpoint is not None:
        from peft import get_peft_model_state_dict

        trained = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(trainer.model).items()}
        check_resumable(checkpoint, trained, config.model.name_or_path)
        logger.info("resuming from %s", checkpoint)
        if main_process:
            state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            drop_metrics_after(run_dir, state.get("global_step", 0))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if guard is not None and guard.stopped:
        raise DivergedError(guard.stopped)

    # -- Save --------------------------------------------------------------------------------------
    sharded = parameters_sharded(trainer)
    # FSDP / ZeRO-3: every process holds a shard; all gather the whole adapter, the main process writes it
    state_dict = full_state_dict(trainer) if sharded else None
    peaks = peak_memory_per_process()  # every process: a collective
    if trainer.is_world_process_zero():
        # The run directory is this training's own (locked, its config.yaml): its adapter folder is
        # always its own output, whatever wrote it last; the marker tells other commands what it is.
        with atomic_directory(
            run_dir / ADAPTER_DIR, ADAPTER_FILES, overwrite=True, kind="training adapter"
        ) as tmp:
            adapter_model = trainer.accelerator.unwrap_model(trainer.model) if sharded else trainer.model
            adapter_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            processor.save_pretrained(tmp)
            write_json(tmp / BASE_MODEL_FILE, identity)
        write_json(
            run_dir / TRAIN_SUMMARY_FILE,
            {
                "trained_with": trained_with(config),  # what Run.open compares config.yaml with
                "global_step": trainer.state.global_step,
                "best_checkpoint": trainer.state.best_model_checkpoint,
                "best_metric": trainer.state.best_metric,
                "metric_for_best_model": args.metric_for_best_model,
                "train_samples": len(train_set),
                "skipped": {name: r.summary() for name, r in reports.items()},
                "peak_gpu_memory_gib": peaks,  # per process, allocated by torch; null without CUDA
            },
        )
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        if run_data.splits.validation is not None and len(run_data.splits.validation):
            from pixtral_lora.evaluation.calibrate import calibrate_run

            # calibrated confidences for eval, predict and map: T fit on validation, never on test
            # (a sharded model answers only with every process: a fresh one loads the saved adapter)
            if sharded:
                calibrate_alone(run_dir)
            else:
                calibrate_run(run_dir, model=trainer.model, renderer=renderer)
    return run_dir


def _unreadable(renderer: Renderer, dataset) -> list[str]:
    """Ids of rows whose images cannot be decoded (checked once, here, so eval need not trip on them)."""
    from pixtral_lora.data.images import ImageError

    bad = []
    for row in dataset:
        refs = row["images"] if "images" in row else [row["image"]]
        try:
            renderer.load_images(refs)
        except ImageError as err:
            logger.warning("test image %s is unreadable: %s", row["id"], err)
            bad.append(row["id"])
    return bad


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """Two panels against step: training and validation loss; validation accuracy (and hallucination
    rate, where measured) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]

    def series(key):
        return [(r["step"], r[key]) for r in records if key in r]

    train, valid = series("loss"), series("eval_loss")
    accuracy, hallucination = series("eval_accuracy"), series("eval_hallucination_rate")
    figure, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        losses.plot(*zip(*train, strict=True), label="train loss")
    if valid:
        losses.plot(*zip(*valid, strict=True), marker="o", label="validation loss")
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("loss (answer tokens)")
    losses.set_yscale("log")
    losses.grid(alpha=0.3)
    if train or valid:
        losses.legend()
    if accuracy:
        rates.plot(*zip(*accuracy, strict=True), marker="o", label="validation accuracy")
    if hallucination:
        rates.plot(*zip(*hallucination, strict=True), marker="x", label="hallucinated labels")
    rates.set_xlabel("optimizer step")
    rates.set_ylim(-0.02, 1.02)
    rates.grid(alpha=0.3)
    if accuracy or hallucination:
        rates.legend()
        rates.set_title("validation classification")
    else:
        rates.text(0.5, 0.5, "no validation classification\n(training.eval_steps)", ha="center", va="center")
    figure.tight_layout()
    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
