"""What vLLM serves is what `eval` measured: the tiny run through vLLM's own engine on the CPU.

    make serve-check        (installs vLLM's CPU build into .venv-vllm first; CI runs it)
    python scripts/serve_check.py --vllm-python .venv-vllm/bin/python [--work DIR] [--out FILE]

With the project's own commands it builds the tiny model and data, trains two runs (language model +
projector LoRA; and with vision-tower LoRA too), evaluates their held-out split with transformers
(`pixtral-lora eval`, generate mode) and exports them (`convert_to_mistral.py`: the base, the merged
run in float32 and bfloat16, and each adapter with --adapter-only). Then it starts vLLM's OpenAI server
on 127.0.0.1 (always stopped afterwards), sends the test split exactly as the README tells users
(the run's system prompt, each image resized as `predict` prepares it, a PNG data URI), and compares
vLLM's answers with eval's: the base, each adapter served as LoRA with the command its
`vllm_serve.sh` names, and both merged exports; then the same for the Mistral3 family's tiny model
(Mistral Small's shape: its base, its LoRA adapter, its merged export; Ministral 3's, with YaRN rope
and llama-4 attention scaling that mistral_inference cannot check: its merged export). A short load run sends the same requests from 4
concurrent clients and checks every answer against the sequential ones; its p50/p95 latency goes to
`benchmarks/results-serve-cpu.json` beside transformers' images/s on the same images. Any mismatch
fails the check, naming the image and both answers.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Beach", "Desert", "Forest", "Port"]
PORT = 8765
# A float32 merged export's answers must carry eval's log-probabilities to within this: measured here
# 8e-6 (Pixtral-12B's shape) and 9e-6 (Ministral 3's); Ministral 3's export with its YaRN block removed
# still gave all 40 answers equal, but a gap of 7e-4, which only this bound catches.
FLOAT32_LOGPROB_GAP = 1e-4
MODES = ("generate", "constrained", "score")
# score mode's probabilities, vLLM's prompt log-probabilities against transformers' forward (float32)
SCORE_PROBABILITY_GAP = 1e-4
VLLM_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str, cwd: Path = ROOT) -> str:
    """A project command (python ARGS) that must succeed; its stdout."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def train(work: Path, model: Path, data: Path, name: str, *extra: str) -> Path:
    out = work / "runs" / name
    sets = [f"model.name_or_path={model}", f"data.path={data}", f"training.output_dir={out}"]
    sets += ["training.report_to=none", "training.num_train_epochs=4", *extra]
    run("train.py", str(ROOT / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)])
    return out


def eval_answers(run_dir: Path, models: str) -> dict[str, dict[str, dict]]:
    """model -> image id -> eval's generate-mode prediction (answer, ...)."""
    out = run_dir / "eval-serve"
    run("-m", "pixtral_lora.cli", "eval", str(run_dir), "--modes", "generate", "--models", models,
        "--out", str(out), "--overwrite")  # fmt: skip
    answers: dict[str, dict[str, dict]] = {}
    for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers.setdefault(row["model"], {})[row["id"]] = row
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    answers["_speed"] = {m: report["results"][m]["generate"]["images_per_second"] for m in report["results"]}
    return answers


