"""``toile models pull``: installs from a hub served on loopback by this test (HF_ENDPOINT), never
the real one. The fake hub answers what huggingface_hub asks: ``model_info(files_metadata=True)``
(``/api/models/{repo}[/revision/{rev}]?blobs=true``) and ``/{repo}/resolve/{rev}/{path}`` (GET and
HEAD, with Range), with the hub's headers (ETag, X-Repo-Commit, X-Linked-Etag/-Size for LFS
files, X-Error-Code on errors)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from test_cli import TOILE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token"
LFS_SUFFIXES = (".safetensors", ".bin")  # stored with Git LFS on the hub: listed with a SHA-256
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."  # pickle.dumps({})


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories (id -> {path: bytes}) and plain files, served over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.files: dict[str, bytes] = {}  # /files/NAME, for URL installs
        self.gated: set[str] = set()  # repositories that answer only with TOKEN
        self.tampered: set[str] = set()  # paths served with a byte changed
        self.requests: list[dict[str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def fetched(self) -> list[str]:
        """The paths of the files downloaded (GET), in order."""
        return [r["path"] for r in self.requests
                if r["method"] == "GET" and not r["path"].startswith("/api/")]

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append({"method": request.command, "path": path,
                              "range": request.headers.get("Range"),
                              "auth": request.headers.get("Authorization")})
        if path.startswith("/files/") and path[7:] in self.files:
            return self.send_file(request, self.files[path[7:]], {}, body)
        match = API.match(path) or RESOLVE.match(path)
        if match is None:
            return self.error(request, 404, "EntryNotFound")
        repo = match["repo"]
        if repo not in self.repos:
            return self.error(request, 404, "RepoNotFound")
        if repo in self.gated and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.error(request, 401, "GatedRepo")
        if match["rev"] not in (None, "main", COMMIT):  # None: the default branch
            return self.error(request, 404, "RevisionNotFound")
        if match.re is API:
            return self.send_json(request, self.model_info(repo))
        data = self.repos[repo].get(match["path"])
        if data is None:
            return self.error(request, 404, "EntryNotFound")
        return self.send_file(request, self.served(match["path"], data),
                              self.file_headers(match["path"], data), body)

    def model_info(self, repo: str) -> dict:
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["blobId"] = git_blob_id(b"lfs pointer " + name.encode())
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "pointerSize": 134}
            siblings.append(entry)
        return {"id": repo, "sha": COMMIT, "siblings": siblings}

    def file_headers(self, name: str, data: bytes) -> dict[str, str]:
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            return {"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)), "X-Repo-Commit": COMMIT}
        return {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": COMMIT}

    def served(self, name: str, data: bytes) -> bytes:
        """The bytes sent: a tampered file has the size the listing says, not its hash."""
        return bytes([data[0] ^ 1]) + data[1:] if name in self.tampered else data

    def send_file(self, request: BaseHTTPRequestHandler, data: bytes, headers: dict[str, str],
                  body: bool) -> None:
        start = 0
        wanted = request.headers.get("Range")
        if wanted:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
        request.send_response(206 if wanted else 200)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Accept-Ranges", "bytes")
        if wanted:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.send_header("Content-Length", str(len(data) - start))
        request.end_headers()
        if body:
            request.wfile.write(data[start:])

    def send_json(self, request: BaseHTTPRequestHandler, value: dict) -> None:
        data = json.dumps(value).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def error(self, request: BaseHTTPRequestHandler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        request.send_response(status)
        request.send_header("X-Error-Code", code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sd_repo(tiny_models, hub: FakeHub) -> dict[str, bytes]:
    """The tiny SD folder as a hub repository, plus a pickle and a code file (and the
    tokenizer source folder ``_tok/`` the fixture leaves, which no component names)."""
    files = tree(tiny_models("sd"))
    files["unet/diffusion_pytorch_model.bin"] = PICKLE
    files["pipeline.py"] = b"import os\nos.system('echo owned')\n"
    files["README.md"] = b"# Tiny SD\n"
    hub.repos["tiny/Tiny-SD"] = files
    return files


def pull(*args: str, hub: FakeHub, home: Path, **env: str) -> subprocess.CompletedProcess:
    """``toile models pull ...`` online (the suite runs offline), against the fake hub only."""
    full_env = dict(os.environ, TOILE_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0",
                    TRANSFORMERS_OFFLINE="0", HF_HOME=str(home / "hf"))
    full_env.pop("HF_TOKEN", None)
    full_env.update(env)
    return subprocess.run([TOILE, "models", "pull", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def registered(home: Path) -> dict:
    path = home / "models.json"
    return json.loads(path.read_text())["models"] if path.is_file() else {}


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("toile models: error: "), proc.stderr
    return lines[-1]


def wanted_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items()
            if not name.startswith("_tok/") and not name.endswith((".bin", ".py"))}


def test_full_pull_of_a_gated_repository(hub, sd_repo, toile_home):
    hub.gated.add("tiny/Tiny-SD")
    refused = pull("tiny/Tiny-SD", hub=hub, home=toile_home)
    assert "HF_TOKEN" in assert_one_line_error(refused)
    hub.requests.clear()

    proc = pull("tiny/Tiny-SD", hub=hub, home=toile_home, HF_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr
    dest = toile_home / "models" / "tiny-sd"
    assert tree(dest) == wanted_files(sd_repo)  # and no .incomplete file left
    assert registered(toile_home) == {"tiny-sd": {"path": str(dest.resolve())}}
    assert "added tiny-sd (sd)" in proc.stdout
    out = proc.stdout
    assert "skipped unet/diffusion_pytorch_model.bin: pickle weights" in out
    assert "skipped pipeline.py: code" in out
    assert "skipped _tok/vocab.json: not part of the pipeline" in out
    # Skipped files are never requested; every request carried the token.
    assert not [p for p in hub.fetched() if p.endswith((".bin", ".py")) or "/_tok/" in p]
    # (huggingface_hub also fetches its user agent's telemetry list, with no token.)
    calls = [r for r in hub.requests if r["path"] != "/api/agent-harnesses"]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in calls), calls
    assert f"resolve/{COMMIT}/" in hub.fetched()[0]  # every file from the listed commit


def test_a_pull_resumes(hub, sd_repo, toile_home, tmp_path):
    from toile.io.hub_install import Expected, partial_path

    dest = tmp_path / "sd15"
    first = pull("tiny/Tiny-SD@main", "--id", "sd15", "--dir", str(dest), hub=hub,
                 home=toile_home)
    assert first.returncode == 0, first.stderr
    # Interrupted: one file gone, another one a third downloaded.
    (dest / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    unet = dest / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.unlink()
    want = Expected("sha256", hashlib.sha256(data).hexdigest(), len(data), "the hub's")
    partial_path(unet, want).write_bytes(data[: len(data) // 3])
    hub.requests.clear()

    again = pull("tiny/Tiny-SD@main", "--id", "sd15", "--dir", str(dest), hub=hub,
                 home=toile_home)
    assert again.returncode == 0, again.stderr
    assert sorted(hub.fetched()) == [
        f"/tiny/Tiny-SD/resolve/{COMMIT}/unet/diffusion_pytorch_model.safetensors",
        f"/tiny/Tiny-SD/resolve/{COMMIT}/vae/diffusion_pytorch_model.safetensors",
    ]
    ranges = {r["path"].rsplit("/", 2)[1]: r["range"] for r in hub.requests if r["range"]}
    assert ranges == {"unet": f"bytes={len(data) // 3}-"}  # continued, not started over
    assert tree(dest) == wanted_files(sd_repo)
    assert "2 files downloaded" in again.stdout
    assert registered(toile_home) == {"sd15": {"path": str(dest.resolve())}}


@pytest.mark.parametrize("bad", ["unet/diffusion_pytorch_model.safetensors",  # LFS: SHA-256
                                 "unet/config.json"])  # in git: the git blob SHA-1
def test_a_file_whose_hash_differs_is_refused(hub, sd_repo, toile_home, bad):
    hub.tampered.add(bad)
    proc = pull("tiny/Tiny-SD", hub=hub, home=toile_home)
    line = assert_one_line_error(proc)
    listed = hub.model_info("tiny/Tiny-SD")["siblings"]
    [sibling] = [s for s in listed if s["rfilename"] == bad]
    listed_hash = sibling["lfs"]["sha256"] if "lfs" in sibling else sibling["blobId"]
    served = hub.served(bad, sd_repo[bad])
    served_hash = (hashlib.sha256(served).hexdigest() if "lfs" in sibling
                   else git_blob_id(served))
    assert Path(bad).name in line and listed_hash in line and served_hash in line
    assert registered(toile_home) == {}
    folder = (toile_home / "models" / "tiny-sd" / bad).parent
    assert not list(folder.glob(Path(bad).name + "*"))  # neither the file nor a partial one


def test_offline_does_nothing(hub, sd_repo, toile_home):
    proc = pull("tiny/Tiny-SD", hub=hub, home=toile_home, HF_HUB_OFFLINE="1")
    assert "offline" in assert_one_line_error(proc)
    assert hub.requests == []
    assert not (toile_home / "models").exists() and registered(toile_home) == {}


def test_unknown_repository_and_revision(hub, sd_repo, toile_home):
    missing = assert_one_line_error(pull("tiny/nothing", hub=hub, home=toile_home))
    assert "no such repository" in missing
    revision = assert_one_line_error(pull("tiny/Tiny-SD@v9", hub=hub, home=toile_home))
    assert "no such revision" in revision
    assert registered(toile_home) == {}


@pytest.fixture
def single_file(tiny_models, hub: FakeHub) -> bytes:
    data = tiny_models("sd_single_file").read_bytes()
    hub.files["Tiny-SD.safetensors"] = data
    return data


def test_a_url_install_checks_its_sha256_and_resumes(single_file, toile_home):
    from toile.io.hub_install import Expected, partial_path

    # The file is on another host than the hub: the hub's token must not be sent there.
    other = FakeHub()
    other.files["Tiny-SD.safetensors"] = single_file
    threading.Thread(target=other.server.serve_forever, daemon=True).start()
    target = toile_home / "models" / "tiny-sd.safetensors"
    sha = hashlib.sha256(single_file).hexdigest()
    target.parent.mkdir(parents=True)
    partial_path(target, Expected("sha256", sha, None, "")).write_bytes(single_file[:1000])
    try:
        url = f"{other.url}/files/Tiny-SD.safetensors"
        proc = pull(url, "--sha256", sha.upper(), hub=FakeHubAddress(), home=toile_home,
                    HF_TOKEN=TOKEN)
    finally:
        other.server.shutdown()
        other.server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert tree(target.parent) == {target.name: single_file}  # no partial file left
    assert registered(toile_home) == {"tiny-sd": {"path": str(target.resolve())}}
    assert "added tiny-sd (sd)" in proc.stdout
    assert [(r["range"], r["auth"]) for r in other.requests] == [("bytes=1000-", None)]


class FakeHubAddress:
    """A hub endpoint nothing listens on: a URL install must not need the hub."""

    url = "http://127.0.0.1:9"


def test_a_url_install_with_another_hash_is_refused(hub, single_file, toile_home):
    url = f"{hub.url}/files/Tiny-SD.safetensors"
    proc = pull(url, "--sha256", "0" * 64, "--id", "mine", hub=hub, home=toile_home)
    line = assert_one_line_error(proc)
    assert "0" * 64 in line and hashlib.sha256(single_file).hexdigest() in line
    assert not list((toile_home / "models").glob("mine*")) and registered(toile_home) == {}
    needs_hash = assert_one_line_error(pull(url, hub=hub, home=toile_home))
    assert "--sha256" in needs_hash
    assert hub.fetched() == ["/files/Tiny-SD.safetensors"]  # the refused one only


def test_what_is_fetched():
    from toile.io.hub_install import skip_reason

    for name in ("unet/diffusion_pytorch_model.safetensors", "model_index.json", "merges.txt",
                 "tokenizer_2/spiece.model", "vocab.bpe", "cl100k.tiktoken", "README.md",
                 "LICENSE", "chat_template.jinja"):
        assert skip_reason(name) is None, name
    for name in ("pytorch_model.bin", "model.ckpt", "x.pt", "x.pth", "x.pkl"):
        assert skip_reason(name).startswith("pickle"), name
    for name in ("pipeline.py", "lib.so", "run.sh"):
        assert skip_reason(name).startswith("code"), name
    for name in ("model.onnx", "flax_model.msgpack", ".gitattributes", "tf_model.h5"):
        assert skip_reason(name).startswith("not a kind"), name


def test_hash_helpers_and_paths(tmp_path):
    from toile.io.hub_install import InstallError, digest_of, outside_pipeline, target_in

    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    # `git hash-object hello.txt`
    assert digest_of(path, "git-sha1") == "ce013625030ba8dba906f756967f9e9ca394464a"
    for name in ("../evil.json", "a/../../evil.json", "/etc/passwd.json", "a\\b.json", ""):
        with pytest.raises(InstallError):
            target_in(tmp_path, name)
    index = {"_class_name": "X", "unet": ["diffusers", "U"], "safety_checker": [None, None]}
    names = ["model_index.json", "full.safetensors", "unet/a.safetensors",
             "onnx/unet/config.json", "safety_checker/model.safetensors"]
    assert outside_pipeline(names, index) == {
        "full.safetensors", "onnx/unet/config.json", "safety_checker/model.safetensors"}
