# Sentiment Analyzer Pro. `make run` and `make test` work on a fresh clone: they create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
MODEL_ID ?= minilm
MODEL_OUT ?= models/default
SST2 ?= ../shared/data/sst2
FINETUNE_DIR ?= build/finetune
URL ?= http://127.0.0.1:8000

.PHONY: install install-dev run test lint model model-finetune model-build bench loadtest soak gpu-carry docker \
	docker-cpu docker-cuda base-image doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[train,dev,postgres]'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime          ## runtime only (no torch)
install-dev: $(VENV)/.dev          ## runtime + model pipeline + tests

run: $(VENV)/.runtime              ## serve on the embedded defaults (honours HOST, PORT, MODEL_PATH, ...)
	$(BIN)/sentiment-analyzer serve

doctor: $(VENV)/.runtime
	$(BIN)/sentiment-analyzer doctor

lint: $(VENV)/.dev
	$(BIN)/ruff check server models scripts tests

test: lint                         ## lint, then the whole suite
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The default model from the shared SST-2 data: fine-tune (about 95 min on 2 quiet cores), then export,
# quantize, evaluate and write the manifest. MODEL_ID may be a Hub id or a local checkpoint directory;
# anything but `minilm` skips fine-tuning and exports that checkpoint as it is.
model: $(VENV)/.dev
ifeq ($(MODEL_ID),minilm)
	LD_PRELOAD=$(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2) $(BIN)/python -m models.finetune \
	  --base minilm --train $(SST2)/train.tsv --dev $(SST2)/dev.tsv --out $(FINETUNE_DIR) --epochs 3 --lr 1e-4 --seed 42 \
	  --eval-every 300 --ema-decay 0.999
	$(BIN)/python -m models.build --checkpoint $(FINETUNE_DIR)/best --out $(MODEL_OUT) --eval-file $(SST2)/dev.tsv \
	  --calibration-file $(SST2)/train.tsv --name sentiment-distilbert-minilm --max-length 512
else
	$(BIN)/python -m models.build --checkpoint $(MODEL_ID) --out $(MODEL_OUT) --eval-file $(SST2)/dev.tsv \
	  --calibration-file $(SST2)/train.tsv
endif

bench: $(VENV)/.dev                ## offline ONNX benchmark of the default artifact
	$(BIN)/python scripts/bench_onnx.py --artifact $(MODEL_OUT) --data $(SST2)/dev.tsv --out bench_results/onnx

loadtest: $(VENV)/.dev             ## load test a running server at URL
	$(BIN)/python scripts/loadtest.py --url $(URL) --data $(SST2)/dev.tsv --out bench_results/load

gpu-carry: | $(BIN)/python       ## what scripts/gpu_check.sh needs carried to a lent GPU (Python 3.12, no network there)
	rm -rf build/gpu_carry && mkdir -p build/gpu_carry
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d build/gpu_carry/wheels pydantic-settings
	cp $(SST2)/dev.tsv build/gpu_carry/

# Images. BASE replaces both Dockerfiles' base image (default: python:3.11-slim-bookworm and nvidia/cuda from
# Docker Hub); without Docker Hub, `make base-image` makes local/debian-python:bookworm from a Debian mirror.
# DOCKER must build with BuildKit (RUN --mount): a client with the buildx plugin, or one older than 23.
# BUILD_FLAGS: --network=host lets RUN steps reach the package index where dockerd has no default bridge.
DOCKER ?= docker
BASE ?=
BUILD_FLAGS ?= --network=host
docker: docker-cpu docker-cuda     ## sentiment-analyzer:cpu (also :latest) and sentiment-analyzer:cuda

docker-cpu:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(BUILD_FLAGS) $(if $(BASE),--build-arg PYTHON_IMAGE=$(BASE)) \
	  -f docker/Dockerfile -t sentiment-analyzer:cpu -t sentiment-analyzer:latest .

docker-cuda:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(BUILD_FLAGS) $(if $(BASE),--build-arg CUDA_IMAGE=$(BASE)) \
	  -f docker/Dockerfile.cuda -t sentiment-analyzer:cuda .

base-image:                        ## local/debian-python:bookworm via debootstrap (root; kept once made)
	DOCKER=$(DOCKER) scripts/make_base_image.sh $(BASE)

clean:
	rm -rf $(VENV) build bench_results .pytest_cache