def vllm_eval_answers(vllm_python: str, run_dir: Path, *backend_args: str) -> dict[tuple[str, str], dict]:
    """(mode, image id) -> `pixtral-lora eval --backend vllm`'s fine-tuned prediction in every mode (its
    predictions.jsonl row), run in vLLM's environment."""
    out = run_dir / "eval-vllm-backend"
    command = [
        vllm_python,
        "-m",
        "pixtral_lora.cli",
        "eval",
        str(run_dir),
        "--backend",
        "vllm",
        "--models",
        "finetuned",
        "--modes",
        ",".join(MODES),
        *backend_args,
    ]
    result = subprocess.run(
        [*command, "--out", str(out), "--overwrite"], capture_output=True, text=True, env=VLLM_ENV
    )
    if result.returncode:
        raise SystemExit(f"failed: {shlex.join(command)}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {(row["mode"], row["id"]): row for row in rows}


def eval_modes(run_dir: Path) -> dict[tuple[str, str], dict]:
    """(mode, image id) -> the transformers eval's fine-tuned prediction in every mode."""
    out = run_dir / "eval-modes"
    run("-m", "pixtral_lora.cli", "eval", str(run_dir), "--modes", ",".join(MODES), "--models", "finetuned",
        "--out", str(out), "--overwrite")  # fmt: skip
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {(row["mode"], row["id"]): row for row in rows}


def speeds(run_dir: Path, report: str) -> dict[str, float]:
    """Images/s per mode of the fine-tuned model in an eval report under `run_dir` (the same images)."""
    results = json.loads((run_dir / report / "report.json").read_text(encoding="utf-8"))["results"][
        "finetuned"
    ]
    return {mode: round(results[mode]["images_per_second"], 2) for mode in MODES}


def uncalibrated(run_dir: Path, work: Path) -> Path:
    """A copy of the run without its calibration: what transformers gives for the merged weights,
    whose probabilities are raw (a merged export has no calibration of its own)."""
    from pixtral_lora.run.layout import CALIBRATION_FILE

    copy = work / f"{run_dir.name}-uncalibrated"
    shutil.copytree(
        run_dir, copy, ignore=shutil.ignore_patterns(CALIBRATION_FILE, "eval*"), dirs_exist_ok=True
    )
    return copy


def compare_modes(
    name: str, served: dict, expected: dict, skip: tuple[str, ...] = ()
) -> tuple[list[str], dict]:
    """Mismatch lines of vLLM's predictions against eval's, per mode: labels equal, score mode's
    (calibrated) probabilities within SCORE_PROBABILITY_GAP, constrained mode never hallucinating."""
    problems, found = [], {}
    for mode in MODES:
        keys = [k for k in expected if k[0] == mode and k[1] not in skip]
        differ = [k for k in keys if served.get(k, {}).get("label") != expected[k]["label"]]
        problems += [f"{name}, {mode}: {k[1]}: vLLM {served.get(k, {}).get('label')!r} != eval "
                     f"{expected[k]['label']!r}" for k in differ]  # fmt: skip
        found[mode] = {"labels_equal": len(keys) - len(differ), "images": len(keys)}
        if mode == "score":
            gap = max(
                abs(served[k]["confidence"] - expected[k]["confidence"]) for k in keys if k not in differ
            )
            found[mode]["largest_probability_gap"] = gap
            if gap > SCORE_PROBABILITY_GAP:
                problems.append(
                    f"{name}, score: a probability {gap:.2g} from eval's (> {SCORE_PROBABILITY_GAP})"
                )
            if {served[k]["calibrated"] for k in keys} != {expected[k]["calibrated"] for k in keys}:
                problems.append(f"{name}, score: vLLM's calibration differs from eval's")
        if mode == "constrained":
            hallucinated = sum(served[k]["outcome"] == "hallucinated" for k in keys)
            found[mode]["hallucinated"] = hallucinated
            problems += [f"{name}, constrained: {hallucinated} hallucinated"] if hallucinated else []
        print(f"  {name}, {mode}: {found[mode]}", flush=True)
    return problems, found


def vllm_command(vllm_python: str, *args: str) -> str:
    """`pixtral-lora ARGS` in vLLM's environment, which must succeed; its stdout."""
    result = subprocess.run([vllm_python, "-m", "pixtral_lora.cli", *args], capture_output=True, text=True,
                            env=VLLM_ENV, cwd=ROOT)  # fmt: skip
    if result.returncode:
        raise SystemExit(f"failed: pixtral-lora {shlex.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def check_predict_and_map(
    vllm_python: str, work: Path, run_dir: Path, base: Path, lora: Path
) -> tuple[list[str], dict]:
    """`predict` and `map` with `--backend vllm` (base + LoRA, score mode) against the same commands on
    transformers: the same labels, probabilities within SCORE_PROBABILITY_GAP, each row marked
    `backend: vllm`, and a rerun that resumes with every input already done; the same on vLLM replicas
    on Ray (a local cluster, 2 replicas)."""
    from pixtral_lora.run.reader import Run

    rows, _ = Run.open(run_dir).test_rows()
    listing = work / "predict-inputs.txt"
    listing.write_text("".join(f"{row['images'][0]['path']}\n" for row in rows), encoding="utf-8")
    backend = ["--backend", "vllm", "--vllm-base", str(base), "--vllm-lora", str(lora)]
    common = ["--run", str(run_dir), "--mode", "score"]
    run("-m", "pixtral_lora.cli", "predict", str(listing), *common, "--out", str(work / "predict-hf.jsonl"))
    vllm_command(
        vllm_python, "predict", str(listing), *common, *backend, "--out", str(work / "predict-vllm.jsonl")
    )
    rerun = vllm_command(vllm_python, "predict", str(listing), *common, *backend, "--out",
                         str(work / "predict-vllm.jsonl"))  # fmt: skip
    read = lambda name: [json.loads(line) for line in (work / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    ours, served = read("predict-hf.jsonl"), read("predict-vllm.jsonl")
    problems = [f"predict --backend vllm: {a['path']}: {b['label']!r} != {a['label']!r}"
                for a, b in zip(ours, served, strict=True) if a["label"] != b["label"]]  # fmt: skip
    gap = max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ours, served, strict=True))
    if gap > SCORE_PROBABILITY_GAP or {b["backend"] for b in served} != {"vllm"}:
        problems.append(
            f"predict --backend vllm: probability gap {gap:.2g}, backends { ({b['backend'] for b in served}) }"
        )
    # the same job as vLLM replicas on Ray: a local cluster on 127.0.0.1, 2 replicas, each its own engine
    vllm_command(vllm_python, "predict", str(listing), *common, *backend, "--batch-size", "8", "--ray-address",
                 "local", "--num-processes", "2", "--out", str(work / "predict-vllm-ray.jsonl"))  # fmt: skip
    on_ray = read("predict-vllm-ray.jsonl")
    problems += [f"predict --backend vllm on Ray (2 replicas): {a['path']}: {b['path']} {b['label']!r} != {a['label']!r}"
                 for a, b in zip(ours, on_ray, strict=True) if (a["path"], a["label"]) != (b["path"], b["label"])]  # fmt: skip
    ray_gap = max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ours, on_ray, strict=True))
    if ray_gap > SCORE_PROBABILITY_GAP:
        problems.append(f"predict --backend vllm on Ray (2 replicas): probability gap {ray_gap:.2g}")
    if f"({len(rows)} already done)" not in rerun:
        problems.append(f"predict --backend vllm, rerun: not every input resumed as done: {rerun.strip()}")
    scene = work / "scene.tif"
    run("-m", "pixtral_lora.cli", "data", "generate-scene", "--out", str(scene), "--grid", "2x2", "--tile", "64",
        "--classes", ",".join(CLASSES))  # fmt: skip
    tiles = ["--run", str(run_dir), "--tile", "64", "--mode", "score"]
    run("-m", "pixtral_lora.cli", "map", str(scene), *tiles, "--out", str(work / "map-hf.geojson"))
    vllm_command(vllm_python, "map", str(scene), *tiles, *backend, "--out", str(work / "map-vllm.geojson"))
    labels = [
        [f["properties"]["label"] for f in json.loads((work / name).read_text(encoding="utf-8"))["features"]]
        for name in ("map-hf.geojson", "map-vllm.geojson")
    ]
    if labels[0] != labels[1]:
        problems.append(f"map --backend vllm: tile labels {labels[1]} != map's {labels[0]}")
    found = {
        "predict_images": len(rows),
        "predict_labels_equal": sum(a["label"] == b["label"] for a, b in zip(ours, served, strict=True)),
        "predict_largest_probability_gap": gap,
        "predict_ray_2_replicas_labels_equal": sum(
            a["label"] == b["label"] for a, b in zip(ours, on_ray, strict=True)
        ),
        "predict_ray_2_replicas_largest_probability_gap": ray_gap,
        "map_tiles": len(labels[0]),
        "map_labels_equal": sum(a == b for a, b in zip(*labels, strict=True)),
    }
    print(f"  predict / map --backend vllm (base + LoRA, score): {found}", flush=True)
    return problems, found


