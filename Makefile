# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup fashion-mnist demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build from this machine's disk; a plain `pip install torch` would fetch a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,privacy]"
	# the FA family's peer (benchmarks/biotorch_peer.py, tests/test_biotorch_peer.py); --no-deps:
	# the code paths used need only torch, not its listed torchvision, jupyter, tensorboard, ...
	$(BIN)/python -m pip install --quiet --no-deps biotorch==0.0.16
	touch $@

# Fashion-MNIST for its loader test comes from Debian (skipped, with a reason, where apt is absent).
# Installing a system package is not silent: one line says what and why.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || \
	  (command -v apt-get >/dev/null && \
	   echo "make test: apt-get install dataset-fashion-mnist (Debian package; the Fashion-MNIST loader test in tests/test_data.py reads /usr/share/datasets/fashion-mnist)" && \
	   (apt-get install -y -q dataset-fashion-mnist >/dev/null \
	   || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null))) || \
	  echo "note: dataset-fashion-mnist not installed; its test will be skipped"

demo: setup
	$(BIN)/dfatorch compare --methods bp,dfa:all,bdfa:fc --epochs 20 --out runs/demo

test: setup fashion-mnist
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
