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

# The main job: train three ~1M-parameter models (pure Mamba-3, Transformer, 3:1 hybrid with NoPE
# attention and the pre-gate grouped norm) with torchtitan on the recipe's retrieval task, export them,
# and evaluate them at 1x-8x the training length. Recipe (task, length, steps, batch, lr):
# specs/train/demo.toml; specs: specs/demo/. Output: runs/demo/eval/results.{json,png}.
# DEMO_THREADS pins torch's CPU threads: a float sum split over another number of threads rounds
# differently, and a different rounding is a different training run. The README's table used 2.
DEMO_MODELS  := mamba3 transformer hybrid
DEMO_THREADS ?= 2
DEMO_OUT     ?= runs/demo
DEMO_TASK    := $(shell sed -n 's/^data *= *"task:\(.*\)"/\1/p' specs/train/demo.toml)

demo: $(STAMP)
	@rm -rf $(DEMO_OUT); start=$$(date +%s); \
	for m in $(DEMO_MODELS); do \
	  echo "== $$m-demo: training specs/demo/$$m-demo.yaml with specs/train/demo.toml"; \
	  OMP_NUM_THREADS=$(DEMO_THREADS) $(VENV)/bin/hybridlm train specs/demo/$$m-demo.yaml \
	    --config specs/train/demo.toml --job.dump_folder $(DEMO_OUT)/$$m || exit 1; \
	  $(VENV)/bin/hybridlm export $(DEMO_OUT)/$$m --out $(DEMO_OUT)/models/$$m-demo || exit 1; \
	done; \
	echo "== evaluating the three models on $(DEMO_TASK) at 1x, 2x, 4x and 8x the training length"; \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(VENV)/bin/hybridlm eval $(foreach m,$(DEMO_MODELS),$(DEMO_OUT)/models/$(m)-demo) \
	  --task $(DEMO_TASK) --lengths 1x,2x,4x,8x --samples 32 --batch-size 16 --device cpu --out $(DEMO_OUT)/eval || exit 1; \
	took=$$(( $$(date +%s) - start )); \
	echo "== done in $$((took / 60)) min $$((took % 60)) s. Wrote:"; \
	echo "   $(DEMO_OUT)/eval/results.png    accuracy against length, one line per model"; \
	echo "   $(DEMO_OUT)/eval/results.json   every cell (accuracy, NLL, settings, versions)"; \
	echo "   $(DEMO_OUT)/models/*-demo/      the trained models: hybridlm eval / generate take them"; \
	echo "   $(DEMO_OUT)/{$(shell echo $(DEMO_MODELS) | tr ' ' ',')}/      checkpoints and TensorBoard logs (tb/)"

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
