# The two commands of the README: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install fetch demo test test-slow test-fast app clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch pinned for this machine kind (a range would pull CUDA wheels)
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[test,cluster]"  # cluster: Ray, for tests/analyses/scan/test_cluster.py
	touch $(STAMP)

install: $(STAMP)

fetch: install
	$(BIN)/probe fetch

demo: fetch
	$(BIN)/python -m app.demo --out reports/demo
	$(BIN)/probe scan --model smollm2-135m --analyses all --preset quick --out reports/demo/scan

test: fetch   # assets are fetched: a missing one fails its tests instead of skipping them (tests/conftest.py)
	PROBE_REQUIRE_ASSETS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" --durations=15

test-slow: fetch   # builds the refusal organism (~15 min on a 2-core CPU) and checks its refusal rates
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

test-fast: install
	$(BIN)/python -m pytest -q -m "not embedded and not slow"

app: fetch
	$(BIN)/streamlit run app/streamlit_app.py --server.address localhost --server.headless true

clean:
	rm -rf $(VENV) reports build *.egg-info
