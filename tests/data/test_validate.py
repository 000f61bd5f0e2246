import json

from PIL import Image

from pixtral_lora.cli import main
from pixtral_lora.data.validate import validate


def _line(image, label="Forest", roles=("system", "user", "assistant")):
    content = {
        "system": "Classify: Forest; Port",
        "user": [{"type": "image_url", "image_url": image}],
        "assistant": f'{{"label": "{label}"}}',
    }
    return json.dumps({"messages": [{"role": r, "content": content[r]} for r in roles]})


def test_validator_reports_every_problem_with_line_and_field(tmp_path):
    Image.new("RGB", (16, 16), (0, 80, 0)).save(tmp_path / "ok.png")
    Image.new("RGB", (16, 16), (0, 0, 80)).save(tmp_path / "shared.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    lines = [
        _line("ok.png"),  # 1: fine
        "{oops",  # 2: invalid JSON
        _line("ok.png", roles=("system", "assistant", "user")),  # 3: wrong order
        _line("ok.png", roles=("system", "user")),  # 4: final message not the assistant's
        _line("missing.png"),  # 5: missing image
        _line("corrupt.png"),  # 6: undecodable image
        _line("ok.png", label="Volcano"),  # 7: label outside the class set
        _line("shared.png"),  # 8: also in the test set
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "Forest").mkdir()
    Image.open(tmp_path / "shared.png").save(tmp_path / "test" / "Forest" / "x.png")
    (tmp_path / "test" / "Forest" / "x.png").write_bytes((tmp_path / "shared.png").read_bytes())
    problems = validate(tmp_path / "train.jsonl", class_names=["Forest", "Port"], test_path=tmp_path / "test")
    errors = {(p.where.rsplit(":", 1)[-1], p.field): p.message for p in problems if p.severity == "error"}
    assert errors.keys() == {
        ("2", ""),
        ("3", "messages[].role"),
        ("4", "messages[].role"),
        ("5", "messages[1].content[0].image_url"),
        ("6", "messages[1].content[0].image_url"),
        ("7", "answer"),
        ("8", ""),
    }
    assert "invalid JSON" in errors[("2", "")]
    assert "expected 'user'" in errors[("3", "messages[].role")]
    assert "last message must be the assistant" in errors[("4", "messages[].role")]
    assert "no such image file" in errors[("5", "messages[1].content[0].image_url")]
    assert "cannot decode" in errors[("6", "messages[1].content[0].image_url")]
    assert "'Volcano' is not one of the 2 classes" in errors[("7", "answer")]
    assert "also in the test set" in errors[("8", "")]


def test_validate_command_exit_status(aid_dir, tmp_path, capsys):
    assert main(["data", "validate", str(aid_dir)]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("[]\n")
    assert main(["data", "validate", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:1 [messages]" in capsys.readouterr().out


def test_duplicate_images_in_a_folder_are_flagged(tmp_path):
    for name in ("Forest", "Port"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / name / "same.png")
    problems = validate(tmp_path)
    assert any("same image content" in p.message for p in problems)
