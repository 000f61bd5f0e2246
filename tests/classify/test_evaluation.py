import csv
import json

import pytest

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.cli import main
from pixtral_lora.data.loaders import load_aid_folder, to_conversations
from pixtral_lora.errors import UserError
from pixtral_lora.model.render import Renderer
from pixtral_lora.run.reader import load_eval_model
from pixtral_lora.task.answers import AnswerTrie, answer_token_ids
from pixtral_lora.task.prompt import PromptConfig

CLASSES = ["Beach", "Desert", "Forest", "Port"]


def test_constrained_mode_never_leaves_the_class_set_even_untrained(tiny_model_dir, processor, aid_dir):
    model = load_eval_model(str(tiny_model_dir), dtype="float32")
    rows = list(
        to_conversations(
            load_aid_folder(aid_dir).select(range(0, 40, 3)), PromptConfig(), CLASSES, with_answer=False
        )
    )
    renderer = Renderer(processor, 64)
    free, _ = predict_rows(
        model,
        renderer,
        rows,
        CLASSES,
        PromptConfig(),
        ClassifyOptions("generate", batch_size=7, max_new_tokens=12),
    )
    assert all(p.label is None for p in free)  # the random model babbles
    constrained, _ = predict_rows(
        model,
        renderer,
        rows,
        CLASSES,
        PromptConfig(),
        ClassifyOptions("constrained", batch_size=7, max_new_tokens=24),
    )
    valid = {PromptConfig().answer(c) for c in CLASSES}
    assert all(p.raw_answer in valid and p.label in CLASSES for p in constrained)
    scored, _ = predict_rows(model, renderer, rows, CLASSES, PromptConfig(), ClassifyOptions("score"))
    assert all(p.label in CLASSES and 0.25 <= p.confidence <= 1.0 for p in scored)


def test_answer_trie_allows_only_valid_continuations(processor):
    sequences = answer_token_ids(processor.tokenizer, PromptConfig(), CLASSES)
    trie = AnswerTrie(sequences)
    forest = sequences["Forest"]
    common = next(i for i in range(len(forest)) if len({s[i] for s in sequences.values()}) > 1)
    assert set(trie.allowed(forest[:common])) == {s[common] for s in sequences.values()}
    assert trie.allowed(forest[:1]) == [forest[1]]  # the shared prefix has one way on
    assert trie.allowed(forest) == []  # complete
    assert trie.allowed([forest[0] + 1]) == []  # left the tree


