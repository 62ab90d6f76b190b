# Two commands from a fresh clone: `make serve` (set up, write the demo checkpoint, serve all three pools on CPU)
# and `make test` (set up, run the tests). Everything lives in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A local CPU build of torch on these machines; on a GPU machine install the CUDA build you want first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

# The web page test drives Debian's chromium through Playwright (Playwright's own browser download is not used).
/usr/bin/chromium:
	command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium not installed: install it to run tests/test_web.py"

# checkov (the manifest's security checks, tests/deploy/test_checkov.py) in a venv of its own: its pins (packaging,
# networkx) would downgrade the service's.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	test -x .venv-checkov/bin/python || $(PY) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q "checkov>=3.2,<4"

setup: $(STAMP)

serve: setup
	# The gRPC proxy's own cap on a message (Ray's default is 2 GiB); the app's limits are in the config. The HTTP
	# proxy cuts off readers that stop reading (serve_app/api/proxy_guard.py, CHATGLM2_SEND_TIMEOUT_S, default 30 s).
	RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=4194304 \
	RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.proxy_guard:proxy_middlewares \
	$(BIN)/serve run configs/local.yaml

# The head-node loss test runs a real redis-server (Debian's package) as the GCS's external store.
/usr/bin/redis-server:
	command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
		|| echo "redis-server not installed: install it to run tests/server/test_head_loss.py"

test: setup $(CHECKOV) /usr/bin/chromium /usr/bin/redis-server
	$(BIN)/python -m pytest -q -ra

# The quick loop: everything that starts no Ray cluster (model, engine, protocol, config, manifests); meant to take
# under 2 minutes, it takes longer today.
test-fast: setup $(CHECKOV)
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: setup
	$(BIN)/chatglm2-serve bench --checkpoint checkpoints/demo-small --concurrency 1,4,16 --requests 32 \
		--prompt-tokens 128 --max-new-tokens 64 --compare-sequential

clean:
	rm -rf $(VENV) .venv-checkov checkpoints
