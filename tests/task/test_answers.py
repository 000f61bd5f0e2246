"""The parser on what models actually write."""

import pytest

from pixtral_lora.task.answers import AnswerParser

CLASSES = ["Airport", "DenseResidential", "MediumResidential", "Forest", "Port", "RailwayStation"]

# (answer, expected class or None, expected raw label or None)
CORPUS = [
    ('```json\n{"label": "Forest"}\n```', "Forest", "Forest"),
    ('{"label": "Port"}', "Port", "Port"),
    ("{'label': 'Airport'}", "Airport", "Airport"),
    ('```json\n{"label": "Dense Residential"}\n```', "DenseResidential", "Dense Residential"),
    ('{"label": "dense_residential"}', "DenseResidential", "dense_residential"),
    ('{"label": "RAILWAY-STATION"}', "RailwayStation", "RAILWAY-STATION"),
    ('Sure! Here is the answer:\n```json\n{"label": "Port"}\n```\nThe image shows ships.', "Port", "Port"),
    (
        '```json\n{"label": "Forest"}\n```\n```json\n{"label": "Port"}\n```',
        "Forest",
        "Forest",
    ),  # first block wins
    ('{"Label": "Forest", "confidence": 0.9}', "Forest", "Forest"),
    ('{"category": "Port"}', "Port", "Port"),
    ("Forest", "Forest", "Forest"),
    ("forest.", "Forest", "forest"),
    ('```json\n{"label": "Harbor"}\n```', None, "Harbor"),  # hallucinated: not a class
    ('{"label": "Residential"}', None, "Residential"),
    ('{"label": "Volcano"}', None, "Volcano"),
    ('```json\n{"label": \n```', None, None),
    ("I cannot classify this image because it is too blurry and there are many things.", None, None),
    ("", None, None),
    ("```json\n[1, 2, 3]\n```", None, None),
    ('{"label": 3}', None, None),
]


@pytest.mark.parametrize(("answer", "label", "raw"), CORPUS)
def test_parser_corpus(answer, label, raw):
    parsed = AnswerParser(CLASSES).parse(answer)
    assert (parsed.label, parsed.raw_label) == (label, raw)
    assert parsed.hallucinated == (raw is not None and label is None)


def test_strict_mode_accepts_only_exact_json_labels():
    parser = AnswerParser(CLASSES, strict=True)
    assert parser.parse('```json\n{"label": "DenseResidential"}\n```').label == "DenseResidential"
    assert parser.parse('{"label": "Dense Residential"}').label is None  # hallucinated under strict rules
    assert parser.parse('{"label": "Dense Residential"}').raw_label == "Dense Residential"
    assert parser.parse("{'label': 'Forest'}").raw_label is None  # not JSON
    assert parser.parse("Forest").raw_label is None


def test_ambiguous_class_names_are_refused():
    with pytest.raises(ValueError, match="differ only in case, spaces or punctuation"):
        AnswerParser(["Dense Residential", "DenseResidential"])
