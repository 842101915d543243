# The two set-up commands of the README: `make run` and `make test`.
# Both create .venv (CPU machine: torch comes from the local wheel cache when present),
# install totobench with every extra, the offscreen renderer MuJoCo needs and a headless Chromium
# (the leaderboard page is checked in a real browser by the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= osmesa
export PYOPENGL_PLATFORM ?= osmesa

.PHONY: setup run quick test bench clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=""; \
	ldconfig -p 2>/dev/null | grep -q libOSMesa || missing="$$missing libosmesa6"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing >/dev/null; fi; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[all]"
	touch $@

TB := $(VENV)/bin/totobench

# The default suite on the embedded data world: the bundled model and its random-init baseline,
# the one-frame control of the Kinetics probe (does the clip carry more than its frames?), the
# raw-pixel floor,
# then the leaderboard and the layer-sweep comparison (what results/ in the repository holds).
run: setup
	$(TB) run --model toto-tiny --tasks all --layers all
	$(TB) run --model random-init:toto-tiny --tasks all --layers all
	$(TB) run --model toto-tiny --tasks k400-single-frame --layers all
	$(TB) run --model pixels --tasks all --layers all
	$(TB) export results --format md --out results/LEADERBOARD.md
	$(TB) export results --format html --out results/leaderboard.html
	$(TB) compare results/toto-tiny results/random-init_toto-tiny results/pixels --plot results/layer_sweep.png > results/COMPARE.txt

quick: setup
	$(TB) run --model toto-tiny --tasks all --layers all --quick --out results-quick

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q --timeout 900

bench: setup
	$(VENV)/bin/python benchmarks/report.py
