import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import set_args, tiny_config
from safetensors.torch import load_file

from pixtral_lora.config.schema import ConfigError
from pixtral_lora.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _train_cli(*args, env=None):
    return [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "tiny.yaml"), *args]


def _sets(model_dir, data_dir, out, *extra):
    values = [
        f"model.name_or_path={model_dir}",
        f"data.path={data_dir}",
        f"training.output_dir={out}",
        "training.report_to=none",
        *extra,
    ]
    return set_args(*values)


def test_run_directory_has_everything_eval_and_export_need(tiny_run):
    adapter = tiny_run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "processor_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    split = json.loads((tiny_run / "split.json").read_text())
    assert split["class_names"] == ["Beach", "Desert", "Forest", "Port"]
    assert set(split["ids"]["test"]).isdisjoint(split["ids"]["train"] + split["ids"]["validation"])
    assert len(split["ids"]["test"]) == 40  # 25% of 160, stratified
    environment = json.loads((tiny_run / "environment.json").read_text())
    assert environment["versions"]["transformers"] and environment["seeds"] == {"training": 42, "split": 42}
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics) and any("loss" in m for m in metrics)
    assert (tiny_run / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["best_checkpoint"] is not None
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert any("language_model" in k and "q_proj.lora_A" in k for k in keys)
    assert not any("vision_tower" in k for k in keys)  # only when lora.train_vision_tower


def test_validation_accuracy_is_logged_at_eval_steps_and_picks_the_best_checkpoint(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    validation = json.loads((tiny_run / "split.json").read_text())["ids"]["validation"]
    last = json.loads((tiny_run / "train_summary.json").read_text())["global_step"]
    every = list(range(20, last + 1, 20))
    assert [r["step"] for r in evals] == every + ([last] if last not in every else [])  # each once
    for record in evals:  # score mode (the default): accuracy, macro-F1, unparseable rate, ECE, cost
        assert {"eval_accuracy", "eval_macro_f1", "eval_unparseable_rate", "eval_ece"} <= record.keys()
        assert record["eval_classified"] == len(validation) and record["eval_classification_seconds"] > 0
        assert "eval_hallucination_rate" not in record  # measured in generate mode only
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["metric_for_best_model"] == "eval_accuracy"
    best = max(r["eval_accuracy"] for r in evals)
    assert summary["best_metric"] == pytest.approx(best)
    first_best = next(r["step"] for r in evals if r["eval_accuracy"] == best)
    assert summary["best_checkpoint"].endswith(f"checkpoint-{first_best}")


def test_tiny_model_learns_the_scenes_from_chance_to_above_90_percent(tiny_run):
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run

    out = evaluate_run(tiny_run, EvalOptions(modes=["generate"]))
    report = json.loads((out / "report.json").read_text())["results"]
    base, tuned = report["base"]["generate"], report["finetuned"]["generate"]
    assert tuned["n"] == base["n"] == 40
    assert tuned["accuracy"] >= 0.9, tuned
    assert base["accuracy"] <= 0.5, base  # a random model does not know the scenes


def test_answer_only_loss_equals_the_models_own_loss(tiny_model_dir, processor, aid_dir):
    from pixtral_lora.data.loaders import load_aid_folder, to_conversations
    from pixtral_lora.model.loading import load_model
    from pixtral_lora.model.render import Renderer, TrainingCollator, render_dataset
    from pixtral_lora.task.prompt import PromptConfig
    from pixtral_lora.training.recipe import _answer_only_trainer_class

    model = load_model(tiny_model_dir, device="cpu")
    dataset = load_aid_folder(aid_dir).select(range(3))
    renderer = Renderer(processor, 64)
    batch = TrainingCollator(renderer)(
        list(
            render_dataset(
                renderer, to_conversations(dataset, PromptConfig(), ["Beach", "Desert", "Forest", "Port"])
            )
        )
    )
    trainer = object.__new__(_answer_only_trainer_class())  # compute_loss only needs these attributes
    trainer._metrics = {
        "train": __import__("collections").defaultdict(list),
        "eval": __import__("collections").defaultdict(list),
    }
    trainer.accelerator = type(
        "A", (), {"gather_for_metrics": staticmethod(lambda x: x), "num_processes": 1}
    )()
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        reference = model(**batch).loss  # transformers' own shifted cross-entropy over all label tokens
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bad_config_and_bad_data_fail_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import pixtral_lora.training.recipe as training

    monkeypatch.setattr(training, "load_training_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError, match="data.path: .*nowhere does not exist"):
        training.train(tiny_config(tiny_model_dir, tmp_path / "nowhere", tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        tiny_config(tiny_model_dir, tmp_path, tmp_path / "run", "training.learning_rat=1")
    result = subprocess.run(_train_cli("--set", "lora.r=0"), capture_output=True, text=True, cwd=ROOT)
    assert (
        result.returncode == 2 and "lora.r" in result.stderr and "greater than or equal to 1" in result.stderr
    )


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_4bit_path_trains_on_cpu(tiny_model_dir, aid_dir, tmp_path, dtype):
    from pixtral_lora.training.recipe import train

    run = train(
        tiny_config(
            tiny_model_dir,
            aid_dir,
            tmp_path / "qlora",
            "model.quantization=4bit",
            f"model.dtype={dtype}",
            "training.max_steps=3",
            "training.eval_steps=null",
            "data.validation_size=0",
            "training.gradient_checkpointing=true",
            "training.logging_steps=1",
        )
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(
        "lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()
    )  # B starts at zero: it trained


def test_qlora_keeps_the_frozen_weights_in_their_loaded_dtype(tiny_model_dir, aid_dir, tmp_path):
    """No float32 copy of the weights that are not 4-bit (embeddings, LM head, vision tower): PEFT's
    prepare_model_for_kbit_training makes one, +3.3 GiB at the 12B shape, undone by bf16 autocast."""
    from peft import prepare_model_for_kbit_training

    from pixtral_lora.model.loading import load_model
    from pixtral_lora.training.recipe import load_training_model

    config = tiny_config(
        tiny_model_dir, aid_dir, tmp_path / "run", "model.quantization=4bit", "model.dtype=bfloat16"
    )
    ours = load_training_model(config, "cpu")
    peft_prepared = prepare_model_for_kbit_training(
        load_model(tiny_model_dir, quantization="4bit", dtype="bfloat16", device="cpu")
    )

    def unquantized(model):
        return [p for p in model.parameters() if type(p).__name__ != "Params4bit"]

    def weight_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert not any(p.requires_grad for p in ours.parameters())  # the base is frozen
    # only the language model's linear layers are 4-bit: the vision tower, projector and LM head are not
    four_bit = [name for name, p in ours.named_parameters() if type(p).__name__ == "Params4bit"]
    assert four_bit and all(".language_model.layers." in name for name in four_bit)
    assert any("vision_tower" in name for name, _ in ours.named_parameters())
    assert {p.dtype for p in unquantized(ours)} == {torch.bfloat16}
    assert {p.dtype for p in unquantized(peft_prepared)} == {torch.float32}
    # the 4-bit weights are the same; PEFT's preparation doubles the bytes of every other one
    assert weight_bytes(peft_prepared) - weight_bytes(ours) == sum(p.numel() * 2 for p in unquantized(ours))


@pytest.mark.slow  # trains a model
def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, aid_dir, tmp_path):
    common = [
        "training.max_steps=8",
        "training.save_steps=4",
        "training.eval_steps=null",
        "data.validation_size=0",
        "training.logging_steps=1",
        "training.per_device_train_batch_size=4",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run(
        _train_cli(*_sets(tiny_model_dir, aid_dir, tmp_path / "straight", *common)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        _train_cli(*_sets(tiny_model_dir, aid_dir, killed_dir, *common)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "adapter").exists()  # the run really died before finishing

    resumed = subprocess.run(
        _train_cli(*_sets(tiny_model_dir, aid_dir, killed_dir, *common)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_rerun_with_a_different_config_is_refused(tiny_run, tiny_model_dir, learn_data_dir):
    from pixtral_lora.run.writer import RunDirError
    from pixtral_lora.training.recipe import train

    with pytest.raises(RunDirError, match="different config"):
        train(tiny_config(tiny_model_dir, learn_data_dir, tiny_run, "training.learning_rate=0.5"))


@pytest.mark.slow  # trains a model
def test_two_process_data_parallel_on_cpu(tiny_model_dir, aid_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "train" / "cpu_ddp.yaml"),
        str(ROOT / "train.py"),
        str(ROOT / "configs" / "tiny.yaml"),
        *_sets(
            tiny_model_dir,
            aid_dir,
            out,
            "training.max_steps=3",
            "training.eval_steps=3",
            "training.save_steps=3",
            "data.validation_size=0.2",
            "training.eval_classification.mode=generate",
            "training.logging_steps=1",
        ),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # 24 training images, 8 per process: one process needs 3 steps per epoch, two need 2 (the last short)
    ids = json.loads((out / "split.json").read_text())["ids"]
    assert len(ids["train"]) == 24 and state["epoch"] == pytest.approx(1.5)
    # each process classified a shard of the validation split; the gathered metrics cover all of it, once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(evals) == 1 and evals[0]["step"] == 3
    assert evals[0]["eval_classified"] == len(ids["validation"]) == 6
    assert 0 <= evals[0]["eval_hallucination_rate"] <= 1


@pytest.mark.slow  # trains a model twice
def test_two_processes_train_what_one_process_trains_at_the_same_global_batch(
    tiny_model_dir, aid_dir, tmp_path
):
    """1 process x batch 8 and 2 processes x batch 4 (train/cpu_ddp.yaml), seed 42, float32: the same
    per-step losses and grad norms and the same LoRA tensors. Three full steps of the 30 training images:
    the fourth batch is short (6), and accelerate's even_batches pads the second rank's half with samples
    from the start of the epoch, so a last short batch is the one step that differs (README)."""
    common = (
        "training.max_steps=3",
        "training.logging_steps=1",
        "training.warmup_ratio=0.0",
        "training.eval_steps=null",
        "training.save_steps=3",
        "data.validation_size=0.0",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    single = [
        sys.executable,
        str(ROOT / "train.py"),
        str(ROOT / "configs" / "tiny.yaml"),
        *_sets(tiny_model_dir, aid_dir, one, *common, "training.per_device_train_batch_size=8"),
    ]
    parallel = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "train" / "cpu_ddp.yaml"),
        str(ROOT / "train.py"),
        str(ROOT / "configs" / "tiny.yaml"),
        *_sets(tiny_model_dir, aid_dir, two, *common, "training.per_device_train_batch_size=4"),
    ]
    for command in (single, parallel):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    def steps(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r and "eval_loss" not in r]

    assert len(json.loads((one / "split.json").read_text())["ids"]["train"]) == 30
    assert json.loads((two / "split.json").read_text()) == json.loads((one / "split.json").read_text())
    logged_one, logged_two = steps(one), steps(two)
    assert [r["step"] for r in logged_one] == [r["step"] for r in logged_two] == [1, 2, 3]
    for a, b in zip(logged_one, logged_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    tensors_one = load_file(one / "adapter" / "adapter_model.safetensors")
    tensors_two = load_file(two / "adapter" / "adapter_model.safetensors")
    assert tensors_one.keys() == tensors_two.keys() and len(tensors_one) > 0
    assert any(
        "lora_B" in name and tensor.abs().max() > 1e-3 for name, tensor in tensors_one.items()
    )  # trained
    for name, tensor in tensors_one.items():
        torch.testing.assert_close(tensors_two[name], tensor, atol=1e-4, rtol=0, msg=name)


@pytest.mark.slow  # trains a model
def test_trains_and_evaluates_from_mistral_jsonl(tiny_model_dir, aid_dir, tmp_path):
    from pixtral_lora.data.loaders import export_mistral_jsonl, load_aid_folder, to_conversations
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run
    from pixtral_lora.task.prompt import PromptConfig
    from pixtral_lora.training.recipe import train

    classes = ["Beach", "Desert", "Forest", "Port"]
    dataset = load_aid_folder(aid_dir)
    export_mistral_jsonl(to_conversations(dataset, PromptConfig(), classes), tmp_path / "train.jsonl")
    with pytest.raises(DataError, match="need data.class_names"):
        train(tiny_config(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "run"))
    config = tiny_config(
        tiny_model_dir,
        tmp_path / "train.jsonl",
        tmp_path / "run",
        "data.class_names=[Beach, Desert, Forest, Port]",
        "training.max_steps=4",
        "training.eval_steps=null",
        "data.validation_size=0",
    )
    run = train(config)
    split = json.loads((run / "split.json").read_text())
    assert len(split["ids"]["test"]) == 10 and all(i.startswith("train.jsonl:") for i in split["ids"]["test"])
    out = evaluate_run(run, EvalOptions(modes=["constrained"], limit=4))
    report = json.loads((out / "report.json").read_text())["results"]["finetuned"]["constrained"]
    assert report["n"] == 4 and report["counts"]["hallucinated"] == 0


def test_lora_targets_follow_the_config(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from pixtral_lora.model.loading import load_model
    from pixtral_lora.training.recipe import peft_config

    def wrapped(*overrides):
        config = tiny_config(tiny_model_dir, tmp_path, tmp_path / "run", *overrides)
        model = get_peft_model(
            load_model(tiny_model_dir, quantization=None, device="cpu"), peft_config(config)
        )
        return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}

    language_only = wrapped("lora.train_projector=false")
    assert len(language_only) == 2 * 7 and all("language_model" in n for n in language_only)
    everything = wrapped("lora.train_projector=true", "lora.train_vision_tower=true")
    assert sum("vision_tower" in n for n in everything) == 2 * 7  # q,k,v,o + gate,up,down in 2 vision layers
    assert sum("multi_modal_projector" in n for n in everything) == 2
    assert len(everything) == 2 * 7 + 2 * 7 + 2


@pytest.mark.slow  # trains a model
def test_early_stopping_ends_a_run_that_stops_improving(tiny_model_dir, aid_dir, tmp_path):
    from pixtral_lora.training.recipe import train

    # a learning rate of ~0 cannot improve the validation loss: patience 1 stops after the 2nd evaluation
    run = train(
        tiny_config(
            tiny_model_dir,
            aid_dir,
            tmp_path / "stop",
            "training.learning_rate=1e-12",
            "training.max_steps=20",
            "training.eval_steps=2",
            "training.save_steps=2",
            "training.early_stopping_patience=1",
            "training.per_device_train_batch_size=4",
            "data.validation_size=0.15",
        )
    )
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert summary["best_checkpoint"].endswith("checkpoint-2")
