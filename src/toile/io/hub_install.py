"""Installing a model: a Hugging Face Hub repository, or one ``.safetensors`` file from a URL,
each file checked against a hash before it is kept.

Only ``toile models pull`` calls this: installing is an operator's command, and the server never
downloads anything a client names (InvokeAI's CVE-2024-12029 was a server that did).

What is fetched from a repository: safetensors weights, JSON configs, tokenizer files and
model-card text. Pickle weights (loading them can run code), code files and anything else are
never fetched; the report lists them with the reason. In a diffusers repository (one with a
``model_index.json``) only the pipeline's component folders are fetched, as diffusers itself
does: the single-file copies and ONNX/OpenVINO exports many repositories also hold are skipped.

How each file is verified, against ``HfApi.model_info(files_metadata=True)``:

- files stored with Git LFS (weights, large tokenizer files): SHA-256 and size, as the hub
  lists them (``lfs.sha256``, ``lfs.size``);
- files stored in git itself (small JSON and text files): the hub lists only their git blob id,
  the SHA-1 of ``b"blob <size>\\0" + content``. It is computed here and compared; the hub
  publishes nothing stronger for these files.

A URL install is checked against the SHA-256 the operator gives (``--sha256``).

Resume: a file is downloaded to ``NAME.<hash>.incomplete`` beside its target, and renamed to
``NAME`` only once its hash matches; running the same pull again re-checks the complete files
(no download) and continues a partial one with an HTTP Range request. ``hf_hub_download`` is not
used for the files themselves: since huggingface_hub 1.x it deletes a partial file when a
download is interrupted, and it checks no hash of the files kept outside LFS. Its ``http_get``
does the transfer (Range, retries, progress bar).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from toile.errors import ToileError, one_line
from toile.io.weights import PICKLE_SUFFIXES, file_sha256, read_json_object

if TYPE_CHECKING:
    from huggingface_hub.hf_api import ModelInfo, RepoSibling

CODE_SUFFIXES = frozenset({
    ".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib", ".sh", ".bat", ".ps1", ".exe", ".js",
    ".ipynb",
})
# What a diffusers or transformers folder is loaded from: weights, configs, tokenizer files
# (vocab and merges .txt, sentencepiece .model, tiktoken ranks, chat templates), the model card.
WANTED_SUFFIXES = frozenset({
    ".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja", ".md",
})
TEXT_STEMS = frozenset({"readme", "license", "licence", "notice", "copying"})  # any text suffix
TEXT_SUFFIXES = frozenset({"", ".md", ".txt", ".rst"})
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SKIP_PICKLE = "pickle weights: loading them can run code (toile loads .safetensors only)"
SKIP_CODE = "code: toile never runs code that comes with a model"
SKIP_OTHER = "not a kind of file toile loads (safetensors, JSON, tokenizer and text files)"
SKIP_OUTSIDE = "not part of the pipeline model_index.json describes"


class InstallError(ToileError):
    """A pull that could not be completed; nothing it concerns was registered."""


@dataclass(frozen=True)
class Expected:
    """What a file must hash to. ``algorithm``: "sha256", or "git-sha1" (a git blob id);
    ``source`` says where the value came from, for error messages."""

    algorithm: str
    digest: str
    size: int | None
    source: str


@dataclass
class PullReport:
    repo_id: str
    commit: str
    dest: Path
    downloaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # complete, verified files left from before
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def check_online() -> None:
    """Refuse up front when huggingface_hub is in offline mode: an install is all network."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise InstallError(
            "installing a model needs the network, and offline mode is on (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE is set): nothing was downloaded or registered"
        )


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def skip_reason(name: str) -> str | None:
    """Why a repository file is not fetched, or None for a file that is."""
    path = PurePosixPath(name.lower())
    if path.suffix in PICKLE_SUFFIXES:
        return SKIP_PICKLE
    if path.suffix in CODE_SUFFIXES:
        return SKIP_CODE
    if path.suffix in WANTED_SUFFIXES or path.name.startswith("vocab."):
        return None
    if path.stem in TEXT_STEMS and path.suffix in TEXT_SUFFIXES:
        return None
    return SKIP_OTHER


def outside_pipeline(names: list[str], index: dict[str, Any]) -> set[str]:
    """The files a diffusers pipeline does not load: weights at the top level (single-file
    copies) and folders that are not a component ``model_index.json`` names."""
    components = {
        key for key, spec in index.items()
        if not key.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None
    }
    outside = set()
    for name in names:
        parts = PurePosixPath(name).parts
        top_level_weights = len(parts) == 1 and name.lower().endswith(".safetensors")
        if top_level_weights or (len(parts) > 1 and parts[0] not in components):
            outside.add(name)
    return outside


