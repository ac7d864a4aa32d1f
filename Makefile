# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The dev set-up pins torch (a local CPU wheel here); the package itself accepts torch>=2.5.
TORCH := torch==2.13.0
# the triton engine's kernels, pinned next to torch (its tests run them in Triton's interpreter)
TRITON := triton==3.9.0

.PHONY: demo test docs wheel clean

# The compiled kernel (src/dotattn/csrc) builds against the installed torch, so torch and
# the build tools go in first and the package builds without isolation; setup.py builds it
# once per x86-64 level (AVX-512, AVX2, baseline) and dotattn loads the best this CPU runs.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/dotattn/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(TRITON) setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,hf,demo,plots,monitor,docs]'
	touch $@

# The seed's steps on the real all-MiniLM-L6-v2 (heatmaps in out/explain), its heads'
# statistics and flags (out/diagnose), then a quick side-by-side benchmark against torch
# SDPA (table, CSV/JSON and a plot in out/bench).
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/dotattn explain
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/dotattn diagnose
	$(VENV)/bin/dotattn bench --quick

# pytest exits 5 when it collects no test: not a failure of the code.
test: $(VENV)/.installed
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

# The documentation site in out/site, from docs/ and the docstrings (mkdocs.yml), offline;
# --strict turns a broken link or reference into an error.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

# The sdist and a wheel in $(DIST), carrying the kernel at every level, built against the
# installed torch (after the set-up above, whose compiled objects it reuses, so it only links),
# then tagged manylinux by auditwheel, torch's own libraries left to torch (the wheel needs the
# torch it was built against). tests/test_wheel.py runs this and installs the result.
DIST ?= dist
TORCH_LIBS := libc10.so libtorch_cpu.so libtorch_python.so libtorch.so libgomp.so.1
wheel:
	$(PY) -m build --no-isolation --sdist --wheel --outdir $(DIST)/raw .
	PATH=$(dir $(PY)):$$PATH $(dir $(PY))auditwheel repair $(TORCH_LIBS:%=--exclude %) -w $(DIST) $(DIST)/raw/dotattn-*.whl
	mv $(DIST)/raw/dotattn-*.tar.gz $(DIST)/ && rm -rf $(DIST)/raw

clean:
	rm -rf $(VENV) build dist
