"""The run configuration's schema: typed, validated sections (loaded from YAML by `yaml_loading`).

Errors name the file, the line and the key, and list what is allowed, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from pixtral_lora.errors import UserError
from pixtral_lora.families.pixtral import PIXTRAL_12B
from pixtral_lora.task.answers import class_name_problem
from pixtral_lora.task.prompt import PromptConfig

LANGUAGE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LanguageTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError):
    """An invalid configuration; the message says where and what to do."""


# ---------------------------------------------------------------------------------------------------
# Numbers: one set of constraints for config values and command-line options (`cli_number`)

Count = Annotated[int, Field(ge=1)]
NonNegativeCount = Annotated[int, Field(ge=0)]
Pixels = Annotated[int, Field(ge=16, le=100_000)]  # a tile, a stride, an image edge
ImageEdge = Annotated[int, Field(ge=16, le=1540)]  # Mistral3's max; the model's own max is checked on load
BatchSize = Annotated[int, Field(ge=1, le=1024)]  # past this, memory runs out before it helps
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def cli_number(kind: Any) -> Callable[[str], Any]:
    """An argparse `type=` that checks a command-line number against `kind` (one of the above):
    `--tile 0` is then one line naming the option and the allowed range, before anything runs."""
    import argparse

    adapter = TypeAdapter(kind)

    def parse(text: str):
        try:
            return adapter.validate_strings(text)
        except ValidationError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err.errors()[0]['msg'].lower()}") from None

    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    name_or_path: str = PIXTRAL_12B
    # "4bit": bitsandbytes NF4 + double quantisation (QLoRA). null: full precision (dtype).
    quantization: Literal["4bit"] | None = "4bit"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Attention kernel: sdpa (PyTorch's fused attention, any device), eager, or flash_attention_2
    # (pip install flash-attn; CUDA only).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class DataSection(_Section):
    # An AID-style folder (<root>/<ClassName>/*.jpg), a Mistral fine-tuning .jsonl or a .csv.
    path: str
    # Optional separate test set; otherwise a stratified split of `path`.
    test_path: str | None = None
    class_names: list[str] | None = None  # required for .jsonl/.csv classification data
    # Image paths in JSONL/CSV must resolve inside the data file's folder; list other folders to allow.
    allow_paths_outside: list[str] = Field(default_factory=list)
    test_size: float = Field(0.2, gt=0, lt=1)
    validation_size: float = Field(0.0, ge=0, lt=1)  # fraction of train held out for validation loss
    split_seed: int = 42
    # Longest image side after resizing, rounded to the 16-px patch (AID 600x600 -> 300 -> 304x304).
    image_longest_edge: ImageEdge | None = 300
    max_length: int = Field(2048, ge=32)
    limit_train: int | None = Field(None, ge=1)  # use only the first N training samples (smoke tests)
    # A file of sample ids to leave out of every split (one per line, `#` comments), e.g. the
    # `exclude.txt` of `pixtral-lora data audit`; an id the data does not have is an error.
    exclude: str | None = None
    # Before its model loads, training looks for exact and near twins across its split: `warn` (one
    # line, counts in data_report.json), `error` (a test image with a twin stops the run) or
    # `drop_test` (those test images are left out of the test split).
    leakage: Literal["warn", "error", "drop_test"] = "warn"
    # Multi-band / GeoTIFF tiles (needs `pip install -e '.[geo]'`): three bands, 1-based (EuroSAT-MS
    # true colour: [4, 3, 2]); stretch to 8 bits per image between percentiles, or fixed [low, high]
    # per band (the same mapping for every tile).
    bands: list[int] | None = None
    stretch: Literal["percentile"] | list[tuple[float, float]] = "percentile"
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)
    # HF datasets: columns by name; a dataset's own train/test splits are used as they are.
    image_column: str = "image"
    label_column: str = "label"
    use_dataset_splits: bool = True
    hub_config: str | None = None  # for hf://OWNER/NAME
    hub_revision: str | None = None
    # Prompt labels from folder names: "folder" keeps them as spelled (AID); "readable" splits words
    # at _, -, spaces and case changes ("dense_residential", "DenseResidential" -> "Dense Residential").
    # class_labels overrides single folders ("denseresidential": "Dense Residential").
    label_style: Literal["folder", "readable"] = "folder"
    class_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("class_names")
    @classmethod
    def _distinct_class_names(cls, value: list[str] | None) -> list[str] | None:
        if value and (problem := class_name_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _bands(self) -> DataSection:
        if self.bands is not None:
            if len(self.bands) != 3 or min(self.bands) < 1:
                raise ValueError("data.bands must name three bands, 1-based (e.g. [4, 3, 2])")
        if self.stretch != "percentile" and len(self.stretch) != len(self.bands or [1, 2, 3]):
            raise ValueError("data.stretch needs one [low, high] range per band")
        low, high = self.stretch_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError("data.stretch_percentiles must be [low, high] with 0 <= low < high <= 100")
        return self


class LoraSection(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Projections of the language model (what vLLM can serve as LoRA).
    target_modules: list[LanguageTarget] = Field(default_factory=lambda: list(LANGUAGE_TARGETS), min_length=1)
    train_vision_tower: bool = False  # also put LoRA on the vision encoder's attention/MLP
    train_projector: bool = False  # also put LoRA on the multimodal projector (linear_1, linear_2)
    # Mistral3 only: LoRA on the 2x2 patch merger too. Merged exports carry it; vLLM's LoRA serving maps
    # no adapter onto the merger, so --adapter-only refuses such an adapter (merge it instead).
    train_patch_merger: bool = False


class EvalClassificationSection(_Section):
    """Classification of the validation split at every training.eval_steps (same code as `eval`)."""

    enabled: bool = True
    mode: Literal["score", "constrained", "generate"] = "score"  # score: cheap and gives calibration
    limit: int | None = Field(None, ge=1)  # a fixed, stratified subsample of the validation split


class TrainingSection(_Section):
    output_dir: str = "runs/aid"
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1: num_train_epochs decides; 0 is refused (it would train a step)
    per_device_train_batch_size: BatchSize = 4
    per_device_eval_batch_size: BatchSize = 4
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 4
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)  # validation loss every N steps (needs data.validation_size)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    # logging steps in a row with a loss of exactly 0.0 or a non-finite loss/grad-norm that stop the
    # run (no checkpoint is saved from them); null: never stop
    stop_after_bad_logs: int | None = Field(3, ge=1)
    eval_classification: EvalClassificationSection = Field(default_factory=EvalClassificationSection)
    # What picks the best checkpoint and drives early stopping; default: eval_accuracy when the
    # validation split is classified, else eval_loss.
    metric_for_best_model: Literal["eval_accuracy", "eval_loss"] | None = None
    gradient_checkpointing: bool = True
    # "auto": paged 8-bit AdamW on CUDA (bitsandbytes), torch AdamW on CPU.
    optim: str = "auto"
    seed: int = 42
    dataloader_num_workers: int = Field(0, ge=0)
    report_to: list[str] | Literal["auto", "none"] = "auto"  # "auto": tensorboard when installed
    # Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the Llava/Mistral model by the
    # Trainer; CUDA only (pip install liger-kernel). The answer-only loss stays the recipe's own.
    use_liger_kernel: bool = False

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_steps 0 would still train a step: give -1 (epochs decide) or a count >= 1")
        return value


class EvalSection(_Section):
    batch_size: BatchSize = 8
    max_new_tokens: int = Field(32, ge=1)
    modes: list[Literal["generate", "constrained", "score"]] = Field(default_factory=lambda: ["generate"])
    strict: bool = False  # no label normalisation when parsing answers
    output_dir: str | None = None  # default: <run>/eval
    limit: int | None = Field(None, ge=1)  # evaluate only the first N test images


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.training.eval_steps and self.data.validation_size == 0:
            raise ValueError("training.eval_steps needs a validation split: set data.validation_size > 0")
        if self.training.early_stopping_patience and not self.training.eval_steps:
            raise ValueError("training.early_stopping_patience needs training.eval_steps")
        if (
            self.training.metric_for_best_model == "eval_accuracy"
            and not self.training.eval_classification.enabled
        ):
            raise ValueError(
                "training.metric_for_best_model: eval_accuracy needs training.eval_classification.enabled"
            )
        if self.training.eval_steps and self.training.save_steps % self.training.eval_steps:
            raise ValueError(
                f"training.save_steps ({self.training.save_steps}) must be a multiple of training.eval_steps "
                f"({self.training.eval_steps}) so the best checkpoint can be kept"
            )
        return self


def with_absolute_paths(config: Config) -> Config:
    """The config with every local path made absolute (hub ids and hf:// ids stay as they are).

    A run directory records this form, so `eval`, `predict` and `map` find the base model and the
    data from any working directory (a relative `artifacts/tiny-pixtral` also reads as a hub id).
    """
    import os

    def local(value: str | None, must_exist: bool = True) -> str | None:
        if value is None or value.startswith("hf://"):
            return value
        if must_exist and not Path(value).exists() and not any(ch in value for ch in "*?["):
            return value  # a hub id, or a mistake the preflight names
        return os.path.abspath(value)

    raw = config.model_dump(mode="json")
    raw["model"]["name_or_path"] = local(raw["model"]["name_or_path"])
    raw["data"]["path"] = local(raw["data"]["path"])
    raw["data"]["test_path"] = local(raw["data"]["test_path"])
    raw["data"]["allow_paths_outside"] = [local(p, False) for p in raw["data"]["allow_paths_outside"]]
    raw["training"]["output_dir"] = local(raw["training"]["output_dir"], False)
    raw["eval"]["output_dir"] = local(raw["eval"]["output_dir"], False)
    return Config.model_validate(raw)
