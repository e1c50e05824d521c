# Two commands: `make demo` and `make test`. Both create .venv on first use and are fast afterwards.
PY      := .venv/bin/python
STAMP   := .venv/.installed
CHROMIUM := /usr/bin/chromium
FFPROBE  := /usr/bin/ffprobe
export OMP_NUM_THREADS ?= 2
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on local disk; a looser spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) $(CHROMIUM) $(FFPROBE)
	$(PY) -m pytest -q tests

# Headless browser for the app's browser test (Debian's package; playwright never downloads one). A no-op once
# installed; where apt-get cannot install it (not root, no network), the browser test fails and says why.
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		|| echo "warning: could not install chromium with apt-get; the app's browser test will fail"

# ffmpeg + ffprobe on PATH, which Gradio's streaming video output (the app's live player) runs; the MP4s
# themselves are written by imageio-ffmpeg's own binary. Where apt-get cannot install them, the app shows only the
# complete MP4 and the app's streaming tests fail.
$(FFPROBE):
	DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg \
		|| echo "warning: could not install ffmpeg with apt-get; the app's streaming tests will fail"

clean:
	rm -rf .venv outputs
