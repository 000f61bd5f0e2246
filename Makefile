# pixtral-lora: every target installs what it needs first (see `install`).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# torch and torchvision are pinned as a pair: the Pixtral image processor needs a torchvision
# built for the installed torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

ARTIFACTS ?= artifacts
TINY_MODEL = $(ARTIFACTS)/tiny-pixtral
TINY_DATA  = $(ARTIFACTS)/aid-synthetic

.PHONY: install test lint demo train eval convert bench browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps mistral-inference==1.6.0
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -rs

lint: install
	$(BIN)/ruff check src tests scripts train.py
	$(BIN)/ruff format --check src tests scripts train.py

$(TINY_MODEL)/config.json: | install
	$(BIN)/pixtral-lora tiny-model --out $(TINY_MODEL)

$(TINY_DATA)/.complete: | install
	$(BIN)/pixtral-lora data generate --out $(TINY_DATA) --per-class 40 --size 64 --classes Beach,Desert,Forest,Port
	touch $@

TINY_RUN = runs/tiny

# Train the tiny config (CPU, ~1 min); a rerun resumes or finds the run complete.
train: install $(TINY_MODEL)/config.json $(TINY_DATA)/.complete
	$(BIN)/python train.py configs/tiny.yaml

# Evaluate the tiny run: base vs fine-tuned, generate/constrained/score.
eval: train
	$(BIN)/pixtral-lora eval $(TINY_RUN)

# Merge the tiny run's adapter and write Mistral's native format (what vLLM serves).
convert: train
	$(BIN)/python scripts/convert_to_mistral.py --model $(TINY_MODEL) --adapter $(TINY_RUN)/adapter --out $(TINY_RUN)/mistral

# The whole workflow on the tiny model, in a few CPU minutes.
demo: install $(TINY_MODEL)/config.json $(TINY_DATA)/.complete
	$(BIN)/pixtral-lora data validate $(TINY_DATA)
	$(BIN)/pixtral-lora data preview $(TINY_DATA) --index 0 --config configs/tiny.yaml --processor $(TINY_MODEL)
	$(BIN)/python train.py configs/tiny.yaml
	$(BIN)/pixtral-lora eval $(TINY_RUN)
	$(BIN)/python scripts/convert_to_mistral.py --model $(TINY_MODEL) --adapter $(TINY_RUN)/adapter --out $(TINY_RUN)/mistral
	$(BIN)/pixtral-lora data generate-scene --out $(TINY_RUN)/scene.tif --grid 6x8 --tile 64 --classes Beach,Desert,Forest,Port
	$(BIN)/pixtral-lora map $(TINY_RUN)/scene.tif --run $(TINY_RUN) --out $(TINY_RUN)/map.geojson --tile 64
	@echo "demo done: run in $(TINY_RUN); open $(TINY_RUN)/eval/report.html in a browser (report.md beside it); Mistral-format model in $(TINY_RUN)/mistral; land-use map $(TINY_RUN)/map.geojson (open in QGIS) and $(TINY_RUN)/map.png"

# Throughput and memory of the tiny config; results in benchmarks/results-<device>.json
bench: install
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_predict.py

# Headless Chromium (Debian's package): the report.html rendering test uses it, and skips without it.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(ARTIFACTS) runs
