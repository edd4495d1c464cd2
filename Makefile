# Two entry points for a fresh machine: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds C++ ops on first use; the cache keeps that to the first run.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0
export WANDB_MODE ?= offline

.PHONY: setup test demo bench wheelhouse clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch 2.13.0; any other version pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,embedded,gift]'
	touch $@

# The exported remote code must also load under transformers 4.40 (what the released checkpoints were made with):
# tests/test_remote_code.py loads an export in a subprocess with this folder first on PYTHONPATH.
TRANSFORMERS_4_40 := .cache/transformers-4.40

$(TRANSFORMERS_4_40)/.installed:
	$(PY) -m pip install -q --no-deps --target $(TRANSFORMERS_4_40) 'transformers==4.40.2' \
		'huggingface_hub>=0.19.3,<1.0' 'tokenizers>=0.19,<0.20'
	touch $@

test: setup $(TRANSFORMERS_4_40)/.installed
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m timemoe_train.demo

# Wheels for a GPU node without internet (launch/wheelhouse.py): e.g. WHEELHOUSE_ARGS="--python 3.11".
wheelhouse: setup
	$(PY) launch/wheelhouse.py build $(WHEELHOUSE_ARGS)

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache outputs multirun runs wheelhouse build
