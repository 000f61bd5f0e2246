"""Every directory of the package is a regular package, so a clean checkout and a wheel carry all of it."""

import importlib
import pkgutil

import pixtral_lora


def test_every_subpackage_has_an_init_file():
    # A directory without __init__.py still imports (as a namespace package, __file__ None), which hid
    # an ignore rule that kept data/__init__.py out of the repository.
    subpackages = [
        info.name for info in pkgutil.walk_packages(pixtral_lora.__path__, "pixtral_lora.") if info.ispkg
    ]
    assert {"pixtral_lora.data", "pixtral_lora.evaluation", "pixtral_lora.inference"} <= set(subpackages)
    for name in subpackages:
        assert importlib.import_module(name).__file__ is not None, f"{name} has no __init__.py"


def test_vllms_environment_pins_the_ray_the_project_pins():
    # vLLM replicas on Ray run in vLLM's own virtualenv (the Makefile's); the Ray there must be the one
    # pyproject pins, the one the driver's tests ran with
    import re
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = re.search(r"^VLLM_RAY_PINS \?= (.+)$", (root / "Makefile").read_text(), re.MULTILINE)
    assert pinned and extras["ray"] == [pinned.group(1).strip()]
    assert extras["ray"][0] in extras["dev"]
