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
	$(PY) -m pytest -q --durations=20 tests

demo: setup
	$(PY) -m timemoe_train.demo

# Wheels for a GPU node without internet (launch/wheelhouse.py): e.g. WHEELHOUSE_ARGS="--python 3.11".
wheelhouse: setup
	$(PY) launch/wheelhouse.py build $(WHEELHOUSE_ARGS)

# Every bench to its last line, at quick sizes (the README's figures come from each script's defaults); a bench
# without a line here stops it. bench/gpu_check.sh runs the CUDA paths on a GPU node.
bench: setup
	@for b in bench/*.py; do grep -qF '$$(PY) '"$$b " $(firstword $(MAKEFILE_LIST)) || \
		{ echo "make bench: $$b has no line in the Makefile's bench target"; exit 1; }; done
	$(PY) bench/attention.py --tokens 1024 --repeats 2
	$(PY) bench/checkpoint.py --hidden 64 --layers 2
	$(PY) bench/forecast.py --preset tiny --batches 2 --context-length 64 --repeats 1
	$(PY) bench/forecast_scale.py --series 20000 --shards 10 --arms-preset tiny --repeats 1 --windows 8
	$(PY) bench/host_syncs.py --size tiny
	$(PY) bench/loader.py --points 1000000 --batches 20 --train-steps 1 --train-preset tiny
	$(PY) bench/loader_scale.py --sizes 0.01M,0.05M --ranks 2
	$(PY) bench/moe_layer.py --tokens 1024 --repeats 3
	$(PY) bench/prep.py --points 2e7 --repeat 1
	$(PY) bench/step_profile.py --size tiny
	$(PY) bench/train_step.py --sizes tiny --steps 6

clean:
	rm -rf $(VENV) .cache outputs multirun runs wheelhouse build
