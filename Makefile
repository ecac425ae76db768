# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/adtr demo --out demo_results

# Headless Chromium for tests/test_browser.py: installed with apt-get where missing and possible (root,
# Debian/Ubuntu, as in CI); anywhere else the browser test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "note: could not install chromium and chromium-driver; the browser test will skip"; \
	else echo "note: no chromium/chromedriver (Debian: apt-get install chromium chromium-driver); the browser test will skip"; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs --durations=10

bench: $(STAMP)
	$(BIN)/python benchmarks/mvtec.py --root ../shared/data/mvtec_ad --categories bottle grid

clean:
	rm -rf $(VENV) demo_results .pytest_cache
