# `make demo` and `make test` set up .venv idempotently, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean corpus studies-quick

setup: $(STAMP)

# On a machine without CUDA take the CPU wheel of torch first, so `-e .[dev]` pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch>=2.11"; \
	else \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job: train three ~1M-parameter models (pure Mamba-3, Transformer, 3:1 hybrid with the
# pre-gate grouped norm) with torchtitan on MQAR at length 256, export them, and evaluate them at
# 1x-8x the training length. Recipe: specs/train/demo.toml. Output: runs/demo/eval/results.{json,png}.
DEMO_MODELS := mamba3 transformer hybrid
DEMO_TASK   := mqar:pairs=4:queries=32

demo: $(STAMP)
	@rm -rf runs/demo; for m in $(DEMO_MODELS); do \
	  echo "== training $$m-demo"; \
	  $(VENV)/bin/hybridlm train specs/demo/$$m-demo.yaml --config specs/train/demo.toml \
	    --job.dump_folder runs/demo/$$m || exit 1; \
	  $(VENV)/bin/hybridlm export runs/demo/$$m --out runs/demo/models/$$m-demo || exit 1; \
	done
	$(VENV)/bin/hybridlm eval $(foreach m,$(DEMO_MODELS),runs/demo/models/$(m)-demo) \
	  --task $(DEMO_TASK) --lengths 1x,2x,4x,8x --samples 32 --batch-size 16 --out runs/demo/eval

test: $(STAMP)
	$(PY) -m pytest -q

# Small-scale reproductions of the paper's claims (docs/results.md), one target each, e.g.
#   make study-state-tracking                     (on a GPU; on the GPU box run `python3 -m hybridlm study ...`)
#   make study-out-norm STUDY_ARGS=--quick        (tiny, on a CPU)
STUDIES    := state-tracking out-norm discretization
STUDY_ARGS ?=
.PHONY: $(addprefix study-,$(STUDIES))

$(addprefix study-,$(STUDIES)): study-%: $(STAMP)
	$(VENV)/bin/hybridlm study $* $(STUDY_ARGS)

studies-quick: $(STAMP)
	for s in $(STUDIES); do $(VENV)/bin/hybridlm study $$s --quick || exit 1; done

# Study 3's text: Python's standard library (sources and docstrings), < 10 MiB, carried to the GPU box.
corpus: $(STAMP)
	$(PY) -m hybridlm.studies.corpus --out runs/corpus/python-stdlib

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
