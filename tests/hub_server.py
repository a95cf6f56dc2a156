"""A small Hugging Face Hub on 127.0.0.1 for the tests: the real `huggingface_hub` client talks
to it over real HTTP (HF_ENDPOINT), with HF_HUB_DISABLE_XET=1 (this server has no Xet storage).

Nothing on the package index serves this: `hf-local-hub` needs a Go server binary its wheel does
not ship, and `olah` is a mirror of an upstream Hub. Written against huggingface_hub 2.4.0; the
endpoints it answers are exactly those the client calls for loramerge's commands:

    GET  /api/models/{repo}[/revision/{rev}]        repo info (sha, siblings, private, gated)
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=true), LFS info
    HEAD /{repo}/resolve/{rev}/{path}               ETag, X-Repo-Commit, Content-Length; LFS
                                                    files 302 to the storage port (another
                                                    origin, like the Hub's CDN) with
                                                    X-Linked-Etag and X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}               the bytes, with Range (206, Content-Range)
    GET  /lfs-blobs/{sha256}   (storage port)       LFS content, with Range
    POST /api/validate-yaml                         a README's front matter: a mapping whose
                                                    base_model is repo ids, base_model_relation
                                                    one of the Hub's four, tags a list of strings
    POST /api/repos/create                          {name, organization, visibility}; 409 if
                                                    taken
    POST /api/models/{repo}/branch/{branch}         a branch from main; 409 if taken
    POST /api/models/{repo}/preupload/{rev}         uploadMode per file: lfs or regular
    POST /{repo}.git/info/lfs/objects/batch         upload links that authorize themselves (the
                                                    client's LFS PUT carries no Authorization)
    PUT  /lfs-upload/{sha256}?sig=...               the LFS content, checked against its sha256
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file, lfsFile, deletedFile

Access: writes need a known token; a private repo without one answers 401 RepoNotFound, a gated
repo 403 GatedRepo. An unknown token is rejected with 401, and the rejection quotes the
Authorization header back, as a careless server might, so tests can check the client side never
repeats it. Every byte of response body is counted by request path (`sent`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    """One model repository: branches pointing at commits, each commit a full file map."""

    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def commit_of(self, revision: str) -> str | None:
        """The commit a branch name or commit hash names."""
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(_LFS_SUFFIXES) or len(data) > 1_000_000


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _card_errors(content: str) -> list[str]:
    """What the Hub would reject in a README's YAML front matter (the rules loramerge meets)."""
    match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
    if not match:
        return []
    meta = yaml.safe_load(match[1])
    if not isinstance(meta, dict):
        return ["metadata is not a mapping"]
    errors = []
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", base):
            errors.append(f"base_model: {base!r} is not a repo id")
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        errors.append(f"base_model_relation: {relation!r} is not allowed")
    if relation is not None and "base_model" not in meta:
        errors.append("base_model_relation needs base_model")
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append("tags must be a list of strings")
    return errors


