"""The fine-tuning program (``python -m train --config train/configs/NAME.toml [section.key=value ...]``) and the
demo-data tools next to it; the logic lives in ``qasr_jax.training``."""