def check_unreadable_counted(
    run_dir: Path, vllm_python: str, export: Path, expected: dict
) -> tuple[list[str], dict]:
    """`eval --backend vllm` in every mode with one test image made unreadable (restored after): that
    image is counted `unreadable` in each mode's predictions and report, and every other prediction
    equals eval's (`expected`: (mode, id) -> eval's row)."""
    from pixtral_lora.run.reader import Run

    rows, _ = Run.open(run_dir).test_rows()
    broken_id, broken = rows[0]["id"], Path(rows[0]["images"][0]["path"])
    original = broken.read_bytes()
    broken.write_bytes(b"not an image: the transformers path counts it as unreadable")
    try:  # --force: the run refuses a test split whose images changed since training, as this one has
        served = vllm_eval_answers(vllm_python, run_dir, "--merged", str(export), "--force")
    finally:
        broken.write_bytes(original)
    report = json.loads((run_dir / "eval-vllm-backend" / "report.json").read_text(encoding="utf-8"))
    problems = []
    for mode in MODES:
        counted = report["results"]["finetuned"][mode]["counts"]["unreadable"]
        unreadable = sorted(
            i for (m, i), row in served.items() if m == mode and row["outcome"] == "unreadable"
        )
        if unreadable != [broken_id] or counted != 1:
            problems.append(f"eval --backend vllm, {mode}: unreadable {unreadable} (report counts {counted}), "
                            f"expected [{broken_id!r}]")  # fmt: skip
    print(f"  eval --backend vllm: an unreadable image is counted in every mode: {not problems}", flush=True)
    found, results = compare_modes("eval --backend vllm, merged float32", served, expected, skip=(broken_id,))
    return problems + found, results