def test_eval_command_writes_complete_reports(tiny_run, capsys):
    assert (
        main(
            [
                "eval",
                str(tiny_run),
                "--modes",
                "generate,constrained,score",
                "--limit",
                "12",
                "--out",
                str(tiny_run / "eval12"),
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "| finetuned | score |" in shown and "| base | generate |" in shown
    out = tiny_run / "eval12"
    report = json.loads((out / "report.json").read_text())
    for model in ("base", "finetuned"):
        for mode in ("generate", "constrained", "score"):
            result = report["results"][model][mode]
            assert sum(result["counts"].values()) == result["n"] == 12
            assert result["images_per_second"] > 0
    assert report["results"]["finetuned"]["constrained"]["counts"]["hallucinated"] == 0
    score = report["results"]["finetuned"]["score"]
    assert 0 <= score["calibration_ece"] <= 1 and 0.25 <= score["mean_confidence"] <= 1
    generate = report["results"]["finetuned"]["generate"]["confidence"]  # the answer's own probability
    assert generate["of"] == "answer probability" and generate["calibrated"] is None
    assert 0 < generate["raw"]["mean_confidence"] <= 1
    assert "expected calibration error" in (out / "report.md").read_text()
    assert (
        report["results"]["finetuned"]["score"]["accuracy"] >= report["results"]["base"]["score"]["accuracy"]
    )
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * 3 * 12
    assert {p["outcome"] for p in predictions} <= {"correct", "wrong", "hallucinated", "unparseable"}
    assert all(p["gold"] in CLASSES for p in predictions)
    for name in (
        "confusion_base.png",
        "confusion_finetuned.png",
        "confusion_finetuned_score.csv",
        "report.md",
    ):
        assert (out / name).stat().st_size > 100
    with open(out / "confusion_finetuned.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == [*CLASSES, "(hallucinated)", "(unparseable)", "(unreadable)"]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 12


def test_predict_command_on_a_folder(tiny_run, learn_data_dir, tmp_path):
    target = tmp_path / "new"
    target.mkdir()
    for name in ("Forest/forest_1.jpg", "Port/port_2.jpg"):
        (target / name.split("/")[1]).write_bytes((learn_data_dir / name).read_bytes())
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(target), "--run", str(tiny_run), "--out", str(out)]) == 0
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["forest_1.jpg", "port_2.jpg"]
    assert all(r["label"] in CLASSES and 0 < float(r["confidence"]) <= 1 for r in rows)


@pytest.mark.parametrize("mode", ["bogus"])
def test_unknown_mode_is_an_error(mode):
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassifyOptions(mode)


def test_vllm_requests_encode_to_the_trained_prompt(processor, aid_dir, mistral_tokenizer):
    """What the vLLM backend sends, encoded by mistral_common (as vLLM does), is our prompt, token for token."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from pixtral_lora.classify.vllm_engine import openai_messages

    renderer = Renderer(processor, 64)
    rows = to_conversations(
        load_aid_folder(aid_dir).select([0, 17]), PromptConfig(user_text="Which scene?"), CLASSES
    )
    for row in rows:
        request = ChatCompletionRequest.from_openai(openai_messages(row, renderer.load_images(row["images"])))
        theirs = mistral_tokenizer.encode_chat_completion(request).tokens
        messages = json.loads(row["messages"])[:-1]
        ours, _ = renderer.prompt_ids(messages, renderer.load_images(row["images"]))
        assert theirs == ours


def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path):
    from pixtral_lora.classify.vllm_engine import VllmEngine

    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="needs vllm"):
        VllmEngine(tmp_path, max_images=1)


def test_another_engine_gets_only_readable_rows_and_an_unreadable_image_is_counted(
    processor, aid_dir, tmp_path
):
    """The loop both backends run: the engine (vLLM in `eval --backend vllm`) never sees a row whose
    image cannot be decoded; that row's outcome is `unreadable`, the others are answered."""
    from pixtral_lora.classify.generate import AnswerEngine

    class Echo(AnswerEngine):
        seen: list[str] = []

        def answers(self, renderer, rows, images, max_new_tokens, candidates=None):
            assert all(loaded and loaded[0].size[0] <= 64 for loaded in images)  # resized as in training
            self.seen += [row["id"] for row in rows]
            return ["Forest"] * len(rows), [None] * len(rows)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = list(
        to_conversations(load_aid_folder(aid_dir).select([0, 1]), PromptConfig(), CLASSES, with_answer=False)
    )
    rows.insert(1, {**rows[0], "id": "broken", "images": [{"path": str(broken), "bytes": None}]})
    engine = Echo()
    predictions, _ = predict_rows(
        engine, Renderer(processor, 64), rows, CLASSES, PromptConfig(), ClassifyOptions()
    )
    assert predictions[1].outcome == "unreadable" and predictions[1].id == "broken"
    assert engine.seen == [rows[0]["id"], rows[2]["id"]]
    assert [p.label for p in predictions] == ["Forest", None, "Forest"]
    with pytest.raises(ValueError, match="answers in generate mode, not score"):
        predict_rows(engine, Renderer(processor, 64), rows, CLASSES, PromptConfig(), ClassifyOptions("score"))


def test_an_engine_that_scores_gets_the_answer_tokens_and_its_scores_are_calibrated(processor, aid_dir):
    """Score mode on another engine (vLLM): it is handed each class's answer token ids (what the
    transformers path scores), and the loop turns its log-likelihoods into the same predictions:
    softmax(scores / T), top 3, the temperature marked."""
    import math

    from pixtral_lora.classify.generate import AnswerEngine
    from pixtral_lora.task.answers import answer_token_ids

    renderer = Renderer(processor, 64)
    expected = answer_token_ids(renderer.tokenizer, PromptConfig(), CLASSES)

    class Scorer(AnswerEngine):
        modes = ("score",)

        def answers(self, renderer, rows, images, max_new_tokens, candidates=None):
            raise AssertionError("score mode does not generate")

        def scores(self, renderer, rows, images, candidates):
            assert candidates == expected
            return [{name: -float(i + k) for i, name in enumerate(candidates)} for k in range(len(rows))]

    rows = list(
        to_conversations(load_aid_folder(aid_dir).select([0, 1]), PromptConfig(), CLASSES, with_answer=False)
    )
    options = ClassifyOptions("score", temperature=2.0)
    predictions, _ = predict_rows(Scorer(), renderer, rows, CLASSES, PromptConfig(), options)
    weights = [math.exp(-i / 2.0) for i in range(len(CLASSES))]
    assert [p.label for p in predictions] == [CLASSES[0]] * 2
    assert predictions[0].confidence == pytest.approx(weights[0] / sum(weights))
    assert predictions[0].calibrated and [name for name, _ in predictions[0].top] == CLASSES[:3]
