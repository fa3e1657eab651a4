# The two commands a user needs: `make quickstart` (the main job on the bundled demo data) and `make test`.
# Each installs what it needs first.
PYTHON ?= python3
LOOM := $(PYTHON) -m launch
STAMP := .install.stamp
PYTEST := $(PYTHON) -m pytest

.PHONY: install quickstart quickstart-video test test-slow test-distributed test-all lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(LOOM) shards demo output_dir=data/demo overwrite=true
	$(LOOM) train --config quickstart

# the video quickstart starts from the image quickstart's models (built first when missing)
quickstart-video: install
	@test -f runs/quickstart/diffusion/export/model.safetensors || $(MAKE) quickstart
	$(LOOM) shards moving-digits output_dir=data/moving-digits overwrite=true
	$(LOOM) train --config quickstart-video

test: install
	$(PYTEST) -q -m "not slow and not gpu"

test-slow: install
	$(PYTEST) -q -m "slow and not gpu"

test-distributed: install
	$(PYTEST) -q -m "distributed and not gpu"

test-all: install
	$(PYTEST) -q -m "not gpu"

lint: install
	$(PYTHON) -m ruff check .

bench: install
	$(PYTHON) benchmarks/data_throughput.py
	$(PYTHON) benchmarks/train_overhead.py

clean:
	rm -rf $(STAMP) runs data *.egg-info
