"""Fine-tune Qwen3-ASR or the ForcedAligner on a device mesh.

    python -m train --config train/configs/NAME.toml [section.key=value ...]

Overrides use TOML values (``optim.learning_rate=3e-5``, ``model.freeze=["encoder"]``,
``mesh.spec="data=2,tensor=4"``). Running the same command again resumes from the newest complete checkpoint
in ``run.output_dir``, and compiles nothing again (JAX's persistent compilation cache, as the ``infer`` programs
keep it). Multi-host: start it on every host with ``mesh.distributed=true``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from qasr_jax import compile_cache
from qasr_jax.errors import QasrError
from qasr_jax.training import load_train_config, train
from qasr_jax.training.loop import GateFailed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="a TOML file (see train/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (TOML value syntax)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help="JAX's persistent compilation cache, so that a resumed or repeated run compiles "
                             "nothing again: a directory, or off (default: $QASR_COMPILATION_CACHE or "
                             "~/.cache/qasr-jax/xla)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)  # fmt: skip
    # Orbax reports every checkpoint phase at INFO through absl; keep the run's own log readable.
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    compile_cache.enable(args.compilation_cache)
    try:
        config = load_train_config(args.config, args.overrides)
        summary = train(config)
    except QasrError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except GateFailed as error:
        print(f"no-go: {error}", file=sys.stderr)
        return 3
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
