"""Hub repo ids (`org/name[@revision]`): resolved into the Hugging Face cache, planned from
headers read by range, published. The only module of loramerge that talks to the network.

Everything goes through `huggingface_hub`, so HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME /
HF_HUB_CACHE and HF_TOKEN (or the stored login) apply as they do for every other tool.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

from loramerge.errors import LoramergeError

_REPO_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.][\w./-]*))?"
)
_COMMIT = re.compile(r"[0-9a-f]{40}")
# What a command may need from a model or adapter repo (top-level files only).
_SIDE_FILES = re.compile(
    r"[^/]+\.json|[^/]+\.jinja|tokenizer\.model|[^/]+\.tiktoken|merges\.txt|vocab\.txt|README\.md"
)
_WEIGHTS = re.compile(r"[^/]+\.safetensors")
_PICKLES = re.compile(r"[^/]+\.(bin|pt|pth)")
# loramerge's own side data in a merged model (DoRA norms).
_OURS = re.compile(r"loramerge/[^/]+")


@dataclass(frozen=True)
class HubRef:
    """A repo id and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None


def parse_ref(text: str) -> HubRef | None:
    """`org/name[@revision]` as a HubRef, or None when the text is not shaped like one."""
    match = _REPO_ID.fullmatch(text)
    if not match or ".." in text or "--" in match["repo"]:
        return None
    return HubRef(match["repo"], match["rev"])


def resolve(arg: str | Path, *, allow_pickle: bool = False, headers_only: bool = False) -> Path:
    """A local path for ARG: itself when it exists, else the Hub repo it names, from the cache.

    Only the files a command needs are fetched: safetensors weights (pickles only with
    `allow_pickle`), configs, tokenizer and generation files, the card. With `headers_only`, the
    weights are stand-ins holding each file's real header, fetched by HTTP range requests, and
    no tensor data: enough to plan, never to merge.
    """
    path = Path(arg)
    ref = parse_ref(str(arg))
    if path.exists() or ref is None:
        if ref is not None:
            _note(f"{arg}: using the local folder {path.resolve()} (not the Hub repo {arg})")
        return path
    with _hub_errors(ref):
        folder = _fetch(ref, allow_pickle, headers_only)
    _note(f"{arg}: Hub repo {ref.repo_id} at commit {folder.name}")
    return folder


def is_commit(revision: str) -> bool:
    """Whether a revision is a full commit hash (what records store)."""
    return bool(_COMMIT.fullmatch(revision))


def source_name(path: Path) -> str:
    """How a record names an input: `org/name@commit` for a Hub snapshot, else the path."""
    *_, repo, snapshots, commit = ("", "", "", *PurePath(path).parts)
    if repo.startswith("models--") and snapshots == "snapshots" and is_commit(commit):
        return f"{repo.removeprefix('models--').replace('--', '/')}@{commit}"
    return str(path)


def _note(message: str) -> None:
    """Which copy of an input is used: an INFO record the command line prints (not --quiet)."""
    _log.info(message)


_log = logging.getLogger(__name__)


def _fetch(ref: HubRef, allow_pickle: bool, headers_only: bool) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.is_offline_mode():
        # Whatever the cache holds for this revision, as the library laid it out.
        return Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=["config.json"])
        )
    info = HfApi().model_info(ref.repo_id, revision=ref.revision)
    names = [s.rfilename for s in info.siblings or []]
    weights = [n for n in names if _WEIGHTS.fullmatch(n)]
    if not weights and allow_pickle:
        weights = [n for n in names if _PICKLES.fullmatch(n)]
    side = [n for n in names if _SIDE_FILES.fullmatch(n) or _OURS.fullmatch(n)]
    adapter = "adapter_config.json" in names
    wanted = side if headers_only and not adapter else side + weights
    folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=wanted))
    if headers_only and not adapter:
        return _header_stand_ins(ref.repo_id, folder, weights)
    return folder


def _header_stand_ins(repo_id: str, snapshot: Path, weights: list[str]) -> Path:
    """A snapshot-shaped temporary folder: the side files, and each weights file as a sparse file
    of its real size holding only its header (what planning reads)."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    root = Path(tempfile.mkdtemp(prefix="loramerge-headers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / snapshot.name
    folder.mkdir(parents=True)
    for file in snapshot.iterdir():
        if file.is_file():
            shutil.copyfile(file, folder / file.name)
    session, headers = get_session(), build_hf_headers()

    def fetch(url: str, first: int, last: int) -> tuple[bytes, int]:
        ranged = {**headers, "Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
        with session.stream("GET", url, headers=ranged, follow_redirects=True) as response:
            hf_raise_for_status(response)
            data = b""
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= last - first + 1:  # a server ignoring Range: stop reading
                    break
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return data[: last - first + 1], int(total) if total.isdigit() else -1

    for name in weights:
        url = hf_hub_url(repo_id, name, revision=snapshot.name)
        prefix, size = fetch(url, 0, 7)
        length = int.from_bytes(prefix, "little")
        header, _ = fetch(url, 8, 7 + length)
        if len(prefix) != 8 or len(header) != length or size < 8 + length:
            raise LoramergeError(f"{repo_id}: {name} is not a readable safetensors file")
        with open(folder / name, "wb") as out:
            out.write(prefix + header)
            out.truncate(size)
    return folder


@contextmanager
def _hub_errors(ref: HubRef):
    """The library's exceptions as one `Error:` line that says what to do; never the token."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = ref.repo_id + (f"@{ref.revision}" if ref.revision else "")
    try:
        yield
    except LoramergeError:
        raise
    except GatedRepoError:
        raise LoramergeError(
            f"{ref.repo_id} is gated: accept its conditions on its Hub page, then log in "
            "(`hf auth login`) or set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise LoramergeError(
            f"{name} is neither a local path nor a Hub repo this account can read at "
            f"{constants.ENDPOINT}: check the name; for a private repo log in (`hf auth login`) "
            "or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise LoramergeError(
            f"{ref.repo_id} has no revision {ref.revision!r} (a branch, tag or commit hash)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        raise LoramergeError(
            f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
            "cannot be used (HF_HUB_OFFLINE is set or the network is down): fetch it once online"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no"
        raise LoramergeError(
            f"{name}: the Hub at {constants.ENDPOINT} answered {status}: {_scrub(str(exc))}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - network failures come in many types
        raise LoramergeError(
            f"{name}: cannot use the Hub at {constants.ENDPOINT}: {type(exc).__name__}: "
            f"{_scrub(str(exc))}"
        ) from None


def _scrub(message: str) -> str:
    """The first line of a library message, with the token (if any) cut out."""
    from huggingface_hub import get_token

    line = (message.strip().splitlines() or [""])[0]
    token = get_token()
    return line.replace(token, "<token>") if token else line


@dataclass(frozen=True)
class Upload:
    """One file to publish: its path in the repo and its bytes (a local file or in memory)."""

    path_in_repo: str
    content: Path | bytes

    @property
    def size(self) -> int:
        """Bytes this file sends."""
        return len(self.content) if isinstance(self.content, bytes) else self.content.stat().st_size


def upload(
    repo_id: str,
    files: list[Upload],
    *,
    private: bool = False,
    revision: str | None = None,
    message: str,
) -> str:
    """Create the repo (and branch) if needed and commit `files` in one commit; the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    ref = HubRef(repo_id, revision)
    api = HfApi()
    with _hub_errors(ref):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(
                f.path_in_repo, f.content if isinstance(f.content, bytes) else str(f.content)
            )
            for f in files
        ]
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return info.commit_url
