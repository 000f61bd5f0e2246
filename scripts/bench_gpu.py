"""One GPU check of a real model's shape, no download: training, evaluation, export, logits.

    python scripts/bench_gpu.py                 # one CUDA GPU, ~8 minutes -> benchmarks/results-gpu-12b.json
    python scripts/bench_gpu.py --model mistral-small-3.2   # the Mistral3 family (also ministral-3-8b)
    python scripts/bench_gpu.py --tiny          # the same code on the tiny shape (CPU; in the test suite)
    python scripts/bench_gpu.py --model mistral-small-3.2 --layers 1 ...   # full widths, 1+1 layers, CPU

`--model` picks the architecture (config.json fields of Pixtral-12B, Mistral Small 3.2 or Ministral 3
8B) and the training config (configs/aid.yaml, mistral_small_3_2_aid.yaml, ministral3_8b_aid.yaml).

1. QLoRA training at the model's AID config (4-bit NF4 base, batch 4 x 4, 300-px images, the 30-class
   prompt) for `--warmup` + `--steps` optimizer steps on a random-weight checkpoint of its shape:
   seconds per step and samples/s over the steps after warm-up, tokens/s, the CUDA allocator's peak
   (allocated and reserved), and model FLOPs utilisation from a stated count: 6 x N FLOPs per token,
   N the language model's parameters from the config (12.2e9 Pixtral-12B, 23.6e9 Mistral Small 3.2,
   8.5e9 Ministral 3 8B; forward 2N, input-gradient backward 2N, activation-checkpointing recompute
   2N; the frozen 4-bit base takes no weight gradients, LoRA's are negligible).
2. Evaluation images/s for generate, constrained and score modes at 30 classes on `--eval-images`.
3. Logits of a full-width checkpoint (all widths of the 12B shape, `--logit-layers` layers) in
   Mistral's reference code (`mistral_inference`, with xformers when installed, else plain PyTorch
   attention) against the HF model, after the same export.
4. Export of the merged 12B shape to Mistral's format: seconds and peak RSS (a fresh process).
   Then that export on vLLM (`scripts/bench_engine.py`, in `--vllm-python`): images/s per mode on
   `--eval-images` images, one warm engine (targets: 12B generate >= 50 images/s per H100, score >=
   0.8x generate); recorded as skipped, saying so, where vLLM is not installed.
5. Each speed option (`model.attn_implementation=flash_attention_2`, `training.use_liger_kernel`)
   whose package is installed: a short QLoRA run, s/step and VRAM beside the default's; recorded as
   skipped otherwise.
6. Sharded QLoRA (`train/fsdp_qlora.yaml`, FSDP2) on 2 GPUs at Mistral Small 3.2's shape: a 1-layer
   rehearsal, then the real depth where the disk holds its checkpoint; s/step and peak memory per GPU.
   With one GPU it is recorded as skipped, saying so; `--tiny` runs it on 2 CPU processes.

Each stage's figures (or its error and traceback) are written to the results file when it ends; a
failed stage does not stop the ones that do not depend on it, and the exit status is then 1.

Prints the figures beside the targets (one AID epoch <= 15 min on an H100, i.e. >= 9 samples/s;
peak VRAM <= 16 GB; each 2,000-image evaluation mode <= 2 min, i.e. >= 16.7 images/s).

What it needs: torch with CUDA, transformers, peft, accelerate (a bare CUDA machine's set) plus
trl, bitsandbytes, datasets, mistral-common, pydantic (wheels: `scripts/gpu_kit.sh`), pyyaml,
scikit-learn, matplotlib; mistral-inference for step 3 and liger-kernel for step 5 (each skipped with
the reason when absent). The project itself is used from `src/` (no install), so the machine's
transformers is the one under test.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Everything the check uses is local: a GPU machine without network must not wait on the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "src"))

from pixtral_lora.config.yaml_loading import load_config  # noqa: E402
from pixtral_lora.data.loaders import AID_CLASS_NAMES  # noqa: E402
from pixtral_lora.data.synth import SCENES, draw_scene  # noqa: E402
from pixtral_lora.families import by_shape, shape_names  # noqa: E402
from pixtral_lora.model.tiny import TinySizes, build_processor, model_config, write_tekken  # noqa: E402
from pixtral_lora.outputs import write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import stage_vllm  # noqa: E402

# --model (a family's released shape, `families`): its training config and results file
MODELS = {
    "pixtral-12b": ("aid.yaml", "results-gpu-12b.json"),
    "mistral-small-3.2": ("mistral_small_3_2_aid.yaml", "results-gpu-mistral-small-3.2.json"),
    "ministral-3-8b": ("ministral3_8b_aid.yaml", "results-gpu-ministral-3-8b.json"),
}
assert set(MODELS) == set(shape_names()), "every released shape needs its training config here"


def real_config(model: str) -> dict:
    """config.json of the released checkpoint `model` (its architecture fields)."""
    return by_shape(model).shapes[model][0]()


def parameters(config: dict) -> float:
    """Language-model parameters of a checkpoint from its config.json (embeddings, attention, MLP, an
    untied head): the N of the FLOPs count in the module docstring (12.2e9 for Pixtral-12B)."""
    text = config["text_config"]
    width, head = (
        text["hidden_size"],
        text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
    )
    attention = 2 * width * head * (text["num_attention_heads"] + text["num_key_value_heads"])
    layer = attention + 3 * width * text["intermediate_size"]
    return 2 * text["vocab_size"] * width + text["num_hidden_layers"] * layer


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, SXM
TARGETS = {"samples_per_s": 9.0, "peak_vram_gib": 16.0, "eval_images_per_s": 2000 / 120}


def write_random_checkpoint(
    out: Path, sizes: TinySizes | None, device: str, layers: int | None = None, model: str = "pixtral-12b"
):
    """A random-weight checkpoint of `model`'s shape (bf16 safetensors + processor, and for Mistral3
    its tekken.json); `layers` cuts the text depth."""
    from transformers import AutoModelForImageTextToText

    family = by_shape(model)
    real, version = family.shapes[model]
    config = model_config(family, sizes, real())
    if layers is not None:
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = min(layers, config.vision_config.num_hidden_layers)
    torch.manual_seed(0)
    with torch.device(device):  # built in bf16: 25 GB at the 12B shape, not 51 GB of float32 first
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tekken = write_tekken(out / "tekken.json", family, version) if version else None
    build_processor(family, tekken).save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_aid_sized_data(out: Path, per_class: int, size: int) -> None:
    painters = sorted(SCENES)
    for index, class_name in enumerate(AID_CLASS_NAMES):
        folder = out / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            draw_scene(painters[index % len(painters)], n, size, seed=index).save(
                folder / f"{class_name.lower()}_{n}.jpg", quality=90
            )


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step."""

        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepClock()


