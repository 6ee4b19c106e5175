"""Fine-tuning Qwen3-ASR and the ForcedAligner on a device mesh (``python -m train --config ...``).

* ``config``: the TOML config as frozen dataclasses; ``data``: manifests → grain batches;
* ``losses``, ``optim``, ``step``: the objective, AdamW + schedules, the compiled sharded train/eval steps;
* ``checkpointing``: Orbax train-state checkpoints (atomic, keep-last-K, resumable data position);
* ``evaluate``: loss, WER/CER, aligner boundary shift; ``metrics``: JSONL + progress bar;
* ``loop.train``: all of it together (the trained params are exported with ``qasr_jax.weights.export_pretrained``).
"""

from qasr_jax.training.config import TrainConfig, load_train_config
from qasr_jax.training.loop import train

__all__ = ["TrainConfig", "load_train_config", "train"]
