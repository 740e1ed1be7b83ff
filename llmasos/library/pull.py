"""`llmasos pull`: fetch a model from the Hugging Face Hub through `huggingface_hub`, only the files the runtime reads.

One `model_info` call lists the files with their sizes and checksums; each file is downloaded to
`.downloads/<checksum>.part` with `huggingface_hub`'s `http_get` (a later pull resumes it with an HTTP Range request),
verified against the Hub's sha256 (LFS files) or git blob id (small files), and only when every file is complete and
the checkpoint validates is it renamed into the store and registered. Hub errors end as one LibraryError line."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.errors import LibraryError, LLMasOSError
from llmasos.library import store
from llmasos.library.catalog import alias_for_repo, lookup
from llmasos.library.importer import register_staged
from llmasos.library.names import check_name, check_repo_id, check_revision, default_name_for_repo
from llmasos.library.progress import DownloadProgress
from llmasos.library.registry import LibraryModel, get_model

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "h11", "httpcore")


@dataclass(frozen=True)
class PullSpec:
    repo_id: str
    revision: str
    name: str


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    digest: str  # sha256 for LFS files, the git blob sha1 otherwise
    lfs: bool

    @property
    def key(self) -> str:
        return self.digest if self.lfs else f"git-{self.digest}"


def parse_spec(spec: str, name: str | None = None) -> PullSpec:
    """'qwen2.5:0.5b-instruct', 'Qwen/Qwen2.5-0.5B-Instruct', 'owner/repo:revision' or 'alias:revision'."""
    if not isinstance(spec, str) or not spec or "\x00" in spec:
        raise LibraryError("give a catalog name such as 'qwen2.5:0.5b-instruct' or a Hub repo id such as 'owner/name'")
    if name is not None:
        check_name(name)
    if "/" in spec:
        repo_id, _, revision = spec.partition(":")
        check_repo_id(repo_id)
        revision = check_revision(revision) if revision else "main"
        alias = alias_for_repo(repo_id) if revision == "main" else None
        return PullSpec(repo_id, revision, name or alias or default_name_for_repo(repo_id, revision))
    entry, revision = lookup(spec), "main"
    if entry is None and ":" in spec:
        prefix, _, revision = spec.rpartition(":")
        entry = lookup(prefix)
        if entry is not None:
            check_revision(revision)
    if entry is None:
        raise LibraryError(f"{spec!r} is not in the catalog (`llmasos list --available` shows it); to pull any other "
                           "model give its Hub repo id, e.g. `llmasos pull HuggingFaceTB/SmolLM2-135M-Instruct`")
    default = entry.alias if revision == "main" else f"{entry.alias}-{revision.lower()}"
    return PullSpec(entry.repo_id, revision, name or check_name(re.sub(r"[^a-z0-9._:-]", "-", default)))


def offline_mode() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@contextlib.contextmanager
def hub_errors(spec: PullSpec) -> Iterator[None]:
    """Turn huggingface_hub and network errors into one LibraryError line that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = spec.repo_id
    resume = "partial downloads are kept: run the same pull again to resume"
    try:
        yield
    except OfflineModeIsEnabled:
        raise LibraryError(offline_message(spec)) from None
    except GatedRepoError:
        raise LibraryError(gated_message(repo)) from None
    except RepositoryNotFoundError:
        raise LibraryError(f"{repo} was not found on the Hub ({endpoint()}): check the repo id; if it is private, "
                           "log in with `hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise LibraryError(f"{repo} has no revision {spec.revision!r}: give an existing branch, tag or "
                           "commit") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "an error")
        if status == 401:
            raise LibraryError(f"the Hub refused the credentials sent for {repo}: check HF_TOKEN or log in again with "
                               "`hf auth login`") from None
        raise LibraryError(f"the Hub answered {status} while pulling {repo}; try again later ({resume})") from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in _NETWORK_MODULES or isinstance(exc, ConnectionError):
            raise LibraryError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}: {exc}); check your "
                               f"network connection or HF_ENDPOINT ({resume})") from None
        raise


def offline_message(spec: PullSpec) -> str:
    return (f"cannot pull {spec.repo_id}: offline mode is on (HF_HUB_OFFLINE). Unset HF_HUB_OFFLINE to download, or "
            "import a local copy with `llmasos import DIR --name NAME`")


