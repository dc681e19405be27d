# Two commands from a fresh clone: `make demo` (train + evaluate on the bundled sample, CPU)
# and `make test` (the test suite). `make demo` sets up .venv with requirements.txt only;
# `make test` adds the test dependencies (requirements-dev.txt) and runs the suite on one worker per
# core (pytest-xdist). The venv sees the system's
# packages, so a torch already installed (Colab, a GPU box, a CPU-only build) is reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output

.PHONY: install install-dev demo test clean

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-onnx.txt requirements-serve.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# A tiny model from random initialisation learns the sample by heart: this shows the whole
# pipeline working (features, training, decoding, the official metric), not what BERT-small scores.
demo: install
	$(PY) train.py --output_dir=$(DEMO_DIR) --checkpoint=none --model_config=data/bert_tiny_demo.json \
	  --train_file=data/korquad_sample.json --max_seq_length=256 --max_query_length=32 --doc_stride=128 \
	  --train_batch_size=16 --learning_rate=3e-3 --num_train_epochs=40 --warmup_proportion=0.05 \
	  --logging_steps=20 --save_total_limit=1 --seed=42 --no_cuda --quiet --overwrite_output_dir
	$(PY) eval.py --checkpoint=$(DEMO_DIR)/korquad_39.bin --output_dir=$(DEMO_DIR) \
	  --predict_file=data/korquad_sample.json --max_seq_length=256 --max_query_length=32 --doc_stride=128 \
	  --train_batch_size=64 --no_cuda --quiet

test: install-dev
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
