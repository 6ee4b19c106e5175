"""Checkpoint conversion program: ``python -m convert SRC DST [--dtype bfloat16] [--verify]``."""