class HubState:
    """Repositories, LFS store, tokens and the byte counter the handler serves from."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.secret = hashlib.sha256(repr(id(self)).encode()).digest()
        self._counter = 0
        self.storage_url = ""  # where LFS content is served: another origin, as on the Hub

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add files to a branch (created from main if new); returns the new commit hash."""
        repo = self.repos[repo_id]
        parent = repo.branches.get(branch) or repo.branches.get("main")
        tree = dict(repo.commits.get(parent, {})) if parent else {}
        tree.update(files)
        with self.lock:
            self._counter += 1
            seed = f"{repo_id}:{parent}:{self._counter}:" + ",".join(
                f"{p}={hashlib.sha256(d).hexdigest()}" for p, d in sorted(tree.items())
            )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        for path, data in files.items():
            if _is_lfs(path, data):
                self.lfs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def add_folder(
        self, repo_id: str, folder: Path, *, private: bool = False, gated: bool = False
    ) -> str:
        """Create a repo holding every file under `folder`; returns its commit hash."""
        self.repos[repo_id] = Repo(private=private, gated=gated)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file()
        }
        return self.commit(repo_id, files)

    def bytes_sent(self, fragment: str = "") -> int:
        """Response body bytes sent for request paths containing `fragment`."""
        return sum(n for path, n in self.sent.items() if fragment in path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            with self.state.lock:
                self.state.sent[urlsplit(self.path).path] += len(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self) -> tuple[str | None, bool]:
        """(user, rejected): the token's user, or rejected=True after answering 401."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None, False
        token = auth.removeprefix("Bearer ").strip()
        if token in self.state.tokens:
            return self.state.tokens[token], False
        self._error(401, None, f"Invalid credentials in Authorization header ({auth})")
        return None, True

    def _readable(self, repo_id: str) -> Repo | None:
        """The repo if this request may read it; otherwise answers the error and returns None."""
        user, rejected = self._user()
        if rejected:
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and user is None:
            self._error(403, "GatedRepo", "Access to this model is restricted")
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        user, rejected = self._user()
        if rejected:
            return None
        if user is None:
            self._error(401, None, "You must be authenticated to write")
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _ranged(self, data: bytes, headers: dict) -> None:
        """200 with the whole body, or 206 with the one range the Range header asks for."""
        headers = {"Accept-Ranges": "bytes", **headers}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if not match:
            self._send(200, data, headers)
            return
        first, last = match.groups()
        if first == "":
            start, end = max(0, len(data) - int(last)), len(data) - 1
        else:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data) or start > end:
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(206, data[start : end + 1], headers)

    # -- routes ---------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", path):
            self._repo_info(m["repo"], m["rev"] or "main")
        elif m := re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path):
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            self._tree(m["repo"], m["rev"], (m["sub"] or "").strip("/"), recursive)
        elif m := re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            self._resolve(m["repo"], m["rev"], m["file"])
        elif m := re.fullmatch(r"/lfs-blobs/(?P<oid>[0-9a-f]{64})", path):
            data = self.state.lfs.get(m["oid"])
            if data is None:
                self._error(404, "EntryNotFound", "no such object")
            else:
                self._ranged(data, {"ETag": f'"{m["oid"]}"'})
        else:
            self._error(404, None, f"no route for GET {path}")

    def do_POST(self) -> None:
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        if path == "/api/validate-yaml":
            self._validate_yaml(json.loads(body)["content"])
        elif path == "/api/repos/create":
            self._create_repo(json.loads(body or b"{}"))
        elif m := re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>.+)", path):
            self._create_branch(m["repo"], m["branch"])
        elif m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", path):
            self._preupload(m["repo"], json.loads(body))
        elif m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path):
            self._lfs_batch(m["repo"], json.loads(body))
        elif m := re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>.+)", path):
            self._commit(m["repo"], m["rev"], body)
        else:
            self._error(404, None, f"no route for POST {path}")

    def do_PUT(self) -> None:
        url = urlsplit(self.path)
        body = self._body()
        m = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", url.path)
        sig = parse_qs(url.query).get("sig", [""])[0]
        if not m or not hmac.compare_digest(sig, self._sign(m["oid"])):
            self._error(403, None, "upload link not valid")
        elif hashlib.sha256(body).hexdigest() != m["oid"]:
            self._error(400, None, "content does not match its sha256")
        else:
            self.state.lfs[m["oid"]] = body
            self._send(200)

    # -- reading --------------------------------------------------------------------------------

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return
        sha = repo.commit_of(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
            },
        )

    def _tree(self, repo_id: str, revision: str, sub: str, recursive: bool) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return
        sha = repo.commit_of(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        prefix = f"{sub}/" if sub else ""
        entries, folders = [], set()
        for path, data in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i in range(rest.count("/")):
                folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
            entry = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": path}
            if _is_lfs(path, data):
                oid = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": oid, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        self._json(200, sorted(dirs, key=lambda d: d["path"]) + entries)

    def _resolve(self, repo_id: str, revision: str, file: str) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return
        sha = repo.commit_of(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        data = repo.commits[sha].get(file)
        if data is None:
            self._error(404, "EntryNotFound", f"{file} does not exist at {revision}")
            return
        headers = {"X-Repo-Commit": sha}
        if _is_lfs(file, data):
            oid = hashlib.sha256(data).hexdigest()
            headers.update(
                {
                    "Location": f"{self.state.storage_url}/lfs-blobs/{oid}",
                    "X-Linked-Etag": f'"{oid}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{_git_oid(data)}"',
                }
            )
            self._send(302, b"", headers)
            return
        self._ranged(data, {"ETag": f'"{_git_oid(data)}"', **headers})

    def _validate_yaml(self, content: str) -> None:
        errors = _card_errors(content)
        self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors]})

    # -- writing --------------------------------------------------------------------------------

    def _create_repo(self, request: dict) -> None:
        user, rejected = self._user()
        if rejected:
            return
        if user is None:
            self._error(401, None, "You must be authenticated to create a repo")
            return
        repo_id = f"{request.get('organization') or user}/{request['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        private = bool(request.get("private")) or request.get("visibility") == "private"
        self.state.repos[repo_id] = Repo(private=private)
        self.state.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"})
        self._json(200, {"url": url, "name": repo_id})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            self._error(409, None, f"Reference already exists: refs/heads/{branch}")
            return
        repo.branches[branch] = repo.branches["main"]
        self._send(200)

    def _preupload(self, repo_id: str, request: dict) -> None:
        if self._writable(repo_id) is None:
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if _is_lfs(f["path"], b"\0" * f["size"]) else "regular",
                "shouldIgnore": False,
            }
            for f in request["files"]
        ]
        self._json(200, {"files": files})

    def _sign(self, oid: str) -> str:
        return hmac.new(self.state.secret, oid.encode(), hashlib.sha256).hexdigest()

    def _lfs_batch(self, repo_id: str, request: dict) -> None:
        if self._writable(repo_id) is None:
            return
        host = f"http://{self.headers['Host']}"
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                href = f"{host}/lfs-upload/{obj['oid']}?sig={self._sign(obj['oid'])}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        if revision not in repo.branches:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        files: dict[str, bytes] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None:
                    self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = data
            elif item["key"] != "header":
                self._error(400, None, f"unsupported commit operation {item['key']}")
                return
        sha = self.state.commit(repo_id, files, revision)
        host = f"http://{self.headers['Host']}"
        self._json(
            200,
            {
                "commitUrl": f"{host}/{repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            },
        )


class HubServer:
    """The Hub and its LFS storage on two ports, each served by a daemon thread.

    `url` is the HF_ENDPOINT. Storage is another origin, as the Hub's CDN is, so the client
    takes file metadata from the redirect itself and does not follow it for HEAD.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self.state = HubState(tokens)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
        self.url, self.state.storage_url = (
            f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers
        )
        self._threads = []
        for server in self._servers:
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop serving and release the ports."""
        for server, thread in zip(self._servers, self._threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()