def gated_message(repo: str) -> str:
    return (f"{repo} is gated: accept its license at https://huggingface.co/{repo} with your Hub account, then log in "
            "with `hf auth login` or set HF_TOKEN, and pull again")


def remote_files(info: Any, repo: str) -> list[RemoteFile]:
    """The runtime files of a repo, with the sizes and checksums the Hub reported; refuses repos we cannot use."""
    files: list[RemoteFile] = []
    names = [sibling.rfilename for sibling in info.siblings or []]
    for sibling in info.siblings or []:
        if not store.is_runtime_file(sibling.rfilename):
            continue
        if sibling.lfs is not None:
            digest, size, lfs = str(sibling.lfs.sha256), sibling.lfs.size, True
            valid = _SHA256.fullmatch(digest)
        else:
            digest, size, lfs = str(sibling.blob_id), sibling.size, False
            valid = _SHA1.fullmatch(digest)
        if not valid or not isinstance(size, int) or size < 0:
            raise LibraryError(f"the Hub gave no valid checksum or size for {repo}/{sibling.rfilename}; refusing to "
                               "download a file that cannot be verified")
        files.append(RemoteFile(sibling.rfilename, size, digest, lfs))
    present = {file.path for file in files}
    if "config.json" not in present:
        raise LibraryError(f"{repo} has no config.json: it is not a transformers model repo")
    if not any(path.endswith(".safetensors") for path in present):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        extra = " (it has only pickle weights, which can run code and are refused)" if pickles else ""
        raise LibraryError(f"{repo} has no safetensors weights{extra}; pick a repo with *.safetensors files")
    if "tokenizer.json" not in present:
        raise LibraryError(f"{repo} has no tokenizer.json, which LLMasOS needs; pick a repo that has one")
    return files


def _select_weights(files: list[RemoteFile], index: dict | None) -> list[RemoteFile]:
    """Drop safetensors that the runtime would not read (e.g. Mistral's consolidated.safetensors next to shards)."""
    weights = {file.path for file in files if file.path.endswith(".safetensors")}
    if index is not None:
        try:
            wanted = set(index["weight_map"].values())
        except (KeyError, TypeError, AttributeError):
            raise LibraryError("model.safetensors.index.json on the Hub is not a valid shard index") from None
        missing = wanted - weights
        if missing:
            raise LibraryError(f"the shard index names files the repo does not have: {', '.join(sorted(missing))}")
        weights = wanted
    elif "model.safetensors" in weights:
        weights = {"model.safetensors"}
    return [file for file in files if not file.path.endswith(".safetensors") or file.path in weights]


def _verify(path: Path, file: RemoteFile) -> str:
    """Check a complete download against the Hub's checksum; return its sha256. A mismatch deletes the file."""
    sha256 = store.sha256_file(path)
    actual = sha256 if file.lfs else store.git_blob_sha1(path)
    if actual != file.digest:
        path.unlink(missing_ok=True)
        kind = "sha256" if file.lfs else "git blob id"
        raise LibraryError(f"checksum mismatch for {file.path}: the Hub promised {kind} {file.digest[:16]}... but the "
                           f"download has {actual[:16]}...; the file was discarded, nothing was installed")
    return sha256


def download(url: str, file: RemoteFile, progress: DownloadProgress, headers: dict[str, str]) -> tuple[Path, str]:
    """Download (or resume) one file into .downloads/, verify it; return its path and sha256."""
    from huggingface_hub.file_download import http_get

    part = store.downloads_dir() / f"{file.key}.part"
    with store.lock(f"blob:{file.key}"):
        resume_size = part.stat().st_size if part.exists() else 0
        if resume_size > file.size:
            part.unlink()
            resume_size = 0
        bar = progress.bar(file.path)
        if resume_size < file.size:
            with part.open("r+b" if resume_size else "wb") as handle:
                handle.seek(resume_size)
                try:
                    http_get(url, handle, resume_size=resume_size, headers=dict(headers), expected_size=file.size,
                             displayed_filename=file.path, tqdm_class=bar)
                except OSError as exc:
                    if "Consistency check failed" not in str(exc):  # huggingface_hub's wording for a short body
                        raise
                    raise LibraryError(f"the download of {file.path} ended early or ran long ({handle.tell()} "
                                       f"of {file.size} bytes); run the same pull again to resume") from None
                handle.truncate()
        else:
            bar(total=file.size, initial=file.size)
        return part, _verify(part, file)


