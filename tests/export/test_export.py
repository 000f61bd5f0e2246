"""Export to Mistral's native format, proved against transformers' conversion and Mistral's own model."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixtral_lora.export.checkpoint import ExportError
from pixtral_lora.export.lora import LoraDeltas
from pixtral_lora.export.mistral import MISTRAL_KIND, export_mistral
from pixtral_lora.export.names import native_name, unpermute_rotary
from pixtral_lora.outputs import MARKER

ROOT = Path(__file__).resolve().parents[2]


# -- Native -> HF, as transformers' convert_pixtral_weights_to_hf does it (key table + rotary permutation).
def _permute_for_rope(value, n_heads, in_features):
    rows = value.shape[0]
    return (
        value.view(n_heads, rows // n_heads // 2, 2, in_features).transpose(1, 2).reshape(rows, in_features)
    )


_NATIVE_TO_HF = [
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wq\.weight",
        r"vision_tower.transformer.layers.\1.attention.q_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wk\.weight",
        r"vision_tower.transformer.layers.\1.attention.k_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wv\.weight",
        r"vision_tower.transformer.layers.\1.attention.v_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wo\.weight",
        r"vision_tower.transformer.layers.\1.attention.o_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.weight",
        r"vision_tower.transformer.layers.\1.feed_forward.gate_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.weight",
        r"vision_tower.transformer.layers.\1.feed_forward.down_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.weight",
        r"vision_tower.transformer.layers.\1.feed_forward.up_proj.weight",
    ),
    (r"vision_encoder\.(.*)", r"vision_tower.\1"),
    (r"vision_language_adapter\.w_in\.(.*)", r"multi_modal_projector.linear_1.\1"),
    (r"vision_language_adapter\.w_out\.(.*)", r"multi_modal_projector.linear_2.\1"),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"language_model.model.layers.\1.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"language_model.model.layers.\1.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"language_model.model.layers.\1.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"language_model.model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"language_model.model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"language_model.model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"language_model.model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"language_model.model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"language_model.model.layers.\1.input_layernorm.weight"),
    (r"tok_embeddings\.weight", r"language_model.model.embed_tokens.weight"),
    (r"output\.weight", r"language_model.lm_head.weight"),
    (r"norm\.weight", r"language_model.model.norm.weight"),
]


def native_to_hf(native, params):
    vision = params["vision_encoder"]
    out = {}
    for key, value in native.items():
        new = next(re.sub(f"^{p}$", r, key) for p, r in _NATIVE_TO_HF if re.fullmatch(p, key))
        if "vision" in key and ("q_proj" in new or "k_proj" in new):
            value = _permute_for_rope(value, vision["num_attention_heads"], vision["hidden_size"])
        elif "q_proj" in new:
            value = _permute_for_rope(value, params["n_heads"], params["dim"])
        elif "k_proj" in new:
            value = _permute_for_rope(value, params["n_kv_heads"], params["dim"])
        out[new] = value
    return out


def _merged_hf_state(model_dir, adapter):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    # the checkpoint layout transformers writes (legacy names), which its conversion script produces
    from pixtral_lora.export.names import current_hf_name

    state = model.state_dict()
    legacy = {}
    for key, value in state.items():
        name = current_hf_name(key)
        name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
        name = re.sub(r"^lm_head\.", "language_model.lm_head.", name)
        name = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", name)
        legacy[name] = value
    return legacy


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mistral"
    return export_mistral(str(tiny_model_dir), out, adapter=tiny_run / "adapter", dtype="float32")


def test_output_is_mistral_native(exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        MARKER,  # the dotfile naming what wrote the folder; vLLM and mistral_inference ignore it
        "consolidated.safetensors",
        "params.json",
        "tekken.json",
    ]
    assert json.loads((exported / MARKER).read_text())["kind"] == MISTRAL_KIND
    params = json.loads((exported / "params.json").read_text())
    assert params["vision_encoder"]["image_token_id"] == 10
    assert (
        params["vision_encoder"]["image_break_token_id"] == 12
        and params["vision_encoder"]["image_end_token_id"] == 13
    )
    assert params["vision_encoder"]["adapter_bias"] is True
    assert params["max_position_embeddings"] == 1024000  # Pixtral-12B's; vLLM reads the context length here
    with safe_open(exported / "consolidated.safetensors", "pt") as handle:
        keys = set(handle.keys())
    for key in (
        "tok_embeddings.weight",
        "norm.weight",
        "output.weight",
        "layers.1.attention.wk.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "vision_encoder.patch_conv.weight",
        "vision_encoder.ln_pre.weight",
        "vision_encoder.transformer.layers.1.attention.wq.weight",
        "vision_language_adapter.w_in.bias",
        "vision_language_adapter.w_out.weight",
    ):
        assert key in keys, key
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    assert (
        MistralTokenizer.from_file(str(exported / "tekken.json")).instruct_tokenizer.tokenizer.n_words
        == 131072
    )


def test_round_trip_through_transformers_conversion_equals_the_merged_model(
    exported, tiny_run, tiny_model_dir
):
    params = json.loads((exported / "params.json").read_text())
    back = native_to_hf(load_file(exported / "consolidated.safetensors"), params)
    merged = _merged_hf_state(tiny_model_dir, tiny_run / "adapter")
    assert back.keys() == merged.keys()
    for key in merged:
        assert torch.allclose(back[key], merged[key], atol=1e-6), key


def test_merge_is_w_plus_b_a_alpha_over_r_on_the_right_rows(exported, tiny_run, tiny_model_dir, tmp_path):
    base = export_mistral(str(tiny_model_dir), tmp_path / "base", dtype="float32")
    merged, plain = (
        load_file(exported / "consolidated.safetensors"),
        load_file(base / "consolidated.safetensors"),
    )
    adapter = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    config = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    prefix = "base_model.model.model.language_model.layers.1.self_attn.k_proj"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * scale
    expected = unpermute_rotary(delta, 2)  # k_proj: 2 key-value heads, back to Mistral's row order
    assert torch.allclose(
        merged["layers.1.attention.wk.weight"] - plain["layers.1.attention.wk.weight"], expected, atol=1e-6
    )
    prefix = "base_model.model.model.multi_modal_projector.linear_2"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * scale
    assert torch.allclose(
        merged["vision_language_adapter.w_out.weight"] - plain["vision_language_adapter.w_out.weight"],
        delta,
        atol=1e-6,
    )
    untouched = [
        k
        for k in merged
        if k.startswith("vision_encoder.") or k.endswith("norm.weight") or k == "output.weight"
    ]
    assert untouched and all(torch.equal(merged[k], plain[k]) for k in untouched)
    assert delta.abs().max() > 0


def test_logits_match_mistral_reference_implementation(exported, tiny_run, tiny_model_dir):
    """OUT loads with strict=True into mistral_inference's Transformer; logits equal the HF model's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import xformers.ops.fmha  # noqa: F401

        usable = device == "cuda"
    except ImportError:
        usable = False
    if not usable:
        import xformers_standin

        xformers_standin.install()
    from mistral_common.protocol.instruct.messages import ImageChunk, SystemMessage, TextChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_inference.cache import BufferCache
    from mistral_inference.transformer import Transformer
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    reference = Transformer.from_folder(
        str(exported), device=device, dtype=torch.float32
    )  # load_state_dict(strict=True)
    tokenizer = MistralTokenizer.from_file(str(exported / "tekken.json"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content="Classify the image: Beach; Desert; Forest; Port."),
            UserMessage(content=[ImageChunk(image=image), TextChunk(text="Which class?")]),
        ]
    )
    encoded = tokenizer.encode_chat_completion(request)
    ids = torch.tensor(encoded.tokens, device=device)
    args = reference.args
    cache = BufferCache(args.n_layers, 1, len(encoded.tokens), args.n_kv_heads, args.head_dim)
    cache.to(device=device, dtype=torch.float32)
    cache.reset()
    with torch.no_grad():
        theirs = reference.forward(
            ids,
            seqlens=[len(encoded.tokens)],
            cache=cache,
            images=[torch.tensor(i, device=device) for i in encoded.images],
        )
        hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        hf = PeftModel.from_pretrained(hf, str(tiny_run / "adapter")).merge_and_unload().eval().to(device)
        pixels = torch.tensor(np.stack(encoded.images), device=device)
        ours = hf(
            input_ids=ids[None],
            pixel_values=pixels,
            image_sizes=torch.tensor([pixels.shape[2:]], device=device),
        ).logits[0]
    assert theirs.shape == ours.shape == (len(encoded.tokens), 131072)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_both_hf_key_layouts_are_accepted(tiny_model_dir, tmp_path, exported, tiny_run):
    current = tmp_path / "current-layout"
    shutil.copytree(tiny_model_dir, current)
    state = load_file(current / "model.safetensors")
    from pixtral_lora.export.names import current_hf_name

    renamed = {current_hf_name(k): v for k, v in state.items()}
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, current / "model.safetensors", metadata={"format": "pt"})
    # a re-saved base is other files than the one the adapter was trained on: --force says it is the same
    out = export_mistral(
        str(current), tmp_path / "out", adapter=tiny_run / "adapter", dtype="float32", force=True
    )
    a, b = load_file(out / "consolidated.safetensors"), load_file(exported / "consolidated.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_mid_write_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    import pixtral_lora.export.mistral as export

    calls = []
    real = export.unpermute_rotary

    def crash_on_the_third_rotary_weight(weight, heads):
        calls.append(1)
        if len(calls) == 3:  # consolidated.safetensors is half written by now
            raise OSError("disk full")
        return real(weight, heads)

    monkeypatch.setattr(export, "unpermute_rotary", crash_on_the_third_rotary_weight)
    with pytest.raises(OSError, match="disk full"):
        export_mistral(str(tiny_model_dir), tmp_path / "out")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_unknown_weights_and_bad_adapters_are_errors(tmp_path):
    with pytest.raises(ExportError, match="no native name"):
        native_name("model.language_model.layers.0.self_attn.q_norm.weight")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    )
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="use_dora"):
        LoraDeltas(tmp_path)