def tokens_per_sample(config, processor) -> int:
    from PIL import Image

    from pixtral_lora.model.render import Renderer

    renderer = Renderer(processor, config.data.image_longest_edge)
    image = renderer.load_images(
        [{"path": None, "bytes": _jpeg(Image.new("RGB", (600, 600), (90, 120, 60)))}]
    )
    return len(
        renderer.render(config.prompt.messages(AID_CLASS_NAMES, "MediumResidential"), image)["input_ids"]
    )


def _jpeg(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def prepare_inputs(tmp: Path, args, device: str) -> dict:
    """The random checkpoint (tmp/model) and AID-sized scenes (tmp/data) every training run uses."""
    start = time.perf_counter()
    write_random_checkpoint(
        tmp / "model", TinySizes() if args.tiny else None, device, args.layers, args.model
    )
    build_s = time.perf_counter() - start
    aid = load_config(ROOT / "configs" / MODELS[args.model][0])
    per_step = aid.training.per_device_train_batch_size * aid.training.gradient_accumulation_steps
    needed = (args.warmup + args.steps) * per_step / 0.78 + args.eval_images / 0.2
    # the stratified split puts every class in the test split: at least 1 / test_size images per class
    per_class = max(int(needed / len(AID_CLASS_NAMES)) + 2, math.ceil(1 / aid.data.test_size))
    write_aid_sized_data(tmp / "data", per_class, 600)
    return {"checkpoint_build_s": build_s}


def measure_training(
    tmp: Path, args, device: str, name: str = "run", overrides: tuple[str, ...] = (), steps: int | None = None
) -> tuple[dict, Path]:
    """QLoRA at the model's AID config for `args.warmup` + `steps` optimizer steps: the figures and the run."""
    from pixtral_lora.training.recipe import train

    steps = steps or args.steps
    config = load_config(
        ROOT / "configs" / MODELS[args.model][0],
        [
            f"model.name_or_path={tmp / 'model'}",
            f"data.path={tmp / 'data'}",
            f"training.output_dir={tmp / name}",
            f"training.max_steps={args.warmup + steps}",
            "training.eval_steps=null",
            "data.validation_size=0",
            "training.logging_steps=1",
            "training.save_steps=100000",
            "training.report_to=none",
            f"eval.limit={args.eval_images}",
            *(["model.dtype=float32"] if device == "cpu" else []),  # QLoRA (4-bit NF4) on a CPU too
            *overrides,
        ],
    )
    batch, accumulation = (
        config.training.per_device_train_batch_size,
        config.training.gradient_accumulation_steps,
    )
    clock = _step_clock()
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run_dir = train(config, resume="never", callbacks=[clock])
    times = clock.times[args.warmup - 1 :] if args.warmup else [clock.times[0], *clock.times]
    step_s = (times[-1] - times[0]) / max(1, len(times) - 1)
    samples_per_s = batch * accumulation / step_s
    from pixtral_lora.model.loading import load_processor

    tokens = tokens_per_sample(config, load_processor(tmp / "model"))
    flops_per_token = 6 * parameters(real_config(args.model))  # the real model's count, see the docstring
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)
    figures = {
        "quantization": config.model.quantization,
        "dtype": config.model.dtype,
        "attn_implementation": config.model.attn_implementation,
        "use_liger_kernel": config.training.use_liger_kernel,
        "warmup_steps": args.warmup,
        "measured_steps": steps,
        "per_device_batch": batch,
        "gradient_accumulation": accumulation,
        "seconds_per_optimizer_step": step_s,
        "samples_per_s": samples_per_s,
        "tokens_per_sample": tokens,
        "tokens_per_s": samples_per_s * tokens,
        "peak_vram_allocated_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "peak_vram_reserved_gib": torch.cuda.max_memory_reserved() / 2**30
        if torch.cuda.is_available()
        else None,
        "flops_per_token": flops_per_token,
        "mfu": samples_per_s * tokens * flops_per_token / peak if peak else None,
    }
    return figures, run_dir