def target_in(dest: Path, name: str) -> Path:
    """``dest / name``, refusing a name that would land outside ``dest`` (a broken or hostile
    listing could name ``../../.bashrc``)."""
    parts = PurePosixPath(name).parts
    if (not parts or name.startswith("/") or "\\" in name or "\0" in name
            or any(part in (".", "..") for part in parts)):
        raise InstallError(
            f"refusing the file name {one_line(repr(name), 200)}: it is not a path inside the "
            "repository"
        )
    return dest.joinpath(*parts)


def expected_of(sibling: RepoSibling) -> Expected:
    """The hash the hub lists for a file: LFS SHA-256, else the git blob id."""
    if sibling.lfs is not None:
        return Expected("sha256", sibling.lfs.sha256.lower(), sibling.lfs.size, "the hub's")
    if sibling.blob_id:
        return Expected("git-sha1", sibling.blob_id.lower(), sibling.size, "the hub's")
    raise InstallError(
        f"the hub lists no hash for {sibling.rfilename}: refusing a file that cannot be checked"
    )


def digest_of(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return file_sha256(path)
    # git's blob id: SHA-1 over a header giving the size, then the content.
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def matches(path: Path, want: Expected) -> bool:
    if want.size is not None and path.stat().st_size != want.size:
        return False  # cheaper than hashing gigabytes
    return digest_of(path, want.algorithm) == want.digest


def partial_path(target: Path, want: Expected) -> Path:
    """Where ``target`` is downloaded to; named by the expected hash so that a partial file of
    another version is never continued as if it were this one."""
    return target.with_name(f"{target.name}.{want.digest[:16]}.incomplete")


def fetch(url: str, target: Path, want: Expected, headers: dict[str, str],
          progress: bool, name: str) -> bool:
    """Download ``url`` to ``target`` unless a verified copy is there; True if downloaded.

    A file whose hash differs is deleted and an InstallError names it (``name``) and both
    hashes."""
    if target.is_file():
        if matches(target, want):
            return False
        target.unlink()  # another revision's file, or a damaged one: fetched again
    partial_file = partial_path(target, want)
    partial_file.parent.mkdir(parents=True, exist_ok=True)
    if not complete(partial_file, want):
        download(url, partial_file, want, headers, progress, name)
    got = digest_of(partial_file, want.algorithm)
    if got != want.digest:
        partial_file.unlink()
        label = "SHA-256" if want.algorithm == "sha256" else "git blob SHA-1"
        raise InstallError(
            f"refusing {name}: its {label} is {got}, but {want.source} is {want.digest}; "
            "the file was deleted and nothing was registered"
        )
    os.replace(partial_file, target)
    return True


def complete(partial_file: Path, want: Expected) -> bool:
    """Whether a partial file is whole already (a pull stopped before renaming it). Of unknown
    size (a URL install), it is hashed: a Range from its end would be refused (HTTP 416)."""
    if not partial_file.is_file():
        return False
    if want.size is not None:
        return partial_file.stat().st_size == want.size
    return digest_of(partial_file, want.algorithm) == want.digest


def download(url: str, partial_file: Path, want: Expected, headers: dict[str, str],
             progress: bool, name: str) -> None:
    """Append the rest of the file to ``partial_file`` (from its size on, by an HTTP Range)."""
    from huggingface_hub.file_download import http_get

    done = partial_file.stat().st_size if partial_file.is_file() else 0
    if want.size is not None and done > want.size:
        partial_file.unlink()  # longer than the file: not a prefix of it
        done = 0
    try:
        with open(partial_file, "ab") as handle:
            http_get(url, handle, resume_size=done, headers=headers, expected_size=want.size,
                     displayed_filename=name, tqdm_class=progress_class(progress))
    except OSError:
        # A short file is kept to be continued; a longer one is not this file at all.
        if want.size is not None and partial_file.is_file() and (
                partial_file.stat().st_size > want.size):
            partial_file.unlink()
        raise


def progress_class(enabled: bool) -> Callable[..., Any]:
    """A plain tqdm on stderr (shown in logs too, like toile's other bars), or a silent one."""
    from tqdm import tqdm

    return tqdm if enabled else partial(tqdm, disable=True)


@contextmanager
def explained(what: str) -> Iterator[None]:
    """Library and network errors as one-line InstallErrors that name ``what`` failed."""
    import httpx2
    from huggingface_hub import constants, errors

    try:
        yield
    except InstallError:
        raise
    except errors.GatedRepoError:
        raise InstallError(
            f"{what}: the repository is gated: accept its terms on its hub page, then set "
            "HF_TOKEN to an access token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise InstallError(
            f"{what}: no such repository on {constants.ENDPOINT} (a private one needs HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise InstallError(f"{what}: the repository has no such revision") from None
    except errors.HFValidationError as exc:
        raise InstallError(f"{what}: not a repository id: {one_line(exc)}") from None
    except (OSError, httpx2.HTTPError) as exc:  # HfHubHTTPError is both
        raise InstallError(f"{what}: {one_line(exc)}") from None


def hub_headers(token: str | None) -> dict[str, str]:
    """The hub's own headers (user agent, the HF_TOKEN or login token if any); no compression,
    so that sizes and Range offsets count the file's bytes."""
    from huggingface_hub.utils import build_hf_headers

    return {**build_hf_headers(token=token), "Accept-Encoding": "identity"}


def pull_repo(repo_id: str, revision: str | None, dest: str | Path, *,
              token: str | None = None, progress: bool = True) -> PullReport:
    """Download a repository's loadable files into ``dest``, each checked against the hub's
    hash; raise InstallError at the first that cannot be fetched or does not match."""
    check_online()
    info = model_info(repo_id, revision, token)
    report = PullReport(repo_id, str(info.sha), Path(dest))
    wanted = sort_out(report, info.siblings or [])
    headers = hub_headers(token)
    index = [s for s in wanted if s.rfilename == "model_index.json"]
    if index:  # first: it says which folders are the pipeline's
        pull_sibling(report, index[0], headers, progress)
        components = read_json_object(report.dest / "model_index.json")
        outside = outside_pipeline([s.rfilename for s in wanted], components)
        report.skipped += [(name, SKIP_OUTSIDE) for name in sorted(outside)]
        wanted = [s for s in wanted if s.rfilename not in outside and s not in index]
    if progress:
        print(plan_line(report, index + wanted), file=sys.stderr)
    for sibling in wanted:
        pull_sibling(report, sibling, headers, progress)
    return report


def sort_out(report: PullReport, siblings: list[RepoSibling]) -> list[RepoSibling]:
    """The files to fetch; the others go to ``report.skipped`` with the reason."""
    wanted = []
    for sibling in siblings:
        reason = skip_reason(sibling.rfilename)
        if reason is None:
            target_in(report.dest, sibling.rfilename)  # a bad name stops the pull before any file
            wanted.append(sibling)
        else:
            report.skipped.append((sibling.rfilename, reason))
    return wanted


def model_info(repo_id: str, revision: str | None, token: str | None) -> ModelInfo:
    from huggingface_hub import HfApi

    where = repo_id if revision is None else f"{repo_id}@{revision}"
    with explained(where):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    if not info.sha:
        raise InstallError(f"{where}: the hub gave no commit for this revision")
    return info


def pull_sibling(report: PullReport, sibling: RepoSibling, headers: dict[str, str],
                 progress: bool) -> None:
    """One repository file, from the pull's commit (never a branch that may move meanwhile)."""
    from huggingface_hub import hf_hub_url

    name = sibling.rfilename
    url = hf_hub_url(report.repo_id, name, revision=report.commit)
    with explained(f"{report.repo_id}: {name}"):
        fetched = fetch(url, target_in(report.dest, name), expected_of(sibling), headers,
                        progress, name)
    (report.downloaded if fetched else report.reused).append(name)


def plan_line(report: PullReport, wanted: list[RepoSibling]) -> str:
    total = sum(s.size or 0 for s in wanted)
    return (f"{report.repo_id}@{report.commit[:12]}: {len(wanted)} files "
            f"({human_size(total)}) to fetch or check, {len(report.skipped)} skipped -> "
            f"{report.dest}")


def human_size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def pull_file(url: str, sha256: str, dest: str | Path, *, token: str | None = None,
              progress: bool = True) -> Path:
    """Download one ``.safetensors`` file to ``dest``, resumable, kept only if its SHA-256 is
    ``sha256``. The hub's token is sent only to the hub's own host."""
    check_online()
    check_file_url(url)
    digest = sha256.strip().lower()
    if not SHA256_HEX.match(digest):
        raise InstallError(f"--sha256: {one_line(sha256, 100)!r} is not 64 hexadecimal digits")
    want = Expected("sha256", digest, None, "--sha256")
    target = Path(dest)
    if target.is_file() and not matches(target, want):
        raise InstallError(
            f"{target} exists and is another file (SHA-256 {file_sha256(target)}): remove it, "
            "or install under another --id"
        )
    headers = hub_headers(token) if same_origin(url, hub_endpoint()) else {
        "Accept-Encoding": "identity"}
    with explained(shown(url)):
        fetch(url, target, want, headers, progress, target.name)
    return target


def check_file_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise InstallError(f"{shown(url)} is not an http(s) URL")
    if not unquote(parts.path).lower().endswith(".safetensors"):
        raise InstallError(
            f"{shown(url)}: only .safetensors files are installed from a URL (other "
            "formats can run code when loaded)"
        )


def shown(url: str) -> str:
    """A URL for messages, without its query (it may carry an access token)."""
    return one_line(urlsplit(url)._replace(query="", fragment="").geturl(), 200)


def url_file_stem(url: str) -> str:
    """``model`` for ``https://host/path/Model.safetensors?x=1``: a default model id."""
    return PurePosixPath(unquote(urlsplit(url).path)).stem.lower()


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def same_origin(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme.lower(), a.netloc.lower()) == (b.scheme.lower(), b.netloc.lower())
