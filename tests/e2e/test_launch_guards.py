"""Issue 27 §2: launches known to train wrong are refused before anything is loaded, in one line naming
the path that works; a run whose loss goes to 0.0 / NaN stops, saving nothing from the bad steps."""

import json
import os

from conftest import ROOT, one_line_error, run_command, set_args


def _sets(tiny_model_dir, data, run, *extra):
    return set_args(
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"training.output_dir={run}",
        "training.eval_steps=null",
        "data.validation_size=0",
        "data.test_size=0.3",
        "training.report_to=none",
        *extra,
    )


def test_an_fsdp1_launch_is_refused_naming_fsdp2(tiny_model_dir, aid_dir, tmp_path):
    # peft keeps only the adapters of modules FSDP1 did not nest: a run would save 4 of 32 tensors
    launch = ["-m", "accelerate.commands.launch", "--config_file", ROOT / "train" / "fsdp_cpu.yaml"]
    launch += ["--fsdp_version", "1", "train.py", ROOT / "configs" / "tiny.yaml"]
    for quantization in ("null", "4bit"):
        run = tmp_path / quantization
        refused = run_command(
            *launch, *_sets(tiny_model_dir, aid_dir, run, f"model.quantization={quantization}")
        )
        assert refused.returncode != 0  # each rank exits 2 with the line; torch's launcher then fails
        lines = [line for line in refused.stderr.splitlines() if "FSDP1" in line]
        assert lines and all(line == lines[0] for line in lines)  # one line (printed by each rank)
        assert "train/fsdp.yaml" in lines[0] and "4 of the tiny model's 32 tensors" in lines[0]
        assert not run.exists()


def test_zero3_with_4bit_is_refused_naming_zero2(tiny_model_dir, aid_dir, tmp_path):
    # what `accelerate launch` sets for a ZeRO-3 config
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    sets = _sets(tiny_model_dir, aid_dir, tmp_path / "run", "model.quantization=4bit")
    refused = run_command("train.py", ROOT / "configs" / "tiny.yaml", *sets, env=env)
    assert "cannot train this config" in one_line_error(refused)
    assert "ZeRO-2 with QLoRA" in refused.stderr and not (tmp_path / "run").exists()


def test_a_run_at_loss_zero_and_nan_grad_norm_stops_keeping_the_last_good_checkpoint(
    tiny_model_dir, aid_dir, tmp_path
):
    # float16 weights without loss scaling at a high learning rate: the loss logs 0 and the gradient
    # norm NaN from the third step on, the silent failure the guard is for
    run = tmp_path / "run"
    sets = _sets(
        tiny_model_dir, aid_dir, run, "model.dtype=float16", "training.learning_rate=0.9",
        "training.warmup_ratio=0", "training.per_device_train_batch_size=2", "training.max_steps=12",
        "training.logging_steps=1", "training.save_steps=1",
    )  # fmt: skip
    stopped = run_command("train.py", ROOT / "configs" / "tiny.yaml", *sets)
    line = one_line_error(stopped)
    assert "training stopped at step" in line and "float16" in line and "no adapter was written" in line
    logged = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    bad = [
        r["step"] for r in logged if "loss" in r and (r["loss"] == 0.0 or r["grad_norm"] != r["grad_norm"])
    ]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3))  # stop_after_bad_logs: 3 in a row
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert saved and max(saved) < bad[0] and f"checkpoint-{max(saved)}" in line
    assert not (run / "adapter").exists()
