# The commands people type. Every target installs what it needs into .venv first.
#   make demo                          synthetic data end to end (no download, no GPU)
#   make test                          the whole test suite
#   make download                      the real competition data into input/ (Kaggle credentials)
#   make index / make folds            data report / patient-grouped folds for DATA_DIR
#   make train-fold BACKBONE=convnext FOLD=0    one backbone, one fold (CONDITIONS="spinal foraminal": groups;
#                                                empty: every group that has a locator)
#   make train BACKBONE=convnext                 one backbone, every fold
#   make train-all                               every backbone of the method (BACKBONES), every fold
#   make evaluate                                OOF metrics, plots and report.html for every trained backbone
#   make train-localizer                         each group's locator (make train runs it; a finished one is kept)
#   make predict [PREDICT_FLAGS=--sr]            locate and grade the test split: a submission (--sr: and a
#                                                DICOM Structured Report per study)
#   make blend                                   OOF-tuned blend weights of every trained backbone
#   make submission                              the blend on the test split: submissions/submission.csv
#   make kernel                                  the offline Kaggle kernel of the blend, with its datasets: kernels/
#   make kernel-run                              rehearse that kernel here (Kaggle-like environment, no network)
#   make upload [DRY_RUN=1]                      create/version its datasets and push it (kaggle command)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SPINEGRADE := $(BIN)/spinegrade
STAMP := $(VENV)/.installed

DATA_DIR ?= input/rsna-2024-lumbar-spine-degenerative-classification
FOLDS ?= input/folds.csv
N_FOLDS ?= 5
OUTPUT_DIR ?= .
BACKBONE ?= convnext
FOLD ?= 0
BACKBONES ?= vit swin beit efficientnet resnet152 convnext
TRAIN_FLAGS ?=
PREDICT_FLAGS ?=
# Extra pytest arguments for make test, e.g. PYTEST_ARGS=--random-order (the suite in a shuffled order).
PYTEST_ARGS ?=
# make test runs the suite in this many processes (pytest-xdist), each test file's tests in one of them;
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
# Condition groups to train (spinal foraminal subarticular); empty: every group that has a locator.
CONDITIONS ?=
CONDITIONS_FLAG = $(if $(strip $(CONDITIONS)),--conditions $(CONDITIONS))
# Training always resumes: finished folds (and finished locators) are skipped, an unfinished one continues
# from its last epoch (RESUME= starts unfinished folds over; TRAIN_FLAGS=--force retrains finished ones).
RESUME ?= --resume
LOCALIZER_FLAGS ?=
KERNELS_DIR ?= $(OUTPUT_DIR)/kernels
KERNEL_NAME ?= spinegrade-rsna-2024
KERNEL_FLAGS ?=
DRY_RUN ?=

# The demo keeps its own synthetic data beside (never over) a real download.
DEMO_DATA ?= input/demo/rsna-2024-lumbar-spine-degenerative-classification
DEMO_FOLDS ?= input/demo/folds.csv
DEMO_STUDIES ?= 60
DEMO_TEST_STUDIES ?= 8
DEMO_OUTPUT ?= runs/demo
DEMO_BACKBONES ?= efficientnet_lite0 efficientnet_lite0_wide
DEMO_TRAIN_FLAGS ?= --num_epochs 5
# The foraminal group has twice the spinal group's samples (two sides): the demo trains it with one view,
# smaller inputs and fewer epochs, to stay within minutes on 2 cores.
DEMO_FORAMINAL_BACKBONES ?= efficientnet_lite0
DEMO_FORAMINAL_FLAGS ?= --num_epochs 4 --image_size 96
# The subarticular group likewise (two sides, on Axial T2).
DEMO_SUBARTICULAR_BACKBONES ?= efficientnet_lite0
DEMO_SUBARTICULAR_FLAGS ?= --num_epochs 4 --image_size 96
DEMO_LOCALIZER_FLAGS ?= --image_size 64 --num_epochs 12 --batch_size 8
# The recesses' locator reads an axial slice per level and side: four times the canal's labelled slices,
# so fewer epochs.
DEMO_SUBARTICULAR_LOCALIZER_FLAGS ?= --num_epochs 4
DEMO_JOBS ?= 2
DEMO_THREADS ?= $(shell $(PYTHON) -c "import os; print(max(1, len(os.sched_getaffinity(0)) // $(DEMO_JOBS)))" 2>/dev/null || echo 1)

# The locators and the grading models need nothing of each other: the demo trains them side by side, each
# process with its share of the cores (two single-threaded trainings beat one two-threaded on 2 cores).
# DEMO_JOBS=1: one after the other, with every core each.
demo-locators demo-graders: export OMP_NUM_THREADS ?= $(DEMO_THREADS)

demo-locators: install
	$(SPINEGRADE) train-localizer --conditions spinal foraminal --data-dir $(DEMO_DATA) --folds $(DEMO_FOLDS) \
		--output-dir $(DEMO_OUTPUT) $(RESUME) $(DEMO_LOCALIZER_FLAGS)
	$(SPINEGRADE) train-localizer --conditions subarticular --data-dir $(DEMO_DATA) --folds $(DEMO_FOLDS) \
		--output-dir $(DEMO_OUTPUT) $(RESUME) $(DEMO_LOCALIZER_FLAGS) $(DEMO_SUBARTICULAR_LOCALIZER_FLAGS)

