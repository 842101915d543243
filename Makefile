# The two set-up commands of the README: `make run` and `make test`.
# Both create .venv (CPU machine: torch comes from the local wheel cache when present; --no-compile:
# modules are byte-compiled when first imported, not all at install, 28 s less for torch alone),
# install totobench with every extra, the offscreen renderer MuJoCo needs and a headless Chromium
# (the leaderboard page is checked in a real browser by the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= osmesa
export PYOPENGL_PLATFORM ?= osmesa

.PHONY: setup run publish quick test bench clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=""; \
	ldconfig -p 2>/dev/null | grep -q libOSMesa || missing="$$missing libosmesa6"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing >/dev/null; fi; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q --no-compile -e ".[all]"
	$(PY) -m pip install -q --no-compile --no-deps taming-transformers==0.0.1   # the VQGAN reference of the tests (its own deps are not needed)
	touch $@

TB := $(VENV)/bin/totobench
# where `make run` writes (git-ignored); `make publish` writes the committed results/ instead
RUN_OUT ?= runs/default

# The default suite on the embedded data world: the bundled model and its random-init baseline, the
# raw-pixel floor; then the leaderboard and the layer-sweep comparison. A second run reuses the
# feature cache and skips the tasks already finished in OUT.
# Two streams run side by side, one thread each, their shares of the work measured to end together:
# toto-tiny (on the terminal); random init, then pixels (into OUT/logs/baselines.log). The baselines
# start with robot, which needs no data world, so the first run's data-world generation (in the
# toto-tiny stream) does not leave a core idle. Much of the suite does not use two cores (rollouts,
# decoding, small probe steps).
define suite
	@mkdir -p $(1)/logs
	@echo "random-init:toto-tiny and pixels run beside toto-tiny; their progress: $(1)/logs/baselines.log"
	@OMP_NUM_THREADS=1 sh -c '$(TB) run --model random-init:toto-tiny --tasks robot,ego4d-sta,davis,imagenet,k400 \
	    --layers all --out $(1) && \
	  $(TB) run --model pixels --tasks imagenet,ego4d-sta,davis,robot,k400 --layers all --out $(1)' \
	  > $(1)/logs/baselines.log 2>&1 & \
	baselines=$$!; trap 'kill $$baselines 2>/dev/null' INT TERM; \
	OMP_NUM_THREADS=1 $(TB) run --model toto-tiny --tasks all --layers all --out $(1); main=$$?; \
	wait $$baselines; base=$$?; \
	if [ $$base -ne 0 ]; then echo "the baselines failed (exit $$base); the end of $(1)/logs/baselines.log:"; \
	  tail -n 20 $(1)/logs/baselines.log; fi; \
	[ $$main -eq 0 ] && [ $$base -eq 0 ]
	$(TB) export $(1) --format md --out $(1)/LEADERBOARD.md
	$(TB) export $(1) --format html --out $(1)/leaderboard.html
endef

# ... into runs/default, then each (model, task) beside the published number in results/
run: setup
	$(call suite,$(RUN_OUT))
	$(TB) compare $(RUN_OUT)/toto-tiny $(RUN_OUT)/random-init_toto-tiny $(RUN_OUT)/pixels \
	  --plot $(RUN_OUT)/layer_sweep.png --against results

# ... into the committed results/ (tasks whose results still answer their YAML are kept), with the
# variants of the bundled model beside its defaults (the one-frame control of k400 among them)
VARIANTS := k400-single-frame,k400-spacetime,davis-tiles,imagenet-linear,k400-linear,k400-linear-single-frame
publish: setup
	$(TB) run --model toto-tiny --tasks $(VARIANTS) --layers all --out results
	$(call suite,results)
	$(TB) compare results/toto-tiny results/random-init_toto-tiny results/pixels \
	  --plot results/layer_sweep.png > results/COMPARE.txt

quick: setup
	$(TB) run --model toto-tiny --tasks all --layers all --quick --out results-quick

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q --timeout 900

bench: setup
	$(VENV)/bin/python benchmarks/report.py