def stage_training(tmp: Path, args, device: str) -> tuple[dict, Path]:
    built = prepare_inputs(tmp, args, device)
    figures, run_dir = measure_training(tmp, args, device)
    return {**built, **figures}, run_dir


def error_record(err: Exception) -> dict:
    """What the results file keeps of a failure (called inside the `except` that caught it)."""
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}


# The speed options of issue #12: package that provides it, config overrides, CUDA only.
SPEED_OPTIONS = {
    "flash_attention_2": ("flash_attn", ("model.attn_implementation=flash_attention_2",), True),
    "liger_kernel": ("liger_kernel", ("training.use_liger_kernel=true",), True),
}


def stage_speed_options(tmp: Path, args, device: str, baseline_step_s: float | None) -> dict:
    """A short QLoRA run per installed speed option (after `args.warmup`, 4 steps): s/step and VRAM."""
    import importlib.util

    results = {}
    for name, (package, overrides, cuda_only) in SPEED_OPTIONS.items():
        if cuda_only and device != "cuda":
            results[name] = {"skipped": "CUDA only"}
            continue
        if importlib.util.find_spec(package) is None:
            results[name] = {"skipped": f"{package} is not installed"}
            continue
        try:
            figures, _ = measure_training(tmp, args, device, f"run-{name}", overrides, min(args.steps, 4))
        except Exception as err:  # one option failing must not hide the other's figures
            results[name] = error_record(err)
            continue
        keys = (
            "seconds_per_optimizer_step",
            "samples_per_s",
            "peak_vram_allocated_gib",
            "peak_vram_reserved_gib",
        )
        results[name] = {key: figures[key] for key in keys}
        if baseline_step_s:
            results[name]["speedup_vs_default"] = baseline_step_s / figures["seconds_per_optimizer_step"]
    return results


SHARDED_SHAPE = "mistral-small-3.2"  # 24B: the first model that needs more than one 24-GB GPU for QLoRA


