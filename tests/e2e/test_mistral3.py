"""The Mistral3 family (Ministral 3, Mistral Small 3.x) on the same proofs as Pixtral-12B, on its tiny
model: training with live validation, every evaluation mode, predict, map, preview, and a native
export that equals PEFT's merge and that Mistral's reference code loads strictly with the HF logits."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, SYNTH_CLASSES, one_line_error, run_cli, run_command
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file


def test_training_validates_live_and_puts_lora_on_the_patch_merger(tiny_mistral3_run, tmp_path):
    metrics = [json.loads(line) for line in (tiny_mistral3_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in m for m in metrics)  # live validation accuracy, every eval_steps
    with safe_open(tiny_mistral3_run / "adapter" / "adapter_model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.model.multi_modal_projector.patch_merger.merging_layer.lora_A.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_1.lora_B.weight" in keys
    # the run keeps the family's own template: the class list sits between [SYSTEM_PROMPT] tokens
    template = (tiny_mistral3_run / "adapter" / "chat_template.jinja").read_text()
    assert "[SYSTEM_PROMPT]" in template
    # vLLM's LoRA serving maps nothing onto the merger: --adapter-only says so instead of dropping it
    line = one_line_error(run_command(ROOT / "scripts" / "convert_to_mistral.py", "--adapter-only", "--adapter",
                                      tiny_mistral3_run / "adapter", "--out", tmp_path / "lora"))  # fmt: skip
    assert "patch_merger.merging_layer" in line and "without --adapter-only" in line


def test_every_evaluation_mode_predict_and_map(tiny_mistral3_run, aid_dir, tmp_path):
    from pixtral_lora.data.synth import generate_scene_mosaic

    result = run_cli("eval", tiny_mistral3_run, "--modes", "generate,constrained,score",
                     "--models", "base,finetuned", "--limit", 8)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tiny_mistral3_run / "eval" / "report.json").read_text())
    for model in ("base", "finetuned"):
        assert set(report["results"][model]) == {"generate", "constrained", "score"}
        for mode in ("constrained", "score"):  # valid answers only: never a hallucinated class
            assert report["results"][model][mode]["n"] == 8
            assert report["results"][model][mode]["hallucination_rate"] == 0.0
    predicted = run_cli(
        "predict", aid_dir / "Beach", "--run", tiny_mistral3_run, "--out", tmp_path / "p.jsonl"
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["label"] for r in rows} <= set(SYNTH_CLASSES)

    scene = tmp_path / "scene.tif"
    generate_scene_mosaic(scene, SYNTH_CLASSES, grid=(2, 2), tile=56, seed=3)
    mapped = run_cli("map", scene, "--run", tiny_mistral3_run, "--out", tmp_path / "m.geojson", "--tile", 56)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert len(json.loads((tmp_path / "m.geojson").read_text())["features"]) == 4


def test_preview_counts_28_px_image_tokens(aid_dir):
    result = run_cli("data", "preview", aid_dir, "--family", "mistral3", "--image-longest-edge", 300)
    assert result.returncode == 0, result.stderr[-2000:]
    # 300 px rounds to 308 = 11 cells of 28 px: 11 rows of 11 [IMG] + one break/end each (Pixtral-12B:
    # 304 px, 19 rows of 19 + 1 = 380, about 3x as many)
    assert "132 image tokens" in result.stdout


@pytest.fixture(scope="module")
def exported(tiny_mistral3_dir, tiny_mistral3_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mistral3"
    result = run_command(ROOT / "scripts" / "convert_to_mistral.py", "--model", tiny_mistral3_dir,
                         "--adapter", tiny_mistral3_run / "adapter", "--out", out, "--dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_params_json_describes_the_patch_merger(exported, tiny_mistral3_dir):
    params = json.loads((exported / "params.json").read_text())
    vision = params["vision_encoder"]
    assert vision["patch_size"] == 14 and vision["image_size"] == 1540 and vision["spatial_merge_size"] == 2
    assert vision["mm_projector_id"] == "patch_merge" and vision["add_pre_mm_projector_layer_norm"] is True
    assert vision["adapter_bias"] is False
    assert (exported / "tekken.json").read_bytes() == (tiny_mistral3_dir / "tekken.json").read_bytes()
    with safe_open(exported / "consolidated.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert {"pre_mm_projector_norm.weight", "patch_merger.merging_layer.weight",
            "vision_language_adapter.w_in.weight", "output.weight"} <= keys  # fmt: skip
    assert not any(key.endswith(".bias") for key in keys)


def test_export_equals_peft_merge_rounded_once(exported, tiny_mistral3_dir, tiny_mistral3_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from pixtral_lora.export.names import current_hf_name, native_name, rotary_heads, unpermute_rotary
    from pixtral_lora.families import by_name

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_mistral3_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(tiny_mistral3_run / "adapter")).merge_and_unload()
    config = json.loads((tiny_mistral3_dir / "config.json").read_text())
    ours = load_file(exported / "consolidated.safetensors")
    expected = {}
    for key, value in merged.state_dict().items():
        name = native_name(key, by_name("mistral3"))
        heads = rotary_heads(name, config)
        expected[name] = unpermute_rotary(value, heads) if heads else value
    assert ours.keys() == expected.keys()
    worst = max((ours[k] - expected[k]).abs().max().item() for k in ours)
    assert worst < 1e-6
    merger = "patch_merger.merging_layer.weight"
    plain = {current_hf_name(k): v for k, v in load_file(tiny_mistral3_dir / "model.safetensors").items()}
    assert not torch.equal(
        ours[merger], plain["model.multi_modal_projector.patch_merger.merging_layer.weight"]
    )


def test_mistral_reference_code_loads_it_strictly_with_the_hf_logits(
    exported, tiny_mistral3_dir, tiny_mistral3_run
):
    import xformers_standin

    xformers_standin.install()
    from mistral_common.protocol.instruct.messages import ImageChunk, SystemMessage, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_inference.cache import BufferCache
    from mistral_inference.transformer import Transformer
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    reference = Transformer.from_folder(str(exported), device="cpu", dtype=torch.float32)  # strict=True
    tokenizer = MistralTokenizer.from_file(str(exported / "tekken.json"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    request = ChatCompletionRequest(messages=[
        SystemMessage(content="Classify the image: Beach; Desert; Forest; Port."),
        UserMessage(content=[ImageChunk(image=image), TextChunk(text="Which class?")]),
    ])  # fmt: skip
    encoded = tokenizer.encode_chat_completion(request)
    assert encoded.tokens[1] == 17  # [SYSTEM_PROMPT]
    ids = torch.tensor(encoded.tokens)
    args = reference.args
    cache = BufferCache(args.n_layers, 1, len(encoded.tokens), args.n_kv_heads, args.head_dim)
    cache.to(device="cpu", dtype=torch.float32)
    cache.reset()
    with torch.no_grad():
        theirs = reference.forward(ids, seqlens=[len(ids)], cache=cache,
                                   images=[torch.tensor(i) for i in encoded.images])  # fmt: skip
        hf = AutoModelForImageTextToText.from_pretrained(str(tiny_mistral3_dir), dtype=torch.float32)
        hf = PeftModel.from_pretrained(hf, str(tiny_mistral3_run / "adapter")).merge_and_unload().eval()
        pixels = torch.tensor(np.stack(encoded.images))
        ours = hf(
            input_ids=ids[None], pixel_values=pixels, image_sizes=torch.tensor([pixels.shape[2:]])
        ).logits[0]
    assert theirs.shape == ours.shape == (len(ids), 131072)
    assert (theirs - ours).abs().max().item() < 1e-4  # the tolerance of the Pixtral test
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_a_ministral3_language_model_exports_its_yarn_and_llama4_scaling(tmp_path):
    """Ministral 3's shape (`tiny-model --like ministral-3-8b`): params.json carries the YaRN and llama-4
    blocks vLLM's Mistral-format loader reads; mistral_inference (no YaRN) loads it strictly, which checks
    every name and shape; `make serve-check` compares vLLM's answers on it with eval's."""
    import xformers_standin

    xformers_standin.install()
    from mistral_inference.transformer import Transformer

    model, out = tmp_path / "ministral3", tmp_path / "export"
    built = run_cli("tiny-model", "--family", "mistral3", "--like", "ministral-3-8b", "--out", model)
    assert built.returncode == 0, built.stderr[-2000:]
    assert json.loads((model / "tekken.json").read_text())["config"]["version"] == "v13"
    result = run_command(ROOT / "scripts" / "convert_to_mistral.py", "--model", model, "--out", out,
                         "--dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    params = json.loads((out / "params.json").read_text())
    rope = json.loads((model / "config.json").read_text())["text_config"]["rope_parameters"]
    assert params["rope_theta"] == rope["rope_theta"] == 1e6
    assert params["yarn"] == {"factor": 16.0, "original_max_position_embeddings": 16384, "beta": 32.0,
                              "alpha": 1.0, "apply_scale": False}  # fmt: skip
    assert params["llama_4_scaling"] == {"original_max_position_embeddings": 16384, "beta": 0.1}
    Transformer.from_folder(str(out), device="cpu", dtype=torch.float32)  # load_state_dict(strict=True)


def _fp8_copy(model_dir, out, block=32):
    """The tiny Mistral3 as an FP8 checkpoint in the layout Ministral 3 Instruct ships: the language
    model's projections as float8_e4m3fn blocks with a `weight_scale_inv` per block, a
    quantization_config of quant_method fp8. Returns the dequantized values it stands for."""
    import shutil

    shutil.copytree(model_dir, out)
    state, stored, values = load_file(out / "model.safetensors"), {}, {}
    for key, value in state.items():
        if "language_model" in key and key.endswith("proj.weight"):
            rows, columns = value.shape
            blocks = value.reshape(rows // block, block, columns // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
            quantized = (blocks / scale[:, None, :, None]).reshape(rows, columns).to(torch.float8_e4m3fn)
            stored[key], stored[f"{key}_scale_inv"] = quantized, scale
            values[key] = (
                quantized.float().reshape(rows // block, block, columns // block, block)
                * scale[:, None, :, None]
            ).reshape(rows, columns)
        else:
            stored[key] = value
    from safetensors.torch import save_file

    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block],
                                     "modules_to_not_convert": ["vision_tower", "multi_modal_projector", "lm_head"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return values


def test_fp8_checkpoints_load_dequantized_and_dequantize_writes_a_bf16_copy(
    tiny_mistral3_dir, aid_dir, tmp_path
):
    from pixtral_lora.export.names import current_hf_name
    from pixtral_lora.model.loading import load_model

    fp8 = tmp_path / "fp8"
    values = _fp8_copy(tiny_mistral3_dir, fp8)
    model = load_model(fp8, quantization=None, dtype="float32", device="cpu")  # what LoRA training loads
    loaded = {current_hf_name(k): v for k, v in model.state_dict().items()}
    for key, value in values.items():
        assert torch.equal(loaded[current_hf_name(key)], value), key

    result = run_cli("dequantize", fp8, "--out", tmp_path / "bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config
    written = {current_hf_name(k): v for k, v in load_file(tmp_path / "bf16" / "model.safetensors").items()}
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert written[key].dtype == torch.bfloat16
    assert torch.equal(
        written[key], values["language_model.model.layers.0.self_attn.q_proj.weight"].bfloat16()
    )
    assert (tmp_path / "bf16" / "tekken.json").read_bytes() == (fp8 / "tekken.json").read_bytes()

    line = one_line_error(run_command(ROOT / "train.py", ROOT / "configs" / "tiny.yaml",
                                      "--set", f"model.name_or_path={fp8}", "--set", "model.quantization=4bit",
                                      "--set", f"data.path={aid_dir}", "--set", f"training.output_dir={tmp_path / 'r'}"))  # fmt: skip
    assert "FP8" in line and "pixtral-lora dequantize" in line
