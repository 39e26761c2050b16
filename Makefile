# Three commands: `make setup`, `serinus transcribe ...` (the main job), `make test`.
PYTHON ?= python3

.PHONY: setup test
setup:
	# Keep a torch that is already installed (e.g. a CUDA build); otherwise take the CPU build 2.13.0.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[train,serve,dev]'

test:
	$(PYTHON) -m pytest tests
