"""A loopback Hugging Face Hub for tests (stdlib only).

Speaks the slice of the Hub HTTP API that the real ``huggingface_hub`` client (1.x and 2.x) uses for repo creation,
commits, repo/tree info and file downloads, so tests drive ``push_to_hub`` / ``from_pretrained`` / ``hf_hub_download``
over real HTTP. Usage::

    with local_hub() as hub:       # sets HF_ENDPOINT, HF_HOME, HF_TOKEN and the constants read at import time
        model.push_to_hub("user/tiny")

Behaviour mirrors the Hub where the client depends on it:
- errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound); the client maps them to exceptions.
- a missing repo answers 401 without a token and 404 with one; a wrong token answers 401 "Invalid credentials".
- preupload answers ``uploadMode: regular`` for every file, so content travels base64 in the ndjson commit: no LFS or
  Xet transfer is ever needed.
- files matching the repo's ``.gitattributes`` LFS patterns (or >= 10 MiB) are served like LFS files: ``/resolve``
  answers 302 with ``X-Linked-Etag``/``X-Linked-Size`` and an absolute Location on a different host name
  (``localhost`` vs ``127.0.0.1``), so the client reads the metadata off the redirect and downloads from the "CDN"
  without the auth header, exactly as it does against huggingface.co.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fnmatch
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from posixpath import basename
from urllib.parse import parse_qs, quote, unquote, urlsplit

USER = "user"
TOKEN = "hf_localhubfaketoken0123456789"
PUBLIC_HUB_HOSTS = {"huggingface.co", "hf.co", "hub-ci.huggingface.co"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
LFS_MIN_SIZE = 10 * 1024 * 1024
# Abridged version of the .gitattributes the Hub writes into every new repo.
GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in "*.7z *.arrow *.bin *.ckpt *.gz *.h5 *.model *.msgpack *.npy *.npz *.onnx *.parquet *.pb *.pickle "
    "*.pkl *.pt *.pth *.safetensors *.tar *.tflite *.zip *tfevents* saved_model/**/*".split()
).encode()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]  # full snapshot: path -> content


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    sdk: str | None = None
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # also holds "refs/pr/N"
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit:
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[oid]

    def add_commit(self, branch: str, files: dict[str, bytes], title: str, message: str = "") -> Commit:
        parent = self.branches.get(branch)
        seed = json.dumps([parent, sorted((p, git_sha1(c)) for p, c in files.items()), title, len(self.commits)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    @staticmethod
    def is_lfs(commit: Commit, path: str) -> bool:
        if len(commit.files[path]) >= LFS_MIN_SIZE:
            return True
        for line in commit.files.get(".gitattributes", b"").decode().splitlines():
            pattern, *attrs = line.split() or [""]
            if "filter=lfs" in attrs and fnmatch.fnmatch(path if "/" in pattern else basename(path), pattern):
                return True
        return False

    def file_entry(self, commit: Commit, path: str, sibling: bool = False) -> dict:
        """A file as `tree`/`paths-info` (or, with `sibling`, as `siblings` of repo info) describe it."""
        data = commit.files[path]
        lfs = None
        if self.is_lfs(commit, path):
            pointer = lfs_pointer(data)
            key = "sha256" if sibling else "oid"
            lfs = {key: hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            data = pointer  # the git blob of an LFS file is its pointer
        if sibling:
            return {"rfilename": path, "size": len(data), "blobId": git_sha1(data), **({"lfs": lfs} if lfs else {})}
        return {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data), **({"lfs": lfs} if lfs else {})}


class HubState:
    """All repos plus a content-addressed store of uploaded blobs (sha256 -> bytes), served by the fake CDN."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for assertions in tests
        self.unhandled: list[tuple[str, str]] = []  # routes this server does not implement
        self.errors: list[str] = []  # tracebacks of server-side bugs (answered 500)
        self.rerouted: list[str] = []  # requests the client addressed to huggingface.co itself


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    server: "HubHTTPServer"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        try:
            with self.server.state.lock:
                status, headers, body = self._route(url.path)
        except Exception as e:  # a bug here must surface in the test, not as a dropped connection
            if not isinstance(e, HubError):
                self.server.state.errors.append(traceback.format_exc())
                e = HubError(500, f"local hub bug: {e!r}")
            status, body = e.status, json.dumps({"error": e.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
        self.server.state.requests.append((self.command, self.path, status))
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, obj, status: int = 200):
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    def _param(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")

    # ------------------------------------------------------------------ auth and lookup
    def _authenticated(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth is None:
            return False
        if auth != f"Bearer {TOKEN}":  # the Hub rejects any request carrying a bad token
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        authed = self._authenticated()
        repo = self.server.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed) or (write and not authed):
            # Unauthenticated callers cannot tell "missing" from "private": 401, like the Hub
            raise HubError(404 if authed else 401, "Repository not found", "RepoNotFound")
        return repo

    def _url(self, repo: Repo, suffix: str = "") -> str:
        return f"{self.server.endpoint}/{URL_PREFIX[repo.type]}{repo.id}{suffix}"

    # ------------------------------------------------------------------ routing
    _API = r"^/api/(?P<type>models|datasets|spaces|kernels)/(?P<repo>[^/]+/[^/]+|[^/]+)"
    ROUTES = [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("*", r"^/api/telemetry/", "telemetry"),
        ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?$", "repo_info"),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        ("POST", _API + r"/paths-info/(?P<rev>[^/]+)$", "paths_info"),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)$", "commit"),
        ("GET", _API + r"/commits/(?P<rev>[^/]+)$", "list_commits"),
        ("GET", _API + r"/refs$", "refs"),
        ("POST", _API + r"/branch/(?P<ref>[^/]+)$", "create_branch"),
        ("DELETE", _API + r"/branch/(?P<ref>[^/]+)$", "delete_branch"),
        ("POST", _API + r"/tag/(?P<ref>[^/]+)$", "create_tag"),
        ("DELETE", _API + r"/tag/(?P<ref>[^/]+)$", "delete_tag"),
        ("GET|HEAD", r"^/__lfs/(?P<sha>[0-9a-f]{64})$", "cdn"),
        ("GET|HEAD", r"^/(?:(?P<prefix>datasets|spaces|kernels)/)?(?P<repo>[^/]+/[^/]+|[^/]+)"
                     r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]

    def _route(self, path: str):
        for methods, pattern, name in self.ROUTES:
            match = re.match(pattern, path)
            if match and (methods == "*" or self.command in methods.split("|")):
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "type" in args:
                    args["type"] = API_TYPES[args["type"]]
                return getattr(self, name)(**args)
        self.server.state.unhandled.append((self.command, path))
        raise HubError(404, f"Not found: {self.command} {path}")

    # ------------------------------------------------------------------ account / repo management
    def whoami(self):
        if not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")
        token_info = {"displayName": "local-hub", "role": "write", "fineGrained": None}
        return self._json({"type": "user", "id": "0" * 24, "name": USER, "fullname": "Local Hub User", "orgs": [],
                           "auth": {"type": "access_token", "accessToken": token_info}})

    def create_repo(self):
        if not self._authenticated():
            raise HubError(401, "You must be authenticated to create a repo")
        body = json.loads(self.body or b"{}")
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        state = self.server.state
        if (repo_type, repo_id) in state.repos:
            url = self._url(state.repos[(repo_type, repo_id)])
            return self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = body.get("private", body.get("visibility") == "private") or False
        repo = state.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private, sdk=body.get("sdk"))
        repo.add_commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        return self._json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def delete_repo(self):
        body = json.loads(self.body or b"{}")
        repo = self._repo(body.get("type") or "model", f"{body.get('organization') or USER}/{body['name']}", True)
        del self.server.state.repos[(repo.type, repo.id)]
        return self._json({})

    def validate_yaml(self):
        return self._json({"errors": [], "warnings": []})

    def telemetry(self):
        return self._json({})

    # ------------------------------------------------------------------ read API
    def repo_info(self, type, repo, rev="main"):
        repo = self._repo(type, repo)
        commit = repo.resolve(rev)
        blobs = self._param("blobs")
        siblings = [
            repo.file_entry(commit, p, sibling=True) if blobs else {"rfilename": p} for p in sorted(commit.files)
        ]
        info = {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.id.split("/")[0],
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created, "private": repo.private,
                "gated": False, "disabled": False, "likes": 0, "tags": [], "siblings": siblings}
        if repo.type == "model":
            info.update(modelId=repo.id, downloads=0)
        if repo.type == "space":
            info["sdk"] = repo.sdk
        return self._json(info)

    def _tree_entries(self, repo: Repo, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        files = [p for p in sorted(commit.files) if p.startswith(base)]
        if base and not files:
            raise HubError(404, f"{prefix} does not exist on {commit.oid}", "EntryNotFound")
        entries, folders = [], set()
        for path in files:
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):  # the folders between `base` and the file
                folder = base + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    oid = hashlib.sha1(json.dumps([p for p in files if p.startswith(folder + "/")]).encode())
                    entries.append({"type": "directory", "path": folder, "oid": oid.hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                entries.append(repo.file_entry(commit, path))
        return entries

    def tree(self, type, repo, rev, path=""):
        repo = self._repo(type, repo)
        return self._json(self._tree_entries(repo, repo.resolve(rev), path, self._param("recursive")))

    def paths_info(self, type, repo, rev):
        repo = self._repo(type, repo)
        commit = repo.resolve(rev)
        form = parse_qs(self.body.decode())  # the client posts form data: paths=a&paths=b&expand=False
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(repo.file_entry(commit, path))
            elif any(p.startswith(path + "/") for p in commit.files):
                oid = hashlib.sha1(path.encode() + commit.oid.encode()).hexdigest()
                out.append({"type": "directory", "path": path, "oid": oid, "size": 0})
        return self._json(out)  # missing paths are silently omitted, as on the Hub

    def list_commits(self, type, repo, rev):
        repo = self._repo(type, repo)
        out, commit = [], repo.resolve(rev)
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                        "authors": [{"user": USER, "avatar": None}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return self._json(out)

    def refs(self, type, repo):
        repo = self._repo(type, repo)

        def ref(kind, name, oid):
            full = name if name.startswith("refs/") else f"refs/{kind}/{name}"
            return {"name": name, "ref": full, "targetCommit": oid}

        branches = [ref("heads", n, o) for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
        prs = [ref("pr", n, o) for n, o in repo.branches.items() if n.startswith("refs/pr/")]
        tags = [ref("tags", n, o) for n, o in repo.tags.items()]
        return self._json({"branches": branches, "tags": tags, "converts": [],
                           **({"pullRequests": prs} if self._param("include_prs") else {})})

    # ------------------------------------------------------------------ refs
    def create_branch(self, type, repo, ref):
        repo = self._repo(type, repo, write=True)
        if ref in repo.branches:
            raise HubError(409, f"Reference {ref} already exists")
        repo.branches[ref] = repo.resolve(json.loads(self.body or b"{}").get("startingPoint") or "main").oid
        return self._json({})

    def create_tag(self, type, repo, ref):  # POST /tag/{revision} with {"tag": name}
        repo = self._repo(type, repo, write=True)
        name = json.loads(self.body or b"{}")["tag"]
        if name in repo.tags:
            raise HubError(409, f"Tag {name} already exists")
        repo.tags[name] = repo.resolve(ref).oid
        return self._json({})

    def delete_branch(self, type, repo, ref):
        repo = self._repo(type, repo, write=True)
        if repo.branches.pop(ref, None) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        return self._json({})

    def delete_tag(self, type, repo, ref):
        repo = self._repo(type, repo, write=True)
        if repo.tags.pop(ref, None) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        return self._json({})

    # ------------------------------------------------------------------ upload
    def preupload(self, type, repo, rev):
        repo = self._repo(type, repo, write=True)
        commit = repo.resolve(rev)
        files = []
        for f in json.loads(self.body)["files"]:
            # "regular" for every file: content comes base64 in the commit, no LFS/Xet transfer. The oid (git sha1 of
            # the current content) lets the client skip unchanged files, as it does against the Hub.
            old = commit.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_sha1(old) if old is not None else None})
        return self._json({"files": files, "commitOid": commit.oid})

    def commit(self, type, repo, rev):
        repo = self._repo(type, repo, write=True)
        branch = rev
        if self._param("create_pr"):
            branch = f"refs/pr/{1 + sum(n.startswith('refs/pr/') for n in repo.branches)}"
            repo.branches[branch] = repo.resolve(rev).oid
        elif rev not in repo.branches:  # commits go to branches only, not tags or shas
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.resolve(branch)
        files, header = dict(head.files), {}
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                if not head.oid.startswith(value.get("parentCommit") or ""):  # 7-char shorthands allowed
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                data = base64.b64decode(value["content"])  # the client always sends encoding=base64
                self.server.state.blobs[hashlib.sha256(data).hexdigest()] = data
                files[value["path"]] = data
            elif key == "lfsFile":  # only reached for copies of LFS files: content is already in the blob store
                if value["oid"] not in self.server.state.blobs:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.server.state.blobs[value["oid"]]
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        commit = repo.add_commit(branch, files, header.get("summary", "Commit"), header.get("description", ""))
        pr_url = self._url(repo, f"/discussions/{branch.rsplit('/', 1)[1]}") if branch.startswith("refs/pr/") else None
        commit_url = self._url(repo, f"/commit/{commit.oid}")
        return self._json({"success": True, "commitOid": commit.oid, "commitUrl": commit_url, "hookOutput": "",
                           "pullRequestUrl": pr_url})

    # ------------------------------------------------------------------ download
    def resolve(self, repo, rev, path, prefix=None):
        repo = self._repo(API_TYPES[prefix] if prefix else "model", repo)
        commit = repo.resolve(rev)
        # X-Repo-Commit also on 404: the client caches the file's absence per commit (.no_exist)
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        data = commit.files[path]
        if repo.is_lfs(commit, path):
            sha = hashlib.sha256(data).hexdigest()
            self.server.state.blobs[sha] = data
            # Another host name than the API's: the client must stop at this redirect and read the metadata here
            location = f"{self.server.cdn}/__lfs/{sha}?filename={quote(basename(path))}"
            headers.update({"Location": location, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{git_sha1(lfs_pointer(data))}"'})
            return 302, headers, b""
        return self._content(data, git_sha1(data), headers)

    def cdn(self, sha):
        data = self.server.state.blobs.get(sha)
        if data is None:
            raise HubError(404, "Not found")
        filename = self.query.get("filename", [sha])[0]
        return self._content(data, sha, {"Content-Disposition": f'attachment; filename="{filename}"'})

    def _content(self, data: bytes, etag: str, headers: dict):
        headers.update({"ETag": f'"{etag}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            return 200, headers, data
        start, end = int(match[1]), int(match[2] or len(data) - 1)
        if start >= len(data):
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, headers, data[start : end + 1]


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        port = self.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.cdn = f"http://localhost:{port}"  # same socket, different host name (see module docstring)


@contextlib.contextmanager
def serve():
    """Run a bare server on a random free port (no environment changes)."""
    server = HubHTTPServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _patched(env: dict[str, str | None], attrs: list[tuple[object, str, object]]):
    """Set env vars (None = unset) and object attributes; restore both on exit."""

    def setenv(values: dict[str, str | None]) -> None:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    old_env = {key: os.environ.get(key) for key in env}
    old_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in attrs]
    try:
        setenv(env)
        for obj, name, value in attrs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(old_attrs):
            setattr(obj, name, value)
        setenv(old_env)


@contextlib.contextmanager
def _hermetic_session(server: HubHTTPServer):
    """Serve requests for the public Hub hosts locally too: a test must never reach huggingface.co.

    Needed in practice: hub 1.x `RepoCard.validate` posts to a hard-coded https://huggingface.co/api/validate-yaml.
    Uses the client's documented `set_client_factory` hook; the factory swap also drops pooled connections and the
    proxy settings the previous client read at creation.
    """
    from huggingface_hub.utils import _http

    host, port = server.server_address[:2]

    def reroute(request) -> None:
        if request.url.host in PUBLIC_HUB_HOSTS:
            server.state.rerouted.append(str(request.url))
            request.url = request.url.copy_with(scheme="http", host=host, port=port)
            request.headers["Host"] = f"{host}:{port}"

    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory():
        client = previous()
        client.event_hooks["request"].append(reroute)  # after the client's own hook (offline check)
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(previous)


@dataclass
class LocalHub:
    server: HubHTTPServer
    token: str = TOKEN
    user: str = USER

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def state(self) -> HubState:
        return self.server.state

    @contextlib.contextmanager
    def offline(self):
        """HF_HUB_OFFLINE=1 for the duration: the env var and the constant huggingface_hub read at import."""
        from huggingface_hub import constants

        with _patched({"HF_HUB_OFFLINE": "1"}, [(constants, "HF_HUB_OFFLINE", True)]):
            yield


@contextlib.contextmanager
def local_hub():
    """Serve a fresh empty Hub and point huggingface_hub (and transformers) at it, with a temporary HF_HOME and token.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, ... into module constants at import time, so setting the environment
    is not enough: the constants, the module-level `HfApi` instance behind `huggingface_hub.create_repo` & co and
    transformers' cached `HfApi` are patched too, and everything is restored on exit.
    """
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    with serve() as server, tempfile.TemporaryDirectory(prefix="hf_local_hub_") as home:
        endpoint, cache = server.endpoint, os.path.join(home, "hub")
        env = {
            "HF_ENDPOINT": endpoint, "HF_HOME": home, "HF_HUB_CACHE": cache, "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            # Anything that would redirect or override the above
            "HUGGING_FACE_HUB_TOKEN": None, "HF_OIDC_RESOURCE": None, "HUGGINGFACE_CO_STAGING": None,
            "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HUGGINGFACE_HUB_CACHE": None,
        }
        attrs = [
            (constants, "ENDPOINT", endpoint),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
            (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"}),
            (constants, "HF_HOME", home),
            (constants, "HF_HUB_CACHE", cache),
            (constants, "HUGGINGFACE_HUB_CACHE", cache),
            (constants, "HF_ASSETS_CACHE", os.path.join(home, "assets")),
            (constants, "HF_TOKEN_PATH", os.path.join(home, "token")),
            (constants, "HF_STORED_TOKENS_PATH", os.path.join(home, "stored_tokens")),
            (constants, "HF_XET_CACHE", os.path.join(home, "xet")),
            (constants, "HF_HUB_OFFLINE", False),
            (constants, "HF_HUB_DISABLE_TELEMETRY", True),
            (hf_api.api, "endpoint", endpoint),  # bound methods `huggingface_hub.create_repo`, `upload_file`, ...
        ]
        if hasattr(_http, "_HUB_ORIGINS"):  # hub 2.x: origins allowed to receive the auth header on redirects
            attrs.append((_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
        # transformers caches one HfApi (endpoint captured at creation); reset it now and again on exit
        tf_hub = sys.modules.get("transformers.utils.hub")
        if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
            attrs.append((tf_hub, "_hf_api", None))
        try:
            with _patched(env, attrs), _hermetic_session(server):
                yield LocalHub(server)
        finally:
            tf_hub = sys.modules.get("transformers.utils.hub")
            if tf_hub is not None and hasattr(tf_hub, "_hf_api") and not any(a[0] is tf_hub for a in attrs):
                tf_hub._hf_api = None  # imported inside the block: drop the instance bound to this server


def local_hub_fixture(scope: str = "function"):
    """Pytest fixture factory: `hub = local_hub_fixture()` in a test module or conftest gives tests a `hub`."""
    import pytest

    @pytest.fixture(scope=scope)
    def _hub():
        with local_hub() as hub:
            yield hub

    return _hub
