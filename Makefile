# The commands people type. Every target installs what it needs into .venv first.
#   make demo                          synthetic data end to end (no download, no GPU)
#   make test                          the whole test suite
#   make download                      the real competition data into input/ (Kaggle credentials)
#   make index / make folds            data report / patient-grouped folds for DATA_DIR

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SPINEGRADE := $(BIN)/spinegrade
STAMP := $(VENV)/.installed

DATA_DIR ?= input/rsna-2024-lumbar-spine-degenerative-classification
FOLDS ?= input/folds.csv
N_FOLDS ?= 5

# The demo keeps its own synthetic data beside (never over) a real download.
DEMO_DATA ?= input/demo/rsna-2024-lumbar-spine-degenerative-classification
DEMO_FOLDS ?= input/demo/folds.csv
DEMO_STUDIES ?= 60
DEMO_TEST_STUDIES ?= 8

.PHONY: install demo test download index folds synth clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	@test -f $(DEMO_DATA)/train.csv || $(SPINEGRADE) synth $(DEMO_DATA) --studies $(DEMO_STUDIES) \
		--test-studies $(DEMO_TEST_STUDIES) --image-size 192 288 --seed 0
	$(SPINEGRADE) index --data-dir $(DEMO_DATA)
	$(SPINEGRADE) folds --data-dir $(DEMO_DATA) --n-folds $(N_FOLDS) --out $(DEMO_FOLDS)

synth: install
	$(SPINEGRADE) synth $(DATA_DIR)

download: install
	$(SPINEGRADE) download --dest $(dir $(DATA_DIR))

index: install
	$(SPINEGRADE) index --data-dir $(DATA_DIR)

folds: install
	$(SPINEGRADE) folds --data-dir $(DATA_DIR) --n-folds $(N_FOLDS) --out $(FOLDS)

clean-demo:
	rm -rf input/demo
