"""Model names: a local checkpoint path, or a Hugging Face Hub repo id fetched through the hub's own cache.

``resolve_model(name)`` is what every entry point taking a checkpoint calls first (``Qwen3ASRModel`` and
``Qwen3ForcedAligner.from_pretrained``, ``load_pretrained``, ``convert``, the training loop and the programs'
``--model`` options):

- a path that exists (a directory such as ``huggingface-cli download ... --local-dir`` writes) is used as it is,
  even when it is also spelled like a repo id;
- otherwise an ``owner/name`` repo id is handed to ``huggingface_hub.snapshot_download``: the snapshot of
  ``revision`` (a branch, tag or commit; default ``main``) in the hub cache (``HF_HUB_CACHE``, or ``HF_HOME``'s
  ``hub/``, default ``~/.cache/huggingface/hub``), downloaded first when missing or out of date. With
  ``HF_HUB_OFFLINE=1`` only the cache is read. Pickle weight files in a repo are not downloaded (they are never
  read);
- anything else, and a repo that cannot be had, raises ``ModelNotFoundError`` naming the model and the reason.
"""

from __future__ import annotations

import os

from qasr_jax.errors import ModelNotFoundError


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled as a Hub model repo id, ``owner/name`` (as the hub client validates it)."""
    if name.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The local path of the checkpoint ``name_or_path`` names: the path itself when it exists, else the hub
    cache's snapshot of the repo id at ``revision`` (downloaded when needed and allowed).

    ``revision`` (a branch, tag or commit hash; default the repo's ``main``) applies to repo ids only; a local
    path is used as it is. ``cache_dir`` overrides the hub cache directory (default: the hub client's,
    ``HF_HUB_CACHE``). Raises ``ModelNotFoundError``.
    """
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if not is_repo_id(path):
        raise ModelNotFoundError(
            f"{path}: no such directory (nor a Hugging Face Hub model name such as Qwen/Qwen3-ASR-0.6B)",
            path,
            revision,
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from qasr_jax.weights import PICKLE_SUFFIXES  # (weights imports this module)

    offline = bool(constants.HF_HUB_OFFLINE)
    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    at = f" at revision {revision!r}" if revision else ""

    def failure(reason: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"{path}{at}: {reason}", path, revision)

    try:
        return snapshot_download(
            path,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            ignore_patterns=[f"*{suffix}" for suffix in PICKLE_SUFFIXES],  # never read, so never downloaded
        )
    except GatedRepoError as error:
        raise failure(
            "a gated repo on the Hugging Face Hub: accept its terms on the Hub, then log in "
            "(huggingface-cli login, or HF_TOKEN)"
        ) from error
    except RepositoryNotFoundError as error:
        raise failure(
            "not a local directory, and no such model repo on the Hugging Face Hub (a private repo needs "
            "huggingface-cli login or HF_TOKEN)"
        ) from error
    except RevisionNotFoundError as error:
        raise failure("the Hugging Face Hub repo has no such branch, tag or commit") from error
    except LocalEntryNotFoundError as error:
        cached = os.path.isdir(os.path.join(cache, "models--" + path.replace("/", "--")))
        what = "that revision is" if cached and revision else "it is"
        if offline:
            raise failure(
                f"not a local directory, and {what} not in the Hugging Face Hub cache {cache} while offline "
                "(HF_HUB_OFFLINE=1): download it online first, or pass a local directory"
            ) from error
        cause = error.__cause__ or error
        raise failure(
            f"not a local directory, {what} not in the Hugging Face Hub cache {cache}, and the Hub "
            f"({constants.ENDPOINT}) could not be reached ({type(cause).__name__})"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise failure(f"download from the Hugging Face Hub failed ({_first_line(error)})") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