def pull(spec_text: str, name: str | None = None, *, show_progress: bool = True) -> tuple[LibraryModel, str]:
    """Pull a catalog model or Hub repo into the library. Returns the row and 'pulled', 'updated' or 'up to date'.

    Pulls of one repo or one name are serialized by locks (repo first, then name, always in that order); the second
    of two identical pulls then finds the model up to date."""
    spec = parse_spec(spec_text, name)
    if offline_mode():
        raise LibraryError(offline_message(spec))
    progress = DownloadProgress(enabled=show_progress)

    def waiting() -> None:
        progress.note(f"waiting for another pull of {spec.repo_id} or {spec.name} to finish")

    with store.lock(f"pull-repo:{spec.repo_id.lower()}", on_wait=waiting), \
            store.lock(f"pull:{spec.name}", on_wait=waiting):
        return _pull_locked(spec, progress)


def _pull_locked(spec: PullSpec, progress: DownloadProgress) -> tuple[LibraryModel, str]:
    from huggingface_hub import HfApi, get_token, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    hub = endpoint()
    with hub_errors(spec):
        info = HfApi(endpoint=hub).model_info(spec.repo_id, revision=spec.revision, files_metadata=True)
    commit = str(info.sha or "")
    if not _SHA1.fullmatch(commit):
        raise LibraryError(f"the Hub gave no valid commit id for {spec.repo_id}@{spec.revision}")
    existing = get_model(spec.name)
    if existing is not None:
        if existing.source_type != "hub" or existing.source_repo != spec.repo_id:
            raise LibraryError(f"a model named {spec.name!r} already exists ({existing.source_text()}); remove it "
                               f"first (`llmasos rm {spec.name}`) or pull under another name with --name")
        if existing.source_commit == commit and store.checkpoint_path(existing.directory).is_dir():
            return existing, "up to date"
    if info.gated and get_token() is None:
        raise LibraryError(gated_message(spec.repo_id))
    files = remote_files(info, spec.repo_id)
    headers = build_hf_headers()
    progress.note(f"pulling {spec.repo_id}@{spec.revision} (commit {commit[:12]}) as {spec.name}")
    done: dict[str, tuple[Path, str]] = {}

    def fetch(batch: list[RemoteFile]) -> None:
        for file in batch:
            url = hf_hub_url(spec.repo_id, file.path, revision=commit, endpoint=hub)
            done[file.path] = download(url, file, progress, headers)

    with progress, hub_errors(spec):
        # Small files first: an unsupported family or a bad shard index is refused before gigabytes are fetched.
        fetch([file for file in files if not file.path.endswith(".safetensors")])
        _check_config(done["config.json"][0], spec.repo_id)
        index_file = done.get("model.safetensors.index.json")
        index = _read_index(index_file[0]) if index_file else None
        weights = [file for file in _select_weights(files, index) if file.path.endswith(".safetensors")]
        _check_disk_space(sum(file.size for file in weights))
        fetch(weights)
    license_name = getattr(getattr(info, "card_data", None), "license", None)
    with store.staging(spec.name) as staged:
        hashes: dict[str, str] = {}
        for relative, (path, sha256) in done.items():
            target = staged / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            hashes[relative] = sha256
        row = register_staged(staged, spec.name, hashes, source_type="hub", replace=existing is not None,
                              source_repo=spec.repo_id, source_revision=spec.revision, source_commit=commit,
                              license=str(license_name) if license_name else None)
    return row, "updated" if existing is not None else "pulled"


def _read_index(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibraryError(f"model.safetensors.index.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LibraryError("model.safetensors.index.json must hold a JSON object")
    return data


def _check_config(path: Path, repo: str) -> None:
    from llmasos.models import load_config

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibraryError(f"{repo}: config.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{repo}: config.json must hold a JSON object")
    try:
        load_config(data)
    except LLMasOSError as exc:
        raise LibraryError(f"cannot use {repo}: {exc}") from None


def _check_disk_space(needed: int) -> None:
    from llmasos.files import check_free_space

    check_free_space(store.downloads_dir(), needed, "the model")
