# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSETS := demo_assets
OUT := demo_outputs
MODEL := $(ASSETS)/tiny-r1-llama
# The demo's training flags: the tiny model learns fast at a LoRA learning rate far above the 8B's 2e-4.
DEMO_TRAIN_FLAGS := --num_epochs 2 --batch_size 8 --grad_accum 1 --learning_rate 3e-3 --eval_steps 100 --save_steps 200

.PHONY: demo test assets clean

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # first: a CPU build from local disk, not a multi-GB CUDA one
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(MODEL)/model.safetensors: $(VENV)/.installed build_demo_assets.py
	$(PY) build_demo_assets.py --out $(ASSETS)

assets: $(MODEL)/model.safetensors

demo: assets
	$(PY) test_preprocessing.py --data_path $(ASSETS)/PMC-VQA --model_name_or_path $(MODEL)
	$(PY) preprocess_pmc_vqa_for_sft.py --data_path $(ASSETS)/PMC-VQA --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/processed
	$(PY) train_sft_example.py --data_path $(OUT)/processed --model_name_or_path $(MODEL) \
		--output_dir $(OUT)/sft $(DEMO_TRAIN_FLAGS)
	$(PY) inference_example.py --evaluate --method both --compare_base --model_name_or_path $(MODEL) \
		--adapter_path $(OUT)/sft/final_model --data_path $(OUT)/processed
	$(PY) inference_example.py --model_name_or_path $(MODEL) --adapter_path $(OUT)/sft/final_model \
		--data_path $(OUT)/processed

test: assets
	$(PY) -m pytest -q tests

clean:
	rm -rf $(OUT) $(ASSETS)
