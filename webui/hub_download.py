"""Download a model from the Hugging Face Hub into the models folder.

The download goes to `<name>.partial` and is renamed into place only when complete, so the Models
tab never lists half a model. Offline (no network, or HF_HUB_OFFLINE set) gives one clear sentence
instead of a stack of connection errors."""
from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath

# Enough to run a model on every backend, nothing that is loaded with pickle.
HF_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class DownloadError(Exception):
    """A reason the download cannot happen, phrased for the user."""


def check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not _REPO_RE.match(repo_id) or ".." in repo_id:
        raise DownloadError(f"{repo_id!r} is not a Hub repo id: write it as owner/name, "
                            "e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    return repo_id


def check_filename(filename: str) -> str:
    """A single file of the repo (e.g. one GGUF); it lands in the models folder under its base name."""
    filename = (filename or "").strip()
    if not filename:
        return ""
    parts = PurePosixPath(filename).parts
    if filename.startswith("/") or "\\" in filename or any(p in ("..", ".") for p in parts):
        raise DownloadError(f"{filename!r} is not a file name inside the repo")
    if not filename.lower().endswith((".gguf", ".safetensors", ".json")):
        raise DownloadError(f"{filename!r}: only .gguf, .safetensors or .json files are downloaded alone")
    return filename


def target_name(repo_id: str, filename: str = "") -> str:
    return PurePosixPath(filename).name if filename else repo_id.split("/", 1)[1]


def _offline_message(repo_id: str, detail: str) -> str:
    return (f"Cannot download {repo_id}: the Hugging Face Hub is not reachable ({detail}). "
            "Connect to the internet, or download the model elsewhere and copy it into the models folder.")


def download(repo_id: str, models_dir: Path, filename: str = "", revision: str | None = None,
             tqdm_class=None) -> Path:
    """Fetch `repo_id` (whole HF folder, or one `filename`) into `models_dir`; returns the final path.
    Raises DownloadError with a human sentence on every expected failure."""
    import huggingface_hub
    from huggingface_hub import constants

    repo_id = check_repo_id(repo_id)
    filename = check_filename(filename)
    models_dir = Path(models_dir)
    name = target_name(repo_id, filename)
    final = models_dir / name
    if final.exists():
        raise DownloadError(f"{name} is already in the models folder: delete or rename it first")
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(_offline_message(repo_id, "offline mode is on: HF_HUB_OFFLINE is set"))

    # One quick metadata call first: fails fast when offline (the file downloads retry for ~30 s)
    # and tells us whether the repo holds what we are about to fetch.
    try:
        info = huggingface_hub.model_info(repo_id, revision=revision, timeout=15)
    except Exception as exc:
        raise _translate(exc, repo_id, filename, revision) from None
    files = [s.rfilename for s in (info.siblings or [])]
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if filename and filename not in files:
        hint = f"; its GGUF files: {', '.join(ggufs[:8])}" if ggufs else ""
        raise DownloadError(f"{repo_id} has no file {filename!r}{hint}")
    if not filename and not any(f.endswith(".safetensors") for f in files):
        hint = f" Name one of its GGUF files instead: {', '.join(ggufs[:8])}" if ggufs else ""
        raise DownloadError(f"{repo_id} has no .safetensors weights (pickle weights are not loaded).{hint}")

    partial = models_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if filename:
            got = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=partial,
                                                  tqdm_class=tqdm_class)
            Path(got).replace(final)
        else:
            huggingface_hub.snapshot_download(repo_id, revision=revision, local_dir=partial,
                                              allow_patterns=list(HF_PATTERNS), tqdm_class=tqdm_class)
            shutil.rmtree(partial / ".cache", ignore_errors=True)
            partial.replace(final)
    except Exception as exc:
        raise _translate(exc, repo_id, filename, revision) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _translate(exc: Exception, repo_id: str, filename: str, revision: str | None) -> Exception:
    """Map hub/httpx errors to one DownloadError sentence; unknown errors pass through unchanged."""
    from huggingface_hub import errors

    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or _looks_like_network(exc):
        return DownloadError(_offline_message(repo_id, f"{type(exc).__name__}: {exc}"[:160]))
    if isinstance(exc, errors.GatedRepoError):
        return DownloadError(f"{repo_id} is gated: accept its license on huggingface.co and log in "
                             "with `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(f"{repo_id} does not exist on the Hub (or is private)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no revision {revision!r}")
    if isinstance(exc, errors.EntryNotFoundError):
        return DownloadError(f"{repo_id} has no file {filename!r}")
    if isinstance(exc, OSError):
        return DownloadError(f"Cannot download {repo_id}: {exc}")
    return exc


def _looks_like_network(exc: BaseException) -> bool:
    """httpx errors do not derive from ConnectionError; walk the chain and look at the names."""
    seen = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(
                key in name for key in ("Connect", "Timeout", "NetworkError", "ProxyError", "TransportError")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
