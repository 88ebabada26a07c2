# Two set-ups, each from nothing: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with (CPU here; nothing newer than 2.14.1)
TORCH := torch==2.14.1 torchvision==0.29.1

# the oldest timm pyproject.toml accepts; `make test-timm-floor` runs the suite on it too
TIMM_FLOOR := $(shell sed -n 's/.*"timm>=\([0-9.]*\).*/\1/p' pyproject.toml)

.PHONY: venv demo test test-timm-floor clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/evit eval

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The same suite on the oldest timm we accept, placed in front of the installed one (no second venv).
test-timm-floor: venv
	$(PY) -m pip install -q --no-deps --upgrade --target build/timm-$(TIMM_FLOOR) timm==$(TIMM_FLOOR)
	PYTHONPATH=$(CURDIR)/build/timm-$(TIMM_FLOOR) $(PY) -c "import timm; assert timm.__version__ == '$(TIMM_FLOOR)', timm.__file__"
	PYTHONPATH=$(CURDIR)/build/timm-$(TIMM_FLOOR) HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build dist src/*.egg-info
