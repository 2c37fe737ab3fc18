# qbackprop: `make demo` runs the main job, `make test` runs the tests; both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned for the install only (setup.cfg keeps lower bounds): these builds lie
# on the project's machines, so the install needs no large download.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo lint format docs bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) scripts/demo_train.py

lint: install
	$(VENV)/bin/ruff check qbackprop tests scripts
	$(VENV)/bin/ruff format --check qbackprop tests scripts

format: install
	$(VENV)/bin/ruff check --fix qbackprop tests scripts
	$(VENV)/bin/ruff format qbackprop tests scripts

# docs/config.md is generated from the schema; tests/test_schema.py checks it is current
docs: install
	$(VENV)/bin/qbackprop schema --markdown > docs/config.md

# compress / decompress of one fp32 tensor vs x.clone() at 2, 4 and 8 bits, on one thread; then one
# training step, fp32 vs qbackprop vs checkpointing (time and memory); docs/benchmarks.md has figures
bench: install
	$(PY) scripts/bench_compress.py --threads 1 --bits 2 4 8
	$(PY) scripts/bench_step.py --models efficientnetv2_rw_t,resnet18 --batch-size 64 --rounds 5

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