demo-graders: install
	$(SPINEGRADE) train --models $(DEMO_BACKBONES) --conditions spinal --data-dir $(DEMO_DATA) --folds $(DEMO_FOLDS) \
		--output-dir $(DEMO_OUTPUT) $(RESUME) $(DEMO_TRAIN_FLAGS)
	$(SPINEGRADE) train --models $(DEMO_FORAMINAL_BACKBONES) --conditions foraminal --data-dir $(DEMO_DATA) \
		--folds $(DEMO_FOLDS) --output-dir $(DEMO_OUTPUT) $(RESUME) $(DEMO_FORAMINAL_FLAGS)
	$(SPINEGRADE) train --models $(DEMO_SUBARTICULAR_BACKBONES) --conditions subarticular --data-dir $(DEMO_DATA) \
		--folds $(DEMO_FOLDS) --output-dir $(DEMO_OUTPUT) $(RESUME) $(DEMO_SUBARTICULAR_FLAGS)

.PHONY: install demo demo-locators demo-graders test download index folds synth clean-demo train-fold train train-all evaluate train-localizer predict blend submission \
	kernel kernel-run upload

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: install
	@test -f $(DEMO_DATA)/train.csv || $(SPINEGRADE) synth $(DEMO_DATA) --studies $(DEMO_STUDIES) \
		--test-studies $(DEMO_TEST_STUDIES) --image-size 192 288 --seed 0
	$(SPINEGRADE) index --data-dir $(DEMO_DATA)
	$(SPINEGRADE) folds --data-dir $(DEMO_DATA) --n-folds $(N_FOLDS) --out $(DEMO_FOLDS)
	$(MAKE) --no-print-directory -j $(DEMO_JOBS) demo-locators demo-graders
	$(SPINEGRADE) blend --output-dir $(DEMO_OUTPUT) --folds $(DEMO_FOLDS)
	$(SPINEGRADE) evaluate --output-dir $(DEMO_OUTPUT) --folds $(DEMO_FOLDS) --data-dir $(DEMO_DATA)
	$(SPINEGRADE) submit --data-dir $(DEMO_DATA) --output-dir $(DEMO_OUTPUT) --description demo-lite0-blend
	$(SPINEGRADE) score $(DEMO_OUTPUT)/submissions/submission.csv --labels $(DEMO_DATA)-answers/test.csv \
		--data-dir $(DEMO_DATA) --output-dir $(DEMO_OUTPUT)
	$(SPINEGRADE) kernel --output-dir $(DEMO_OUTPUT) --offline
	$(SPINEGRADE) kernel-run --output-dir $(DEMO_OUTPUT) --data-dir $(DEMO_DATA)

synth: install
	$(SPINEGRADE) synth $(DATA_DIR)

download: install
	$(SPINEGRADE) download --dest $(dir $(DATA_DIR))

index: install
	$(SPINEGRADE) index --data-dir $(DATA_DIR)

folds: install
	$(SPINEGRADE) folds --data-dir $(DATA_DIR) --n-folds $(N_FOLDS) --out $(FOLDS)

train-localizer: install
	$(SPINEGRADE) train-localizer --data-dir $(DATA_DIR) --folds $(FOLDS) --output-dir $(OUTPUT_DIR) $(CONDITIONS_FLAG) \
		$(RESUME) $(LOCALIZER_FLAGS)


predict: install
	$(SPINEGRADE) predict --data-dir $(DATA_DIR) --split test --output-dir $(OUTPUT_DIR) $(PREDICT_FLAGS)

blend: install
	$(SPINEGRADE) blend --output-dir $(OUTPUT_DIR) --folds $(FOLDS)

submission: install
	$(SPINEGRADE) submit --data-dir $(DATA_DIR) --output-dir $(OUTPUT_DIR)

kernel: install
	$(SPINEGRADE) kernel --output-dir $(OUTPUT_DIR) --kernels-dir $(KERNELS_DIR) --name $(KERNEL_NAME) $(KERNEL_FLAGS)

kernel-run: install
	$(SPINEGRADE) kernel-run --data-dir $(DATA_DIR) --kernels-dir $(KERNELS_DIR) --name $(KERNEL_NAME) \
		--work-dir $(OUTPUT_DIR)/kernel-run

upload: install
	$(SPINEGRADE) upload --kernels-dir $(KERNELS_DIR) --name $(KERNEL_NAME) $(if $(DRY_RUN),--dry-run)

train-fold: install
	$(SPINEGRADE) train --models $(BACKBONE) --fold $(FOLD) --data-dir $(DATA_DIR) --folds $(FOLDS) \
		--output-dir $(OUTPUT_DIR) $(CONDITIONS_FLAG) $(RESUME) $(TRAIN_FLAGS)

train: install train-localizer
	$(SPINEGRADE) train --models $(BACKBONE) --data-dir $(DATA_DIR) --folds $(FOLDS) --output-dir $(OUTPUT_DIR) \
		$(CONDITIONS_FLAG) $(RESUME) $(TRAIN_FLAGS)
	$(MAKE) evaluate

train-all: install train-localizer
	$(SPINEGRADE) train --models $(BACKBONES) --data-dir $(DATA_DIR) --folds $(FOLDS) --output-dir $(OUTPUT_DIR) \
		$(CONDITIONS_FLAG) $(RESUME) $(TRAIN_FLAGS)
	$(MAKE) evaluate

evaluate: install
	$(SPINEGRADE) evaluate --output-dir $(OUTPUT_DIR) --folds $(FOLDS) --data-dir $(DATA_DIR)

clean-demo:
	rm -rf input/demo $(DEMO_OUTPUT)