def stage_sharded(tmp: Path, args, device: str) -> dict:
    """FSDP2 + QLoRA (train/fsdp_qlora.yaml) on 2 GPUs at Mistral Small 3.2's shape: a 1-layer
    rehearsal, then the real depth where the disk holds its checkpoint; step time and peak memory per
    GPU. One GPU lent: said so, nothing run. --tiny: the same launch on 2 CPU processes (fsdp_cpu.yaml)."""
    gpus = torch.cuda.device_count()
    if device == "cuda" and gpus < 2:
        return {"skipped": f"{gpus} GPU lent: FSDP + QLoRA needs 2 (the first session with more runs it)"}
    launch_file = "fsdp_qlora.yaml" if device == "cuda" else "fsdp_cpu.yaml"
    depths = {"one_layer": 1}
    if device == "cuda" and not args.tiny:
        depths["real_depth"] = None
    figures: dict = {"launch": f"train/{launch_file}", "processes": 2, "shape": SHARDED_SHAPE}
    for name, layers in depths.items():
        model_dir = tmp / f"sharded-{name}"
        free_gib = shutil.disk_usage(tmp).free / 2**30
        if layers is None and free_gib < 1.2 * 2 * parameters(real_config(SHARDED_SHAPE)) / 2**30:
            figures[name] = {"skipped": f"{free_gib:.0f} GiB free: the bf16 checkpoint does not fit"}
            continue
        write_random_checkpoint(model_dir, TinySizes() if args.tiny else None, "cpu", layers, SHARDED_SHAPE)
        run = tmp / f"sharded-run-{name}"
        steps = args.warmup + args.steps
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "train" / launch_file),
            "--num_processes", "2", str(ROOT / "train.py"), str(ROOT / "configs" / MODELS[SHARDED_SHAPE][0]),
            *[arg for value in (
                f"model.name_or_path={model_dir}", f"data.path={tmp / 'data'}", f"training.output_dir={run}",
                f"training.max_steps={steps}", "training.eval_steps=null", "data.validation_size=0",
                "training.logging_steps=1", "training.save_steps=100000", "training.report_to=none",
                *(["model.dtype=float32"] if device == "cpu" else ["model.dtype=bfloat16"]),
            ) for arg in ("--set", value)],
        ]  # fmt: skip
        begun = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=child_environment(), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{name}: the sharded launch failed:\n{result.stderr[-3000:]}")
        summary = json.loads((run / "train_summary.json").read_text())
        runtime = next(
            r["train_runtime"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_runtime" in r
        )  # fmt: skip
        figures[name] = {
            "layers": layers or real_config(SHARDED_SHAPE)["text_config"]["num_hidden_layers"],
            "optimizer_steps": steps,
            "seconds_per_optimizer_step": runtime / steps,  # warm-up included
            "peak_gpu_memory_gib_per_process": summary["peak_gpu_memory_gib"],
            "wall_s": time.perf_counter() - begun,
        }
        shutil.rmtree(model_dir, ignore_errors=True)
    return figures


def stage_evaluation(run_dir: Path) -> dict:
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run

    out = evaluate_run(
        run_dir, EvalOptions(modes=["generate", "constrained", "score"], models=("finetuned",))
    )
    report = json.loads((out / "report.json").read_text())["results"]["finetuned"]
    return {mode: {"images": r["n"], "images_per_s": r["images_per_second"]} for mode, r in report.items()}


def child_environment() -> dict:
    """The environment for a child process: the project's src/ first, then the caller's PYTHONPATH
    (which may carry wheels installed beside the machine's own packages)."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


# Runs a script and reports its process's peak RSS (VmHWM) on stderr when it exits. Not ru_maxrss: a
# child of this process inherits at exec the high-water mark of the memory it was forked from (this
# whole benchmark's), so it would report that instead of the exporter's own peak.
PEAK_RSS_PROBE = """
import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nVmHWM_kB {peak}\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def stage_export(model_dir: Path, run_dir: Path, out: Path) -> dict:
    """Seconds and peak RSS of the exporter in a fresh process."""
    script = ROOT / "scripts" / "convert_to_mistral.py"
    command = [sys.executable, "-c", PEAK_RSS_PROBE, str(script), "--model", str(model_dir)]
    command += ["--adapter", str(run_dir / "adapter"), "--out", str(out)]
    start = time.perf_counter()
    # run() reads stderr while the child runs: its progress bar alone can fill a pipe's buffer
    child = subprocess.run(
        command, env=child_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"export failed: {child.stderr[-2000:]}")
    peak_kib = int(re.findall(r"VmHWM_kB (\d+)", child.stderr)[-1])
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "output_gib": size / 2**30}


