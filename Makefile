# make test / make demo work on a fresh machine: each creates .venv if missing and installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
JOBS    ?= 2

.PHONY: test demo venv clean test-fast arm-check peers bench bench-transformers bench-lora accuracy text vit multilabel profiles

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[compile,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

# Train an x86-compiled artifact under emulated aarch64 (shared/arm; cached in .cache/aarch64) and compare
# losses with x86 (rtol 1e-4). Skips with the reason, exit 0, where the emulator cannot be built.
arm-check: $(STAMP)
	$(BIN)/python -m tests.runtime.arm_check

# Peer runtime for `pockprop bench`: onnxruntime-training 1.19.2 (deprecated on-device training API) conflicts
# with onnxruntime and needs onnx 1.16.x, so it lives in its own venv. torch is there only because
# `import onnxruntime.training` imports it; the bench hands the forward model over as ONNX (pockprop's infer.onnx).
# ExecuTorch 1.5.1 (the `et-*` rows; it pairs with torch 2.13) needs numpy >= 2, onnxruntime-training 1.19.2
# numpy < 2: it gets a venv of its own, .venv-et (the CPU torch first, as above).
PEERS := .venv-peers
ET    := .venv-et
peers: $(PEERS)/.installed $(ET)/.installed
$(ET)/.installed:
	test -x $(ET)/bin/python || $(PY) -m venv $(ET)
	$(ET)/bin/python -m pip install -q --upgrade pip
	$(ET)/bin/python -m pip install -q torch==2.13.0
	$(ET)/bin/python -m pip install -q executorch==1.5.1
	$(ET)/bin/python -c "import executorch.extension.training, executorch.exir; print('executorch ok')"
	touch $@
$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q onnxruntime-training==1.19.2 onnx==1.16.2 'numpy<2'
	$(PEERS)/bin/python -c "import onnxruntime.training.api, onnxruntime.training.artifacts, onnx; print('peers ok: onnx', onnx.__version__)"
	touch $@

# The benchmarks of docs/benchmarks.md (about 20 minutes on 2 cores; out/bench/*.json, *.png): MobileNetV2 and
# ResNet-18 at batch 8 with `sparse` and `bias-only` (every row, PyTorch and onnxruntime-training included), the
# MCUNet-style model at batch 8 and 1, and the other presets (pockprop and PyTorch rows). Run `make peers` first
# for the onnxruntime-training and ExecuTorch rows; a full ExecuTorch step takes seconds, so its rows have runs
# of their own with 3 rounds of 1 step (ETBENCH). A quiet machine matters: see the doc's caveats.
BENCH := $(BIN)/python -m pockprop bench --threads 2 --warmup 2 --steps 3 --resolution 128
ETBENCH := $(BIN)/python -m pockprop bench --threads 2 --warmup 0 --steps 1 --rounds 3 --resolution 128 --batch 8 \
	--scheme sparse --configs ort-infer pockprop-sparse pockprop-full torch-infer torch-full torch-sparse et-infer \
	et-full et-sparse
bench: $(STAMP)
	mkdir -p out/bench
	for m in mobilenet_v2 resnet18; do for s in sparse bias-only; do $(BENCH) --model $$m --scheme $$s --batch 8 \
	  --rounds 10 --no-et --json out/bench/$$m-b8-$$s.json --png out/bench/$$m-b8-$$s.png || exit 1; done; done
	for b in 8 1; do for s in sparse bias-only; do $(BENCH) --model mcunet --scheme $$s --batch $$b --rounds 10 \
	  --no-et --json out/bench/mcunet-b$$b-$$s.json --png out/bench/mcunet-b$$b-$$s.png || exit 1; done; done
	for m in mobilenet_v2 mcunet resnet18; do $(ETBENCH) --model $$m --json out/bench/$$m-b8-et.json || exit 1; done
	for m in mobilenet_v2 resnet18; do for s in classifier last-k:2 tbft-front tbft-middle tbft-rear; do \
	  $(BENCH) --model $$m --scheme $$s --batch 8 --rounds 6 --no-peers --configs ort-infer pockprop torch-train \
	  torch-infer --json out/bench/$$m-b8-$$s.json || exit 1; done; done

# The transformer rows of docs/benchmarks.md: tokens/s of a training step of the Llama-shaped LM and the
# BERT-base-shaped classifier (4 layers), schemes full, sparse and last-k:1 against PyTorch, interleaved.
# onnxruntime-training's loss takes no (N, T, V) logits, so its rows are left out (--no-peers).
TBENCH := $(BIN)/python -m pockprop bench --threads 2 --warmup 1 --no-peers --scheme sparse,last-k:1
bench-transformers: $(STAMP)
	mkdir -p out/bench
	$(TBENCH) --model llama_small --batch 4 --seq-len 128 --rounds 10 --steps 3 --json out/bench/llama_small-b4-t128.json
	$(TBENCH) --model bert_base4 --batch 4 --seq-len 128 --rounds 6 --steps 2 --json out/bench/bert_base4-b4-t128.json

# A LoRA step (r=8 on q_proj, v_proj) against PyTorch + peft's LoRA on the same Llama (docs/benchmarks.md, "LoRA").
bench-lora: $(STAMP)
	mkdir -p out/bench
	$(BIN)/python -m pockprop bench --model llama_small --batch 4 --seq-len 128 --scheme full --optimizer adamw \
	    --lora r=8,alpha=16,targets=q_proj,v_proj --no-peers --rounds 8 --steps 2 \
	    --configs ort-infer pockprop-lora pockprop-full torch-infer torch-full torch+peft --json out/bench/llama_small-lora.json

# Text fine-tuning through the device runtime (docs/accuracy.md, "Text"): a tiny Llama pre-trained in PyTorch on
# pydoc_data.topics' Language Reference, fine-tuned on its Library Reference with full, sparse, last-k:1 and LoRA.
# ARGS=--quick: a smoke run (out/text-quick, doc untouched).
text: $(STAMP)
	$(BIN)/python -m experiments.text $(ARGS)

# LoRA and a soft prompt on a small ViT vs full fine-tuning, through the device runtime (docs/accuracy.md, "ViT"):
# pre-trained in PyTorch on the digits' feature-level drift source, fine-tuned on its target, 3 seeds. A few
# minutes on 2 cores. ARGS=--quick: a smoke run (out/vit-quick, doc untouched).
vit: $(STAMP)
	$(BIN)/python -m experiments.vit $(ARGS)

# Sparse schemes vs full backprop on three digits drift tasks (docs/accuracy.md): pre-train, search, fine-tune
# every scheme with 3 seeds; writes out/accuracy/*.json and the tables of docs/accuracy.md. About 20 minutes
# on 2 cores. ARGS="--task input" runs one task, ARGS=--quick a smoke run (out/accuracy-quick, doc untouched).
accuracy: $(STAMP)
	$(BIN)/python -m experiments.accuracy $(ARGS)

# Multi-label continual rounds through the device runtime (docs/accuracy.md, "Multi-label"): digit mosaics
# pre-trained in PyTorch, drifted, 5 rounds with and without replay, 3 seeds; docs/multilabel.png. A few
# minutes on 2 cores. ARGS=--quick: a smoke run (out/multilabel-quick, doc untouched).
multilabel: $(STAMP)
	$(BIN)/python -m experiments.multilabel $(ARGS)
# A shipped target profile (compiler/profiles/ARCH.json, docs/tuning.md): the tuning kits of the zoo's MobileNetV2,
# ResNet-18 and MCUNet steps (batch 8, 128x128; full, sparse, bias-only) timed here with 2 threads. Run it on a
# quiet machine of that architecture, never under emulation (emulated timings are not timings).
PROFILE_ARCH ?= $(shell uname -m)
profiles: $(STAMP)
	mkdir -p out/tune
	for m in mobilenet_v2 resnet18 mcunet; do for s in full sparse bias-only; do \
	  $(BIN)/python -m pockprop compile models:$$m --input-shape 8,3,128,128 --scheme $$s -o out/tune/$$m-$$s \
	  --tune-kit out/tune/$$m-$$s.kit || exit 1; done; done
	$(BIN)/python -m pockprop tune out/tune/*.kit --threads 2 --repeat 10 --no-cache \
	  --out compiler/profiles/$(PROFILE_ARCH).json

clean:
	rm -rf $(VENV) out .pytest_cache
