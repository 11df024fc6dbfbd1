# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the project, fetches the default data, then runs.
# A second run with nothing changed skips the install (a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pair that installs from this machine's local wheels; override elsewhere,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_ROOT := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.installed

.PHONY: install data demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Fashion-MNIST: Debian's package where apt exists and we are root, else torchvision's download
# into ./data/fashion-mnist (the configs look in both places).
data: $(STAMP)
	@if ls $(FMNIST_ROOT)/train-images-idx3-ubyte.gz >/dev/null 2>&1 || ls data/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || $(PY) -m casd_ray.data.download --download-fashion-mnist data/fashion-mnist; \
	else \
		$(PY) -m casd_ray.data.download --download-fashion-mnist data/fashion-mnist; \
	fi

demo: data
	$(VENV)/bin/casd-ray run experiments/quick.yaml

test: data
	$(VENV)/bin/ruff check casd_ray tests benchmarks examples
	$(VENV)/bin/ruff format --check casd_ray tests benchmarks examples
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check casd_ray tests benchmarks examples
	$(VENV)/bin/ruff format --check casd_ray tests benchmarks examples

format:
	$(VENV)/bin/ruff format casd_ray tests benchmarks examples
	$(VENV)/bin/ruff check --fix casd_ray tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/trial_overhead.py
	$(PY) benchmarks/trial_memory.py
	$(PY) benchmarks/search_startup.py
	$(PY) benchmarks/shared_logits.py
	$(PY) benchmarks/search_efficiency.py
	$(PY) benchmarks/search_reproducibility.py
	$(PY) benchmarks/inheritance_paths.py
	$(PY) benchmarks/memory_format.py
	$(PY) benchmarks/finetune_logits.py
	$(PY) benchmarks/latency_budget.py

clean:
	rm -rf $(VENV) runs