def test_convert_script_formats(tiny_run, tiny_model_dir, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "convert_to_mistral.py")]
    result = subprocess.run(
        [
            *script,
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run / "adapter"),
            "--out",
            str(tmp_path / "hf"),
            "--format",
            "hf",
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    merged = _merged_hf_state(tiny_model_dir, tiny_run / "adapter")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.allclose(written[k], merged[k]) for k in merged)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # --adapter-only: what vLLM's Mistral-format Pixtral loads with --enable-lora. The tiny run has
    # language-model and projector LoRA; both are served there.
    result = subprocess.run(
        [*script, "--adapter", str(tiny_run / "adapter"), "--adapter-only", "--out", str(tmp_path / "lora")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    source = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    assert len(written) == len(source)
    # it records the training adapter it came from: the run's calibration applies to it as served
    from pixtral_lora.export.vllm_adapter import source_sha256
    from pixtral_lora.run.reader import file_sha256

    assert source_sha256(tmp_path / "lora") == file_sha256(tiny_run / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "linear_1",
        "linear_2",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    # which module each key reaches in vLLM's model is proved by vLLM itself: `make serve-check`
    # serves this adapter and gets eval's answers
    assert (
        "--enable-tower-connector-lora" in (tmp_path / "lora" / "vllm_serve.sh").read_text()
    )  # projector LoRA
    # vision-tower LoRA is exported with its q/k lora_B rows in Mistral's interleaved rotary order: the
    # LoRA update vLLM computes from the written factors is what the merged native export adds
    with_vision = tmp_path / "with-vision"
    with_vision.mkdir()
    vision = "base_model.model.model.vision_tower.transformer.layers.0.attention.q_proj"
    generator = torch.Generator().manual_seed(0)
    factors = {
        f"{vision}.lora_A.weight": torch.randn(16, 64, generator=generator),
        f"{vision}.lora_B.weight": torch.randn(64, 16, generator=generator),
    }
    save_file({**source, **factors}, with_vision / "adapter_model.safetensors")
    for name in ("adapter_config.json", "base_model.json"):
        shutil.copy(tiny_run / "adapter" / name, with_vision)
    result = subprocess.run(
        [*script, "--adapter", str(with_vision), "--adapter-only", "--out", str(tmp_path / "lora2")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--max-lora-rank 16" in result.stdout and "--enable-tower-connector-lora" in result.stdout
    written = load_file(tmp_path / "lora2" / "adapter_model.safetensors")
    base = export_mistral(str(tiny_model_dir), tmp_path / "base-native", dtype="float32")
    merged = export_mistral(
        str(tiny_model_dir), tmp_path / "vision-native", adapter=with_vision, dtype="float32"
    )
    key = "vision_encoder.transformer.layers.0.attention.wq.weight"
    added = (
        load_file(merged / "consolidated.safetensors")[key]
        - load_file(base / "consolidated.safetensors")[key]
    )
    served = 2.0 * written[f"{vision}.lora_B.weight"] @ written[f"{vision}.lora_A.weight"]  # alpha / r = 2
    assert torch.allclose(served, added, atol=1e-5)
    assert not torch.allclose(factors[f"{vision}.lora_B.weight"], written[f"{vision}.lora_B.weight"])


def test_large_exports_are_sharded_with_an_index(tiny_model_dir, exported, tiny_run, tmp_path):
    out = export_mistral(
        str(tiny_model_dir),
        tmp_path / "sharded",
        adapter=tiny_run / "adapter",
        dtype="float32",
        max_shard_bytes=20 * 2**20,
    )
    index = json.loads((out / "consolidated.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) >= 3 and all(
        re.fullmatch(r"consolidated-\d{5}-of-\d{5}\.safetensors", s) for s in shards
    )
    assert not (out / "consolidated.safetensors").exists()
    single = load_file(exported / "consolidated.safetensors")
    joined = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    assert joined.keys() == single.keys() == index["weight_map"].keys()
    assert all(torch.equal(joined[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in single.values())


def test_serve_command_serves_several_adapters_under_versioned_names(tiny_run, tmp_path):
    """`pixtral-lora serve-command` for two --adapter-only exports: one vllm serve line, each adapter
    named NAME-<its training adapter's sha256, 8 hex> (a retrained adapter gets a new name), room for
    both in a batch; what is not an --adapter-only export, or adapters of different bases, refused."""
    from pixtral_lora.run.reader import file_sha256

    lora = tmp_path / "runs" / "aid" / "lora"
    exported = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_to_mistral.py"), "--adapter", str(tiny_run / "adapter"),
         "--adapter-only", "--out", str(lora)], capture_output=True, text=True,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    version = file_sha256(tiny_run / "adapter" / "adapter_model.safetensors")[:8]
    other = tmp_path / "other"
    shutil.copytree(lora, other)
    result = run_cli("serve-command", lora, f"v2={other}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--lora-modules aid-{version}={lora.resolve()} v2-{version}={other.resolve()}" in result.stdout
    assert "--max-loras 2" in result.stdout and "--enable-tower-connector-lora" in result.stdout
    assert "two adapters named 'aid'" in one_line_error(run_cli("serve-command", lora, lora))
    assert "not an --adapter-only export" in one_line_error(
        run_cli("serve-command", lora, tiny_run / "adapter")
    )
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere"}))
    assert "different bases" in one_line_error(run_cli("serve-command", lora, f"v2={other}"))
