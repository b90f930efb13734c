# Two commands for a fresh machine: `make run` (set-up + the whole pipeline) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHELL  := /bin/bash
.SHELLFLAGS := -eo pipefail -c
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test ui serve serve-model bench book compare clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -m pip install --quiet --progress-bar off -e ".[test]" 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, torchvision, mlflow, dvc, prefect, mlxtend" 
	$(BIN)/dvc config --local core.analytics false 2>/dev/null || true
	touch $(STAMP)

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

# The suite on one pytest-xdist worker per core (at most 4), a test file to a worker: most tests wait on
# single-threaded subprocesses (DVC, MLflow, Prefect start-up), so two workers cut the time by a third on 2 cores.
TEST_WORKERS ?= auto
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

UI_PORT    ?= 5000
MODEL_PORT ?= 5001

# The pipeline's default store (pipeline/tracking.py): mlflow.db at the repository root, artifacts
# beside it in mlartifacts/. Experiments created from the UI get the same artifact root. The first line
# printed is the address of the experiment's runs table (MLflow 3's UI otherwise opens on its GenAI view).
ui: setup
	@$(BIN)/python -c 'import sys; from pipeline.config import load_params; from pipeline.tracking import ui_url; \
		print("ui: the runs of the experiment:", ui_url(sys.argv[1], load_params().tracking.experiment, sys.argv[2]))' \
		"http://127.0.0.1:$(UI_PORT)" "sqlite:///$(CURDIR)/mlflow.db"
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
		--default-artifact-root "file://$(CURDIR)/mlartifacts" \
		--artifacts-destination "file://$(CURDIR)/mlartifacts" \
		--host 127.0.0.1 --port $(UI_PORT)

# The registry's champion (models:/<registry.model_name>@champion in mlflow.db, set by the register stage)
# as MLflow's scoring server on http://127.0.0.1:$(MODEL_PORT)/invocations, in this virtualenv, until Ctrl-C.
serve-model: setup
	$(BIN)/python -m pipeline serve-model --port $(MODEL_PORT)

# A local Prefect server (UI and API on http://127.0.0.1:4200; PREFECT_PORT picks another port),
# started in the background unless one already answers there, and the nightly deployment of
# prefect.yaml served against it until Ctrl-C. The server runs in its own session, so that it
# outlives the runner's shutdown (which pauses the schedule through it); then it is stopped too.
serve: setup
	@port="$${PREFECT_PORT:-4200}"; api="http://127.0.0.1:$$port/api"; \
	export PREFECT_API_URL="$$api" PATH="$(CURDIR)/$(BIN):$$PATH"; \
	healthy() { $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$$api/health" 2>/dev/null; }; \
	if ! healthy; then \
		log="$${PREFECT_HOME:-$$HOME/.prefect}/server-$$port.log"; mkdir -p "$$(dirname "$$log")"; \
		echo "serve: starting a Prefect server on http://127.0.0.1:$$port (log: $$log)"; \
		$(BIN)/python -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
			$(BIN)/prefect server start --host 127.0.0.1 --port "$$port" >"$$log" 2>&1 & server=$$!; \
		trap 'kill $$server 2>/dev/null || true' EXIT; trap 'exit 130' INT TERM; \
		for i in $$(seq 120); do \
			healthy && break; \
			kill -0 $$server 2>/dev/null || { echo "serve: the Prefect server exited:"; tail -n 20 "$$log"; exit 1; }; \
			sleep 1; \
		done; \
		healthy || { echo "serve: no answer from $$api/health after 120 s"; exit 1; }; \
	fi; \
	echo "serve: Prefect UI on http://127.0.0.1:$$port"; \
	$(BIN)/python -m pipeline flow --serve

bench: setup
	$(BIN)/python -m pipeline bench

# The book's recipe (presets/book.yaml) as one DVC experiment, seed 0, tracked in MLflow as `book-seed0`;
# params.yaml and the workspace outputs stay as they are (`dvc exp apply book-seed0` brings it in).
book: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline compare --recipes book --seeds 0 --out results/book

# The default recipe and the book's, 5 seeds each, as ten DVC experiments and MLflow runs (about 2 h on 2 cores):
# results/compare.md (the README's table), compare.json and the sample grids.
compare: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline compare --recipes default book --seeds 0 1 2 3 4

clean:
	rm -rf data/prepared models samples metrics plots