def requests_of(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(image id, OpenAI chat messages) for the run's test split, as the README tells users to send
    them: the run's system prompt and each image resized as predict prepares it, as a PNG data URI."""
    from pixtral_lora.run.reader import Run

    opened = Run.open(run_dir)
    renderer = opened.renderer()
    rows, _ = opened.test_rows()
    system = opened.config.prompt.messages(opened.class_names)[0]
    out = []
    for row in rows:
        image = renderer.load_images(row["images"])[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
        if system["role"] == "system":
            messages.insert(0, {"role": "system", "content": "".join(c["text"] for c in system["content"])})
        out.append((row["id"], messages))
    return out


class Server:
    """vLLM's OpenAI server on 127.0.0.1, started with `args` and always stopped on exit."""

    def __init__(self, vllm_python: str, model: Path, args: list[str], log: Path):
        command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        command += ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
        command += ["--host", "127.0.0.1", "--port", str(PORT), "--max-model-len", "2048", *args]
        self.command, self.log = command, log

    def __enter__(self):
        env = VLLM_ENV
        self.handle = open(self.log, "w")  # noqa: SIM115 (closed in __exit__)
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=self.handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        while time.perf_counter() - started < 300:
            if self.process.poll() is not None:
                raise SystemExit(f"vLLM exited at start ({self.process.returncode}): see {self.log}\n"
                                 + self.log.read_text()[-3000:])  # fmt: skip
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
                self.start_seconds = time.perf_counter() - started
                print(f"  vLLM up in {self.start_seconds:.0f} s: {shlex.join(self.command[3:])}", flush=True)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise SystemExit(f"vLLM did not start within 300 s: see {self.log}")

    def __exit__(self, *_):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.handle.close()

    def answer(self, model: str, messages: list[dict], max_tokens: int) -> tuple[str, list[float], float]:
        """Greedy answer, its tokens' log-probabilities, and the request's latency in seconds."""
        body = {
            "model": model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{PORT}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        choice = reply["choices"][0]
        logprobs = [t["logprob"] for t in (choice.get("logprobs") or {}).get("content") or []]
        return choice["message"]["content"], logprobs, time.perf_counter() - started


def compare(name: str, served: dict[str, str], expected: dict[str, dict]) -> list[str]:
    """Mismatch lines (empty when every served answer equals eval's)."""
    problems = [
        f"{name}: {image}: vLLM {served[image]!r} != eval {expected[image]['raw_answer']!r}"
        for image in expected
        if served.get(image) != expected[image]["raw_answer"]
    ]
    print(f"  {name}: {len(expected) - len(problems)}/{len(expected)} answers equal to eval's", flush=True)
    return problems


def lora_server_args(adapters: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """vLLM flags for serving these adapters (--adapter-only exports) on one base, as
    `pixtral-lora serve-command NAME=DIR ...` prints them (float32 added: the check's dtype), and the
    versioned name each adapter is served under."""
    command = run(
        "-m", "pixtral_lora.cli", "serve-command", *[f"{name}={path}" for name, path in adapters.items()]
    )
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["vllm", "serve", "BASE_MISTRAL_DIR"], command
    modules = words[words.index("--lora-modules") + 1 :]
    served = {name: next(m.split("=")[0] for m in modules if m.startswith(f"{name}-")) for name in adapters}
    return [*words[3:], "--dtype", "float32"], served


def merged_answers(
    server: Server, model: str, requests: list, expected: dict[str, dict], max_tokens: int
) -> tuple[dict[str, str], float]:
    """vLLM's answers for a merged export, and the largest gap between the log-probability vLLM gives an
    answer and the one eval measured for it (the finer check: equal answers alone would survive a small
    error in the rotary embedding)."""
    answers, worst = {}, 0.0
    for image, messages in requests:
        text, logprobs, _ = server.answer(model, messages, max_tokens)
        answers[image] = text
        if expected[image].get("confidence") and logprobs:
            # eval's answer probability includes </s>; vLLM's content log-probs stop before it
            worst = max(worst, abs(sum(logprobs) - math.log(expected[image]["confidence"])))
    return answers, worst


def check_mistral3(
    vllm_python: str, work: Path, data: Path, max_tokens: int, like: str, lora: bool
) -> tuple[list[str], dict]:
    """A Mistral3 tiny model (`tiny-model --family mistral3 --like LIKE`) through the same comparisons:
    its merged float32 export and, with `lora`, its base and its LoRA adapter (language model +
    projector; vLLM serves no merger LoRA, --adapter-only refuses one) on the base export."""
    print(f"the Mistral3 family, like {like}: tiny model, one run, its exports", flush=True)
    model = work / f"tiny-{like}"
    run("-m", "pixtral_lora.cli", "tiny-model", "--family", "mistral3", "--like", like, "--out", str(model))
    run_dir = train(work, model, data, like)
    expected = eval_answers(run_dir, "base,finetuned")
    convert, exports = str(ROOT / "scripts" / "convert_to_mistral.py"), work / f"exports-{like}"
    run(convert, "--model", str(model), "--adapter", str(run_dir / "adapter"), "--out", str(exports / "merged"),
        "--dtype", "float32")  # fmt: skip
    requests = requests_of(run_dir)
    changed = sum(
        expected["base"][i]["raw_answer"] != expected["finetuned"][i]["raw_answer"] for i, _ in requests
    )
    # the adapter must change answers, or serving it with the adapter silently dropped would pass too
    problems = (
        [] if changed else [f"{like}: the fine-tuned answers equal the base's; the check proves nothing"]
    )
    if lora:
        run(convert, "--model", str(model), "--out", str(exports / "base"), "--dtype", "float32")
        run(convert, "--model", str(model), "--adapter", str(run_dir / "adapter"), "--adapter-only",
            "--out", str(exports / "lora"))  # fmt: skip
        lora_args, served_as = lora_server_args({like: exports / "lora"})
        with Server(vllm_python, exports / "base", lora_args, work / f"vllm-{like}-lora.log") as server:
            for served_model, answers, label in (
                (str(exports / "base"), expected["base"], f"{like} base"),
                (served_as[like], expected["finetuned"], f"{like} LoRA: language model + projector"),
            ):
                served = {i: server.answer(served_model, m, max_tokens)[0] for i, m in requests}
                problems += compare(label, served, answers)
    results: dict = {}
    if lora:  # eval --backend vllm in every mode: the merged export and base + LoRA
        modes = eval_modes(run_dir)
        raw = eval_modes(uncalibrated(run_dir, work))  # the merged export's probabilities are raw
        for name, backend in (("merged float32", ["--merged", str(exports / "merged")]),
                              ("base + LoRA", ["--vllm-base", str(exports / "base"), "--vllm-lora", str(exports / "lora")])):  # fmt: skip
            served = vllm_eval_answers(vllm_python, run_dir, *backend)
            found, results[f"vllm_backend_{name}"] = compare_modes(
                f"{like} eval --backend vllm, {name}", served, raw if name.startswith("merged") else modes
            )
            problems += found
    with Server(vllm_python, exports / "merged", ["--dtype", "float32"], work / f"vllm-{like}.log") as server:
        served, gap = merged_answers(
            server, str(exports / "merged"), requests, expected["finetuned"], max_tokens
        )
        problems += compare(f"{like} merged float32", served, expected["finetuned"])
    results |= {"images": len(requests), "answers_changed_by_the_adapter": changed}
    results["merged_float32_largest_answer_logprob_gap"] = gap
    if gap > FLOAT32_LOGPROB_GAP:
        problems.append(
            f"{like} merged float32: answer log-probability {gap:.2g} from eval's (> {FLOAT32_LOGPROB_GAP})"
        )
    return problems, {**results, "transformers_images_per_second": expected["_speed"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", required=True, help="python of the virtualenv with vLLM's CPU build")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-serve-cpu.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    version = subprocess.run(
        [args.vllm_python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="serve-check-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        print("building the tiny model, data and two runs with the project's commands", flush=True)
        model, data = work / "tiny-pixtral", work / "aid-synthetic"
        run("-m", "pixtral_lora.cli", "tiny-model", "--out", str(model))
        run("-m", "pixtral_lora.cli", "data", "generate", "--out", str(data), "--per-class", "40", "--size", "64",
            "--classes", ",".join(CLASSES))  # fmt: skip
        text_run = train(work, model, data, "text")
        vision_run = train(work, model, data, "vision", "lora.train_vision_tower=true")
        expected = {
            "text": eval_answers(text_run, "base,finetuned"),
            "vision": eval_answers(vision_run, "finetuned"),
        }
        convert = str(ROOT / "scripts" / "convert_to_mistral.py")
        exports = work / "exports"
        run(convert, "--model", str(model), "--out", str(exports / "base"), "--dtype", "float32")
        for dtype in ("float32", "bfloat16"):
            run(convert, "--model", str(model), "--adapter", str(text_run / "adapter"),
                "--out", str(exports / f"text-{dtype}"), "--dtype", dtype)  # fmt: skip
        for name, run_dir in (("text", text_run), ("vision", vision_run)):
            run(convert, "--model", str(model), "--adapter", str(run_dir / "adapter"), "--adapter-only",
                "--out", str(exports / f"lora-{name}"))  # fmt: skip
        requests = {name: requests_of(r) for name, r in (("text", text_run), ("vision", vision_run))}
        max_tokens = 24  # configs/tiny.yaml eval.max_new_tokens
        problems: list[str] = []
        results: dict = {"vllm_cpu": version, "images": len(requests["text"])}

        # the base with both adapters as LoRA, with the flags each adapter's vllm_serve.sh names
        # two runs' adapters on one server, each chosen per request by its versioned name
        lora_args, served_as = lora_server_args(
            {"text": exports / "lora-text", "vision": exports / "lora-vision"}
        )
        results["served_adapter_names"] = served_as
        with Server(args.vllm_python, exports / "base", lora_args, work / "vllm-lora.log") as server:
            results["server_start_seconds"] = server.start_seconds
            for served_model, requests_name, expected_answers, label in (
                (str(exports / "base"), "text", expected["text"]["base"], "base"),
                (
                    served_as["text"],
                    "text",
                    expected["text"]["finetuned"],
                    "LoRA: language model + projector",
                ),
                (served_as["vision"], "vision", expected["vision"]["finetuned"], "LoRA: + vision tower"),
            ):
                served = {
                    i: server.answer(served_model, m, max_tokens)[0] for i, m in requests[requests_name]
                }
                problems += compare(label, served, expected_answers)
            # a short load: 4 concurrent clients, the LoRA model, every answer as in the sequential run
            sequential = {i: server.answer(served_as["text"], m, max_tokens) for i, m in requests["text"]}
            load = [(i, m) for i, m in requests["text"]] * 3
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                answered = list(
                    pool.map(
                        lambda item: (item[0], *server.answer(served_as["text"], item[1], max_tokens)), load
                    )
                )
            wall = time.perf_counter() - started
            differing = [i for i, text, _, _ in answered if text != sequential[i][0]]
            problems += [f"load: {i}: a concurrent answer differs from the sequential one" for i in differing]
            latencies = sorted(seconds for _, _, _, seconds in answered)
            results["load"] = {
                "clients": 4,
                "requests": len(load),
                "equal_to_sequential": len(load) - len(differing),
                "p50_seconds": latencies[len(latencies) // 2],
                "p95_seconds": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                "requests_per_second": len(load) / wall,
            }
            print(f"  load: {results['load']}", flush=True)
        for dtype in ("float32", "bfloat16"):
            with Server(args.vllm_python, exports / f"text-{dtype}", ["--dtype", dtype],
                        work / f"vllm-{dtype}.log") as server:  # fmt: skip
                served_answers, worst = merged_answers(
                    server,
                    str(exports / f"text-{dtype}"),
                    requests["text"],
                    expected["text"]["finetuned"],
                    max_tokens,
                )
                problems += compare(f"merged {dtype}", served_answers, expected["text"]["finetuned"])
                results[f"merged_{dtype}_largest_answer_logprob_gap"] = worst
                if dtype == "float32" and worst > FLOAT32_LOGPROB_GAP:
                    problems.append(f"merged float32: answer log-probability {worst:.2g} from eval's")
        # pixtral-lora eval --backend vllm, in vLLM's environment: a merged export, and base + LoRA
        # (one test image unreadable: counted, as the transformers path counts it)
        # in every mode: generate, constrained (0 hallucinated), score (probabilities to 1e-4)
        modes = {"text": eval_modes(text_run), "vision": eval_modes(vision_run)}
        found, results["vllm_backend_merged_float32"] = check_unreadable_counted(
            text_run, args.vllm_python, exports / "text-float32", eval_modes(uncalibrated(text_run, work))
        )
        problems += found
        results["images_per_second_text_run"] = {
            "transformers": speeds(text_run, "eval-modes"),
            "vllm_merged_float32": speeds(text_run, "eval-vllm-backend"),
        }
        served = vllm_eval_answers(args.vllm_python, vision_run, "--vllm-base", str(exports / "base"),
                                   "--vllm-lora", str(exports / "lora-vision"))  # fmt: skip
        found, results["vllm_backend_lora_vision"] = compare_modes(
            "eval --backend vllm, base + LoRA (vision tower)", served, modes["vision"]
        )
        problems += found
        results["images_per_second_vision_run"] = {
            "transformers": speeds(vision_run, "eval-modes"),
            "vllm_base_lora": speeds(vision_run, "eval-vllm-backend"),
        }
        # predict and map on vLLM: base + the text run's LoRA, score mode with its calibration
        found, results["vllm_predict_map"] = check_predict_and_map(
            args.vllm_python, work, text_run, exports / "base", exports / "lora-text"
        )
        problems += found
        results["transformers_images_per_second"] = expected["text"]["_speed"]
        # the GPU check's vLLM stage (scripts/bench_engine.py) on the merged float32 export: one warm
        # engine, images/s per mode; here it proves the stage's code, the GPU gives the figures
        stage = subprocess.run(
            [args.vllm_python, str(ROOT / "scripts" / "bench_engine.py"), "--run", str(text_run), "--backend", "vllm", "--model",
             str(exports / "text-float32"), "--images", str(data), "--count", "40", "--out",
             str(work / "vllm-stage.json")], capture_output=True, text=True, env=VLLM_ENV, cwd=ROOT,
        )  # fmt: skip
        if stage.returncode:
            problems.append(f"scripts/bench_engine.py failed: {stage.stderr[-2000:]}")
        else:
            figures = json.loads((work / "vllm-stage.json").read_text(encoding="utf-8"))
            results["vllm_warm_engine_images_per_second"] = {m: figures[m]["images_per_s"] for m in MODES}
            if any(figures[m]["labelled"] != 40 for m in MODES):
                problems.append(f"scripts/bench_engine.py: not every image labelled: {figures}")
        # the Mistral3 family: Mistral Small's shape (base, LoRA, merged), Ministral 3's (YaRN, llama-4
        # attention scaling: its native export, merged) whose form only vLLM here can check
        for like, lora in (("mistral-small-3.2", True), ("ministral-3-8b", False)):
            found, results[like] = check_mistral3(args.vllm_python, work, data, max_tokens, like, lora)
            problems += found
        results["check_seconds"] = time.perf_counter() - began
    from pixtral_lora.outputs import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=1))
    if problems:
        print("\n".join(["serve check FAILED:", *problems[:40]]), file=sys.stderr)
        return 1
    print(f"serve check passed in {results['check_seconds']:.0f} s (vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
