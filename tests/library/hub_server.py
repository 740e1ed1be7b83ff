"""A local stand-in for the Hugging Face Hub: the endpoints `huggingface_hub` calls, on a real HTTP server.

Serves `/api/models/{repo}[/revision/{rev}]` (model info with file sizes, git blob ids and LFS sha256) and
`/{repo}/resolve/{rev}/{file}` (HEAD and GET, with X-Repo-Commit, ETag, X-Linked-Etag / X-Linked-Size, Range),
answering errors with the Hub's X-Error-Code headers. Faults to order: cut a transfer mid-file, answer 503, serve bytes
that do not match the advertised checksum. Every request is recorded for the tests to inspect."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    revisions: tuple[str, ...] = ("main",)
    gated: bool = False
    license: str | None = None
    accepted_tokens: set[str] = field(default_factory=set)  # tokens whose accounts accepted a gated repo's terms
    lfs_overrides: dict[str, dict] = field(default_factory=dict)  # path -> LFS fields a hostile Hub would claim

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        entry = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entry["lfs"].update(self.lfs_overrides.get(path, {}))
        return entry


@dataclass
class Faults:
    """Misbehaviour per file path. Counters count down with each GET of that file."""

    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops
    cut_times: dict[str, int] = field(default_factory=dict)  # how many GETs get cut (default 1)
    unavailable_after_cut: dict[str, int] = field(default_factory=dict)  # path -> how many GETs answer 503 next
    corrupt: set[str] = field(default_factory=set)  # serve flipped bytes under the honest size and checksum
    delay: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before sending the body
    short: set[str] = field(default_factory=set)  # send only the first half, with a Content-Length that matches it


class HubStandIn:
    """`with HubStandIn() as hub: hub.add_repo(...); env HF_ENDPOINT=hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, directory: Path | None = None, files: dict[str, bytes] | None = None,
                 **options) -> Repo:
        contents = dict(files or {})
        if directory is not None:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    contents.setdefault(path.relative_to(directory).as_posix(), path.read_bytes())
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(contents.values()))).hexdigest()
        repo = Repo(repo_id, contents, commit, **options)
        self.repos[repo_id] = repo
        return repo

    def gets(self, path_suffix: str) -> list[tuple[str, str, str | None]]:
        """Recorded GETs of files whose URL ends with `path_suffix`."""
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(path_suffix) and "/resolve/" in r[1]]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

            def _error(self, status: int, code: str | None, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if api:
                    return self._model_info(api.group(1), api.group(2) or "main")
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve:
                    return self._resolve(*resolve.groups(), head=head)
                self._error(404, None, "Not found")

            def _repo(self, repo_id: str, revision: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if revision not in repo.revisions and revision != repo.commit:
                    self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                    return None
                return repo

            def _model_info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                data = {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                        "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                        "tags": [], "siblings": [repo.sibling(path) for path in sorted(repo.files)]}
                if repo.license:
                    data["cardData"] = {"license": repo.license}
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _resolve(self, repo_id: str, revision: str, file: str, head: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if repo.gated and token not in repo.accepted_tokens:
                    return self._error(403, "GatedRepo", "Access to model " + repo_id + " is restricted")
                if file not in repo.files:
                    return self._error(404, "EntryNotFound", "Entry not found")
                data = repo.files[file]
                sibling = repo.sibling(file)
                etag = sibling["lfs"]["sha256"] if "lfs" in sibling else sibling["blobId"]
                if not head and file in hub.faults.corrupt:
                    data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                if not head and file in hub.faults.short:
                    data = data[: len(data) // 2]
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not head:
                    match = re.fullmatch(r"bytes=(\d+)-", range_header)
                    start = int(match.group(1)) if match else 0
                if not head and hub.faults.unavailable_after_cut.get(file, 0) > 0 and file not in \
                        hub.faults.cut_after:
                    hub.faults.unavailable_after_cut[file] -= 1
                    return self._error(503, None, "Service unavailable")
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{etag}"')
                if "lfs" in sibling:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                time.sleep(hub.faults.delay.get(file, 0.0))
                cut = hub.faults.cut_after.get(file)
                if cut is not None and cut > start:
                    self.wfile.write(data[start:cut])
                    self.wfile.flush()
                    remaining = hub.faults.cut_times.get(file, 1) - 1
                    hub.faults.cut_times[file] = remaining
                    if remaining <= 0:
                        del hub.faults.cut_after[file]
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        return Handler
