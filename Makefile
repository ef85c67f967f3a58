# hnfverify — set-up, demo, tests, benchmarks. Every target creates .venv idempotently.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: the CPU wheel lies on local disk; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench bench-data bench-long bench-speed bench-report proofs clean model fuzz fuzz-ci

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[torch,test,bench]'
	touch $@

venv: $(BIN)/.installed

model: venv
	$(BIN)/hnfverify fetch-model smollm2

OUT ?= out

# The whole pipeline on real text. Later stages (plan, check, eval) are appended as they land.
demo: venv
	$(BIN)/hnfverify fetch-model smollm2
	$(BIN)/hnfverify splits
	$(BIN)/hnfverify analyze --model smollm2 --calib prose --max-tokens 2048 --window 1024 --quiet --out $(OUT)/report.json
	$(BIN)/hnfverify inspect $(OUT)/report.json --layer 29 --at-max
	$(BIN)/hnfverify plan $(OUT)/report.json --eps 500 --sink 4 --recent 64 --out $(OUT)/plan.json
	$(BIN)/hnfverify plan $(OUT)/report.json --avg-bits 4.5 --sink 4 --recent 64 --brief --out $(OUT)/plan-4.5bits.json
	$(BIN)/hnfverify plan $(OUT)/report.json --uniform int4_t64 --sink 4 --recent 64 --brief --out $(OUT)/plan-int4.json
	$(BIN)/hnfverify plan $(OUT)/report.json --eps 500 --sink 4 --recent 0 --brief --out $(OUT)/plan-recent0.json
	rm -rf $(OUT)/certs
	$(BIN)/hnfverify check $(OUT)/plan-recent0.json --cert-dir $(OUT)/certs
	$(BIN)/hnfverify check $(OUT)/plan.json --cert-dir $(OUT)/certs
	$(BIN)/hnfverify recheck $(OUT)/certs/$$($(BIN)/hnfverify show $(OUT)/plan.json --json | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["sha256"][:16])').cert.json --plan $(OUT)/plan.json
	$(BIN)/hnfverify replay $(OUT)/certs --solver z3
	$(BIN)/hnfverify replay $(OUT)/certs --solver cvc5
	@echo "== the KL gate (docs/design.md 2.6): check --max-kl 0.1 on the 4.5-bit plan (exit 1 expected: no finite certified KL bound at plan time)"
	-$(BIN)/hnfverify check $(OUT)/plan-4.5bits.json --max-kl 0.1 --cert-dir $(OUT)/certs-kl | grep -E "^  (kl|composition)|VIOLATED|PROVED"
	$(BIN)/hnfverify generate $(OUT)/plan-4.5bits.json --prompt "Explain what a Python dictionary is, with a short example." --max-new-tokens 80 --certify
	$(BIN)/hnfverify report $(OUT)/plan-4.5bits.json --out $(OUT)/report-4.5bits --eval-windows 0
	$(BIN)/hnfverify eval $(OUT)/plan-4.5bits.json --text prose --text code --windows 8 --prefix 512 --scored 512 --quiet
	$(BIN)/hnfverify eval $(OUT)/plan.json --text prose --text code --windows 8 --prefix 512 --scored 512 --quiet

proofs: venv
	@for p in proofs/*.py; do echo "== $$p"; $(BIN)/python $$p || exit 1; done

test: venv proofs
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# 100k fuzz cases of check's loader and decisions and of recheck (about 20 minutes on 2 cores)
fuzz: venv
	$(BIN)/python tests/fuzz_gate.py --cases 100000

# the slice CI runs: two minutes of the same fuzzer
fuzz-ci: venv
	$(BIN)/python tests/fuzz_gate.py --seconds 120 --cli-every 200

# Everything issue 6 asks for, one model, one run (about 30 minutes on 2 cores): peers and hnfverify plans on
# the same evaluation windows, the ablation, decode timing, analyzer overhead, check scaling; then
# BENCHMARKS.md and benchmarks/figures/*.png are generated from the JSON results (never hand-edited).
BENCH ?= $(OUT)/bench
bench: bench-data bench-report

bench-data: venv model
	rm -f $(BENCH)/report.json $(BENCH)/report.safetensors
	$(BIN)/python benchmarks/quality.py --out $(BENCH) --windows 2 --repeats 2 --steps 8
	$(BIN)/python benchmarks/engines.py --out $(BENCH) --windows 2
	$(BIN)/python benchmarks/analyzer_overhead.py --json > $(BENCH)/analyzer_overhead.json.tmp && mv $(BENCH)/analyzer_overhead.json.tmp $(BENCH)/analyzer_overhead.json
	$(BIN)/python benchmarks/check_scaling.py --json > $(BENCH)/check_scaling.json.tmp && mv $(BENCH)/check_scaling.json.tmp $(BENCH)/check_scaling.json
	$(MAKE) bench-long

# decode speed and memory at 1K / 4K / 8K context (about 35 minutes): plans from one 8192-token analysis
LONG = $(BENCH)/long
bench-long: venv model
	mkdir -p $(LONG)
	$(BIN)/python -m hnfverify analyze --model smollm2 --calib prose --max-tokens 8192 --window 8192 --threads 2 --quiet --out $(LONG)/report-8k.json
	$(BIN)/python -m hnfverify plan $(LONG)/report-8k.json --avg-bits 4.5 --sink 4 --recent 64 --out $(LONG)/plan-4.5bits.json > /dev/null
	$(BIN)/python -m hnfverify plan $(LONG)/report-8k.json --uniform int4_t64 --sink 4 --recent 64 --out $(LONG)/plan-int4.json > /dev/null
	$(BIN)/python -m hnfverify plan $(LONG)/report-8k.json --uniform fp16,K.rest=int4_c32,V.rest=int4_t64 --sink 0 --recent 128 --out $(LONG)/plan-kivi4.json > /dev/null
	$(BIN)/python benchmarks/cache_overhead.py $(LONG)/plan-4.5bits.json $(LONG)/plan-int4.json $(LONG)/plan-kivi4.json --json > $(BENCH)/cache_overhead.json.tmp && mv $(BENCH)/cache_overhead.json.tmp $(BENCH)/cache_overhead.json

# the decode figures only, after a change to the cache: re-time quality.json's plans, then the long contexts
bench-speed: venv model
	$(BIN)/python benchmarks/quality.py --out $(BENCH) --retime
	$(MAKE) bench-long
	$(MAKE) bench-report

bench-report: venv
	$(BIN)/python benchmarks/write_report.py $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info
