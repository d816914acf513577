"""A local stand-in for the Hugging Face Hub: serves model repositories over HTTP the way
huggingface.co does, so that the real ``huggingface_hub`` client (and vLLM and Transformers
through it) download from it when ``HF_ENDPOINT`` points here. Helper for tests, not a test
module; ``python tests/hub_server.py --repo ORG/NAME=DIR`` serves folders by hand.

What is emulated (the routes and headers huggingface_hub 2.x reads):

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the model info, with
  ``sha`` (the commit a revision resolves to) and ``siblings`` (``?blobs=true``: sizes,
  blob ids, LFS info);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``: file
  listings (``type``, ``path``, ``size``, ``oid``, ``lfs``);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: small files answer 200 with ``ETag`` (the git
  blob id), ``X-Repo-Commit`` and ``Content-Length``; LFS files (``*.safetensors``, anything
  over 10 MB) answer ``302`` to a "CDN" URL on another host name (``localhost`` vs
  ``127.0.0.1``), carrying ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``, as the Hub does; ``Range`` requests are honoured;
* errors as the Hub sends them, with ``X-Error-Code``: unknown repository 401
  ``RepoNotFound``; unknown revision 404 ``RevisionNotFound``; missing file 404
  ``EntryNotFound`` (with ``X-Repo-Commit``, so the client caches the absence); gated
  repository 401 ``GatedRepo`` without a token, 403 with one; a renamed repository answers
  ``307`` to its new name. ``deny`` makes single files answer 403 (a proxy or mirror that
  refuses them).

Every request is recorded in :attr:`LocalHub.requests` (method, path, status), so a test can
check what was fetched, or that an offline run made no request at all.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024


@dataclass(frozen=True)
class RepoFile:
    path: str
    data: bytes

    @property
    def blob_id(self) -> str:  # git's blob id: sha1("blob <size>\0" + content)
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(".safetensors") or len(self.data) > LFS_THRESHOLD

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False
    deny: dict[str, int] = field(default_factory=dict)  # file -> HTTP status (403: refused)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None


class LocalHub:
    """``with LocalHub() as hub: hub.add_repo("org/name", folder)``; ``hub.endpoint`` is HF_ENDPOINT."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.repos: dict[str, Repo] = {}
        self.renamed: dict[str, str] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.verbose = verbose
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---- set-up ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn(self) -> str:
        """Another host name for the same server: the client treats it as a CDN (no auth, no metadata)."""
        return f"http://localhost:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, folder: str | Path, *, revision: str = "main", exclude=(), rename=None,
                 gated: bool = False) -> str:
        """Commit the files of ``folder`` (minus ``exclude``; ``rename``: {old: new}) to ``repo_id`` as
        ``revision`` (a branch or tag name). Returns the commit sha."""
        folder = Path(folder)
        rename = dict(rename or {})
        files = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name not in exclude:
                name = rename.get(p.name, p.name)
                files[name] = RepoFile(name, p.read_bytes())
        sha = hashlib.sha1(repo_id.encode() + revision.encode()
                           + b"".join(f.path.encode() + f.blob_id.encode() for f in files.values())).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.commits[sha] = files
            repo.refs[revision] = sha
            repo.gated = repo.gated or gated
        return sha

    def deny(self, repo_id: str, filename: str, status: int = 403) -> None:
        self.repos[repo_id].deny[filename] = status

    def rename_repo(self, old: str, new: str) -> None:
        """Requests for ``old`` are redirected (307) to ``new``, as after a rename on the Hub."""
        self.renamed[old] = new

    def fetched(self, suffix: str = "") -> list[str]:
        """Paths of the successful GETs of files (``/resolve/`` and CDN) ending with ``suffix``."""
        return [p for m, p, s in self.requests if m == "GET" and s in (200, 206) and "/resolve/" in p
                and p.split("?")[0].endswith(suffix)]

    # ---- life cycle -----------------------------------------------------------------------
    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))
        if self.verbose:
            print(f"[hub] {method} {path} -> {status}", flush=True)


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_API_PATHS = re.compile(rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _handler_for(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # the hub records requests itself
            pass

        def do_HEAD(self):
            self._dispatch(head=True)

        def do_GET(self):
            self._dispatch(head=False)

        def do_POST(self):
            self._dispatch(head=False)

        # ---- routing ------------------------------------------------------------------
        def _dispatch(self, head: bool) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            status = 500
            try:
                if m := _CDN.match(path):
                    status = self._cdn(m["sha"], head)
                elif m := _RESOLVE.match(path):
                    status = self._resolve(m["repo"], m["rev"], m["path"], head)
                elif m := _API_TREE.match(path):
                    status = self._tree(m["repo"], m["rev"], m["path"])
                elif m := _API_PATHS.match(path):
                    status = self._paths_info(m["repo"], m["rev"])
                elif m := _API_INFO.match(path):
                    status = self._info(m["repo"], m["rev"] or "main", query)
                else:
                    raise _HubError(404, None, f"no such route: {path}")
            except _Redirect as r:
                status = self._send(r.status, b"", {"Location": r.location}, head)
            except _HubError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                if e.commit:
                    headers["X-Repo-Commit"] = e.commit
                body = json.dumps({"error": e.message}).encode()
                status = self._send(e.status, body, headers, head, "application/json")
            hub._record(self.command, self.path, status)

        def _repo(self, repo_id: str, rest: str) -> Repo:
            if repo_id in hub.renamed:
                new = re.sub(rf"/{re.escape(repo_id)}(?=/|$|\?)", f"/{hub.renamed[repo_id]}", self.path, count=1)
                raise _Redirect(307, new)
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise _HubError(401, "RepoNotFound", "Repository not found")
            return repo

        def _commit(self, repo: Repo, rev: str) -> str:
            sha = repo.resolve(rev)
            if sha is None:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return sha

        # ---- routes --------------------------------------------------------------------
        def _info(self, repo_id: str, rev: str, query) -> int:
            repo = self._repo(repo_id, "")
            sha = self._commit(repo, rev)
            files = repo.commits[sha]
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in files.values():
                s = {"rfilename": f.path}
                if blobs:
                    s.update(size=len(f.data), blobId=f.blob_id)
                    if f.is_lfs:
                        s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(s)
            info = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "sha": sha, "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": ["safetensors"], "library_name": "transformers",
                "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z",
                "siblings": siblings, "usedStorage": sum(len(f.data) for f in files.values()),
            }
            return self._send(200, json.dumps(info).encode(), {}, False, "application/json")

        def _tree(self, repo_id: str, rev: str, sub: str | None) -> int:
            repo = self._repo(repo_id, "")
            files = repo.commits[self._commit(repo, rev)]
            prefix = (sub.strip("/") + "/") if sub else ""
            entries = [f.tree_entry() for f in files.values() if f.path.startswith(prefix)]
            return self._send(200, json.dumps(entries).encode(), {}, False, "application/json")

        def _paths_info(self, repo_id: str, rev: str) -> int:
            repo = self._repo(repo_id, "")
            files = repo.commits[self._commit(repo, rev)]
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            try:
                paths = json.loads(raw)["paths"]
            except (ValueError, KeyError, TypeError):
                paths = parse_qs(raw).get("paths", [])
            entries = [files[p].tree_entry() for p in paths if p in files]
            return self._send(200, json.dumps(entries).encode(), {}, False, "application/json")

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> int:
            repo = self._repo(repo_id, "")
            sha = self._commit(repo, rev)
            if repo.gated:
                if self.headers.get("Authorization"):
                    raise _HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                    "the authorized list. Visit the model page to ask for access.")
                raise _HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.")
            if path in repo.deny:
                raise _HubError(repo.deny[path], None, f"Access to {path} is forbidden", commit=sha)
            f = repo.commits[sha].get(path)
            if f is None:
                raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", commit=sha)
            common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            if f.is_lfs:  # the Hub redirects LFS files to its CDN; the metadata is on this response
                location = f"{hub.cdn}/cdn/{f.sha256}?repo={quote(repo_id)}&file={quote(path)}"
                headers = {**common, "Location": location, "X-Linked-Etag": f'"{f.sha256}"',
                           "X-Linked-Size": str(len(f.data)), "ETag": f'"{f.blob_id}"'}
                return self._send(302, b"", headers, head)
            return self._send_file(f.data, {**common, "ETag": f'"{f.blob_id}"'}, head)

        def _cdn(self, sha: str, head: bool) -> int:
            for repo in list(hub.repos.values()):
                for files in repo.commits.values():
                    for f in files.values():
                        if f.sha256 == sha:
                            return self._send_file(f.data, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}, head)
            raise _HubError(404, None, "no such object")

        # ---- responses -----------------------------------------------------------------
        def _send_file(self, data: bytes, headers: dict, head: bool) -> int:
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
            if m:
                start = int(m[1])
                end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
                return self._send(206, data[start:end + 1], headers, head, "application/octet-stream")
            return self._send(200, data, headers, head, "application/octet-stream")

        def _send(self, status: int, body: bytes, headers: dict, head: bool, ctype: str = "text/plain") -> int:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Date", email.utils.formatdate(time.time(), usegmt=True))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
            return status

    return Handler


class _Redirect(Exception):
    def __init__(self, status: int, location: str):
        self.status, self.location = status, location


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Serve model folders the way the Hugging Face Hub does (for tests)")
    ap.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="a repository to serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    hub = LocalHub(args.host, args.port, verbose=True)
    for spec in args.repo:
        repo_id, _, folder = spec.partition("=")
        print(f"[hub] {repo_id} @ main = {hub.add_repo(repo_id, folder)} <- {folder}", flush=True)
    print(f"[hub] serving on {hub.endpoint}  (export HF_ENDPOINT={hub.endpoint})", flush=True)
    hub.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
