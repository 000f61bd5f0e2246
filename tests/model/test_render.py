import json

from pixtral_lora.cli import main
from pixtral_lora.data.loaders import load_aid_folder, to_conversations
from pixtral_lora.model.render import IGNORE_INDEX, Renderer, RenderReport, TrainingCollator, render_dataset
from pixtral_lora.task.prompt import PromptConfig


def _conversations(aid_dir):
    dataset = load_aid_folder(aid_dir)
    return to_conversations(dataset, PromptConfig(), dataset.features["label"].names)


def test_loss_mask_covers_only_the_answer_and_eos(processor, aid_dir):
    row = _conversations(aid_dir)[0]
    sample = Renderer(processor, image_longest_edge=64).render_row(row)
    ids, labels = sample["input_ids"], sample["labels"]
    loss_ids = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    # exactly the tokens of the answer text followed by </s>, at the end of the sequence
    answer_ids = processor.tokenizer(PromptConfig().answer(row["label"]), add_special_tokens=False)[
        "input_ids"
    ]
    assert loss_ids == answer_ids + [processor.tokenizer.eos_token_id]
    first_loss = labels.index(loss_ids[0])
    assert all(label == IGNORE_INDEX for label in labels[:first_loss])
    assert all(label != IGNORE_INDEX for label in labels[first_loss:])
    # no system/user/image marker token carries loss
    markers = {processor.image_token_id, processor.image_break_token_id, processor.image_end_token_id}
    assert markers.isdisjoint(loss_ids)
    assert {processor.tokenizer.convert_tokens_to_ids(t) for t in ("[INST]", "[/INST]", "<s>")}.isdisjoint(
        loss_ids
    )
    # the class list of the system prompt is in the trained sequence (not dropped by the template)
    assert "Beach; Desert; Forest; Port" in processor.tokenizer.decode(ids)


def test_overlong_samples_are_counted_and_skipped_not_cut(processor, aid_dir):
    conversations = _conversations(aid_dir).select(range(6))
    length = len(Renderer(processor, 64).render_row(conversations[0])["input_ids"])
    report = RenderReport()
    rendered = render_dataset(Renderer(processor, 64, max_length=length - 1), conversations, report)
    assert len(rendered) == 0 and len(report.too_long) == 6 and report.kept == 0
    report = RenderReport()
    rendered = render_dataset(Renderer(processor, 64, max_length=length), conversations, report)
    assert len(rendered) == 6 and report.too_long == []
    assert all(len(ids) == length for ids in rendered["input_ids"])


def test_collator_pads_right_and_adds_pixels(processor, aid_dir):
    renderer = Renderer(processor, 64)
    rows = list(render_dataset(renderer, _conversations(aid_dir).select(range(3))))
    rows[1]["input_ids"] = rows[1]["input_ids"] + [processor.tokenizer.eos_token_id]  # make lengths differ
    rows[1]["labels"] = rows[1]["labels"] + [IGNORE_INDEX]
    batch = TrainingCollator(renderer)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["image_sizes"].tolist() == [[64, 64]] * 3
    shorter = len(rows[0]["input_ids"])
    assert batch["attention_mask"][0, shorter:].sum() == 0
    assert (batch["labels"][0, shorter:] == IGNORE_INDEX).all()


def test_preview_ids_are_what_training_uses(processor, tiny_model_dir, aid_dir, capsys):
    assert (
        main(
            [
                "data",
                "preview",
                str(aid_dir),
                "--index",
                "5",
                "--ids",
                "--processor",
                str(tiny_model_dir),
                "--image-longest-edge",
                "64",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = _conversations(aid_dir)[5]
    sample = Renderer(processor, 64).render_row(row)
    assert shown["input_ids"] == sample["input_ids"] and shown["labels"] == sample["labels"]
    assert shown["loss_mask"] == [int(label != IGNORE_INDEX) for label in sample["labels"]]


def test_preview_text_collapses_image_and_marks_loss(tiny_model_dir, aid_dir, capsys):
    assert (
        main(
            [
                "data",
                "preview",
                str(aid_dir),
                "--index",
                "0",
                "--processor",
                str(tiny_model_dir),
                "--image-longest-edge",
                "64",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "<image: 4x4 patches, 20 tokens = 16 [IMG] + 3 [IMG_BREAK] + 1 [IMG_END]>[/INST]" in text
    assert '⟦```json\n{"label": "Beach"}\n```</s>⟧' in text


def test_collator_refuses_rows_whose_image_tokens_do_not_fit_their_images(processor, aid_dir):
    import pytest

    from pixtral_lora.model.render import RenderError

    renderer = Renderer(processor, 64)
    row = dict(next(iter(render_dataset(renderer, _conversations(aid_dir).select(range(1))))))
    position = row["input_ids"].index(processor.image_break_token_id)
    row["input_ids"] = row["input_ids"][:position] + row["input_ids"][position + 1 :]  # one [IMG_BREAK] lost
    row["labels"] = row["labels"][:position] + row["labels"][position + 1 :]
    with pytest.raises(RenderError, match="19 image tokens .* need 20"):
        TrainingCollator(renderer)([row])
