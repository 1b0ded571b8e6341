# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIGS := --config-dataset demo/dataset_params.yaml --config-model demo/model_params.yaml \
                --config-train demo/train_params.yaml
DEMO_RESULTS := process_exp_results/results
# the demo is offline by design: fail at once instead of retrying the hub
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test faults install figures clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(OFFLINE) $(PY) data_processors/load_dataset.py --config-name demo/dataset_params.yaml
	$(OFFLINE) $(PY) data_processors/dataset.py --config-dataset demo/dataset_params.yaml \
		--config-model demo/model_params.yaml
	$(OFFLINE) $(PY) train/train.py $(DEMO_CONFIGS) --tag demo --overwrite
	$(OFFLINE) $(PY) inference/inference.py $(DEMO_CONFIGS) --run demo --save_path $(DEMO_RESULTS)
	@echo "figures and metrics: $(DEMO_RESULTS)/demo/ (Aim runs: $(VENV)/bin/aim up)"

# the suite in TEST_WORKERS pytest-xdist workers, one test file each at a time (module fixtures run once);
# tests/conftest.py gives each worker its share of the cores
TEST_WORKERS ?= 2

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# every fault the steps must survive, end to end (about 10 minutes): one row per case, exit 1 if any fails
faults: $(VENV)/.installed
	$(OFFLINE) $(PY) tests/faults/run_faults.py --slow

# the README's figures: the architecture, and the demo's topic x expert heatmap (after make demo)
figures: $(VENV)/.installed
	$(PY) process_exp_results/figures/architecture.py --out images/architecture.png
	cp $(DEMO_RESULTS)/demo/figures/topic_expert_heatmap_block_0.png images/demo_topic_expert_heatmap.png

clean:
	rm -rf data/demo train_results/demo $(DEMO_RESULTS)/demo
