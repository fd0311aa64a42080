"""Run train_sft_example.main() under torchrun, recording what each rank trained on and ended with.

Used by test_training.py: torchrun --nproc_per_node 2 tests/ddp_probe.py OUT_JSON_DIR <train flags...>
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformers  # noqa: E402

import train_sft_example  # noqa: E402

seen = []
original_step = transformers.Trainer.training_step


def recording_step(self, model, inputs, *args, **kwargs):
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        seen.append([t for t, m in zip(ids, mask) if m])
    return original_step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = recording_step
out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
trainer = train_sft_example.main(argv)
lora = {name: param.detach().double().sum().item() for name, param in trainer.model.named_parameters()
        if "lora_" in name}
rank = int(os.environ.get("RANK", 0))
(out_dir / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "lora": lora,
                                                      "ddp": type(trainer.model_wrapped).__name__}))
