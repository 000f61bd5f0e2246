"""`pixtral-lora data preview`: one sample exactly as the model sees it."""

from __future__ import annotations

from itertools import groupby

from pixtral_lora.model.render import IGNORE_INDEX, Renderer

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"


def sample_view(renderer: Renderer, row: dict) -> dict:
    """Rendered ids, labels and loss mask of one conversation row, plus a readable text form."""
    sample = renderer.render_row(row)
    ids, labels = sample["input_ids"], sample["labels"]
    loss_mask = [int(label != IGNORE_INDEX) for label in labels]
    return {
        "id": row["id"],
        "label": row.get("label", ""),
        "input_ids": ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "text": readable(renderer, ids, loss_mask),
        "num_tokens": len(ids),
        "num_loss_tokens": sum(loss_mask),
        "num_image_tokens": sum(1 for i in ids if i in renderer.image_marker_ids),
    }


def readable(renderer: Renderer, ids: list[int], loss_mask: list[int]) -> str:
    """Decoded text with each image collapsed to its token counts and loss-bearing spans in ⟦...⟧."""
    tokenizer = renderer.tokenizer
    marker_names = {
        renderer.processor.image_token_id: "[IMG]",
        renderer.processor.image_break_token_id: "[IMG_BREAK]",
        renderer.processor.image_end_token_id: "[IMG_END]",
    }
    out: list[str] = []
    for has_loss, span in groupby(zip(ids, loss_mask, strict=True), key=lambda pair: pair[1]):
        span_ids = [token for token, _ in span]
        text: list[str] = []
        run: list[int] = []
        plain: list[int] = []
        for token in span_ids + [None]:
            if token in marker_names:
                if plain:
                    text.append(tokenizer.decode(plain, skip_special_tokens=False))
                    plain = []
                run.append(token)
                continue
            if run:
                rows = run.count(renderer.processor.image_break_token_id) + 1
                patches = run.count(renderer.processor.image_token_id)
                text.append(
                    f"<image: {patches // rows}x{rows} patches, {len(run)} tokens = "
                    f"{patches} [IMG] + {rows - 1} [IMG_BREAK] + 1 [IMG_END]>"
                )
                run = []
            if token is not None:
                plain.append(token)
        if plain:
            text.append(tokenizer.decode(plain, skip_special_tokens=False))
        joined = "".join(text)
        out.append(f"{LOSS_OPEN}{joined}{LOSS_CLOSE}" if has_loss else joined)
    return "".join(out)