def stage_logits(tmp: Path, args, device: str) -> dict:
    """HF logits vs mistral_inference's on the exported checkpoint, full width, `--logit-layers` deep."""
    try:
        import mistral_inference  # noqa: F401
    except ImportError:
        return {"skipped": "mistral-inference is not installed (pip install --no-deps mistral-inference)"}
    try:
        import xformers.ops.fmha  # noqa: F401

        attention = "xformers" if device == "cuda" else None
    except ImportError:
        attention = None
    if attention is None:  # xformers' kernels are CUDA-only: the tests' plain-PyTorch stand-in
        sys.path.insert(0, str(ROOT / "tests"))
        import xformers_standin

        xformers_standin.install()
        attention = "plain PyTorch attention (xformers not usable here)"
    from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_inference.cache import BufferCache
    from mistral_inference.transformer import Transformer
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from pixtral_lora.export.mistral import export_mistral
    from pixtral_lora.families import family_of

    sizes = TinySizes() if args.tiny else None
    write_random_checkpoint(tmp / "wide", sizes, device, layers=args.logit_layers, model=args.model)
    cell = family_of(tmp / "wide").image_cell
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    export_mistral(str(tmp / "wide"), tmp / "wide-mistral", dtype=str(dtype).removeprefix("torch."))
    params = json.loads((tmp / "wide-mistral" / "params.json").read_text())
    if "yarn" in params or "llama_4_scaling" in params:
        return {
            "skipped": "mistral_inference 1.6 has no YaRN rope or llama-4 attention scaling (Ministral 3); "
            "make serve-check compares vLLM's answers on this shape with eval's"
        }
    tokenizer = MistralTokenizer.from_file(str(tmp / "wide-mistral" / "tekken.json"))  # the export's own
    image = Image.new("RGB", (4 * cell, 3 * cell), (120, 80, 40))  # cell-aligned: every reader agrees
    request = ChatCompletionRequest(
        messages=[UserMessage(content=[ImageChunk(image=image), TextChunk(text="Which scene is this?")])]
    )
    encoded = tokenizer.encode_chat_completion(request)
    ids = torch.tensor(encoded.tokens, device=device)
    pixels = torch.tensor(encoded.images[0], dtype=dtype, device=device)
    hf = AutoModelForImageTextToText.from_pretrained(tmp / "wide", dtype=dtype).to(device).eval()
    with torch.inference_mode():
        hf_logits = hf(
            input_ids=ids[None],
            pixel_values=pixels[None],
            image_sizes=torch.tensor([pixels.shape[-2:]], device=device),
        ).logits[0]
    del hf
    reference = Transformer.from_folder(str(tmp / "wide-mistral"), device=device, dtype=dtype)
    config = reference.args
    cache = BufferCache(config.n_layers, 1, len(encoded.tokens), config.n_kv_heads, config.head_dim)
    cache.to(device=device, dtype=dtype)
    cache.reset()
    with torch.inference_mode():
        theirs = reference.forward(ids, seqlens=[len(encoded.tokens)], cache=cache, images=[pixels])
    difference = (hf_logits.float() - theirs.float()).abs().max().item()
    agree = (hf_logits.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {
        "layers": args.logit_layers,
        "attention": attention,
        "max_abs_logit_difference": difference,
        "argmax_agreement": agree,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps measured after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--logit-layers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny shape: checks the script without a GPU")
    parser.add_argument(
        "--layers",
        type=int,
        help="cut the trained model to this many text (and vision) layers: with the 12B widths, a CPU "
        "dry run of every stage at full width (slow; its speed figures mean nothing)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated stages to skip: evaluation,logits,export,vllm,speed_options,sharded",
    )
    parser.add_argument("--vllm-python", help="the Python with vLLM for the vllm stage (default: this one)")
    parser.add_argument("--model", choices=sorted(MODELS), default="pixtral-12b", help="the shape checked")
    parser.add_argument("--out", help="results file (default: benchmarks/results-gpu-<model>.json)")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / MODELS[args.model][1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and not args.layers and device != "cuda":
        print(
            f"error: the {args.model} check needs a CUDA GPU; --tiny runs the same code on a CPU, and "
            f"--layers N runs it at the {args.model} widths cut to N layers",
            file=sys.stderr,
        )
        return 2
    import transformers

    results: dict = {
        "benchmark": f"tiny {args.model} shape (script check)"
        if args.tiny
        else f"{args.model} shape, random weights (configs/{MODELS[args.model][0]})"
        + (f", cut to {args.layers} layers" if args.layers else ""),
        "model": args.model,
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
        },
        "targets": TARGETS,
        "reproduce": "python scripts/bench_gpu.py"
        + (f" --model {args.model}" if args.model != "pixtral-12b" else ""),
    }
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    failed: list[str] = []

    def stage(name, function, *arguments) -> None:
        """Runs one stage; its figures, or its error, go into the results file at once."""
        print(f"[{time.perf_counter() - started:5.0f} s] {name} ...", flush=True)
        begun = time.perf_counter()
        try:
            results[name] = function(*arguments)
        except Exception as err:  # recorded; the stages that do not depend on it still run
            failed.append(name)
            results[name] = error_record(err)
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        results.setdefault("stage_seconds", {})[name] = time.perf_counter() - begun
        results["total_s"] = time.perf_counter() - started
        write_json(args.out, results)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        trained: dict = {}

        def training() -> dict:
            figures, trained["run"] = stage_training(tmp, args, device)
            return figures

        stage("training", training)
        if "evaluation" not in skip and trained:
            stage("evaluation", stage_evaluation, trained["run"])
        if "logits" not in skip:  # before the export: cheap, and independent of training
            stage("logits", stage_logits, tmp, args, device)
            for folder in ("wide", "wide-mistral"):  # ~6 GB at full width, even after a failure: the
                shutil.rmtree(tmp / folder, ignore_errors=True)  # export stage needs the disk
        if "export" not in skip and trained:
            stage("export", stage_export, tmp / "model", trained["run"], tmp / "mistral")
        if "vllm" not in skip and "export" in results and "export" not in failed:  # the export served
            if device == "cuda":
                torch.cuda.empty_cache()  # vLLM sizes its cache by the memory free
            stage("vllm", stage_vllm, args.vllm_python, trained["run"], tmp / "mistral", tmp / "data",
                  args.eval_images, child_environment())  # fmt: skip
        if "export" not in skip and trained:
            for path in (tmp / "mistral").glob("*.safetensors"):
                path.unlink()  # the disk of a GPU machine holds one 12B copy beside the base, not two
        if "speed_options" not in skip and trained:  # last: the least needed figures
            baseline = results["training"].get("seconds_per_optimizer_step")
            stage("speed_options", stage_speed_options, tmp, args, device, baseline)
            options = results["speed_options"].values()
            if "speed_options" not in failed and any("error" in option for option in options):
                failed.append("speed_options")
        if "sharded" not in skip:  # after every stage that reads tmp/model: its disk goes to the 24B one
            shutil.rmtree(tmp / "model", ignore_errors=True)
            stage("sharded", stage_sharded, tmp, args, device)
    results["total_s"] = time.perf_counter() - started
    results["failed_stages"] = failed
    write_json(args.out, results)
    print_table(results)
    print(
        f"written to {args.out} in {results['total_s']:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def print_table(results: dict) -> None:
    training = results.get("training", {})
    rows = [
        ("training samples/s", training.get("samples_per_s"), f">= {TARGETS['samples_per_s']}"),
        (
            "peak VRAM GiB (allocated)",
            training.get("peak_vram_allocated_gib"),
            f"<= {TARGETS['peak_vram_gib']}",
        ),
        ("MFU", training.get("mfu"), ""),
    ]
    rows += [
        (f"eval {mode} images/s", r["images_per_s"], f">= {TARGETS['eval_images_per_s']:.1f}")
        for mode, r in results.get("evaluation", {}).items()
        if isinstance(r, dict) and "images_per_s" in r
    ]
    for name, option in results.get("speed_options", {}).items():
        if isinstance(option, dict) and "samples_per_s" in option:
            rows.append(
                (f"training samples/s, {name}", option["samples_per_s"], f">= {TARGETS['samples_per_s']}")
            )
    export = results.get("export", {})
    if "seconds" in export:
        rows.append(
            ("export seconds / peak RSS GiB", f"{export['seconds']:.0f} / {export['peak_rss_gib']:.1f}", "")
        )
    print(f"{'figure':<34}{'measured':>16}  target")
    for name, value, target in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{name:<34}{shown:>16}  {target}")
    print(json.dumps({k: v for k, v in results.get("logits", {}).items() if k != "traceback"}))


if __name__ == "__main__":
    sys.exit(main())
