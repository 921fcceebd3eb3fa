"""`lorawatch data fetch`: the real download path against an HTTP server on 127.0.0.1, serving a copy of the paper's
data (a local copy of the TRACE files, identical to the pinned commit of the authors' repository).

Nothing here reaches the network: every URL is on loopback or a local folder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorawatch.errors import UserError
from lorawatch.data.fetch import DATASETS, dataset_dir, fetch_dataset, installed
from tiny import cli

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "trace-llm-cl-500"
SRC = Path(__file__).resolve().parents[1] / "src"
MANIFEST = DATASETS["trace-500"]


def relative_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    # never touch the user's data folder; never send loopback requests through a proxy
    monkeypatch.setenv("LORAWATCH_DATA", str(tmp_path / "data-root"))
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def served_copy(tmp_path) -> Path:
    """A writable copy of the shared data (the tests damage it); the shared folder itself is never changed."""
    if not SHARED_TRACE.is_dir():
        pytest.skip(f"these tests need a local copy of the paper's data ({SHARED_TRACE} is absent)")
    copy = tmp_path / "served"
    for path in SHARED_TRACE.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(SHARED_TRACE)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return copy


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        behaviour = self.server.behaviours.get(self.path.lstrip("/"))
        if behaviour == "stall":  # accept, then say nothing until the test is over
            self.server.release.wait(10)
            return
        if behaviour == "cut":  # announce the whole file, send half of it, hang up
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up is not news
        pass


@pytest.fixture
def server(served_copy):
    httpd = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(served_copy)))
    httpd.requests = []
    httpd.behaviours = {}
    httpd.release = threading.Event()
    httpd.root = served_copy
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def lorawatch(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorawatch", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_nothing_wrong_left(dest: Path, bad: str):
    assert not (dest / bad).exists(), f"{bad} was left at its final name"
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part")], "a temporary file was left behind"
    for name in relative_files(dest):  # whatever is in place is verified
        assert (dest / name).read_bytes() == (SHARED_TRACE / name).read_bytes(), name


# --------------------------------------------------------------------------------------------------


def test_manifest_matches_the_shared_copy(served_copy):
    assert relative_files(SHARED_TRACE) == {f.path for f in MANIFEST.files}
    for entry in MANIFEST.files:
        data = (SHARED_TRACE / entry.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), entry.path
    assert MANIFEST.base_url == ("https://raw.githubusercontent.com/tspthomas/slm_stability_cl/"
                                 "801a3b3fdf673cb096995676cda5d6cb1adaef27/data/llm-cl-500/")


def test_fetch_over_http_installs_every_file_verified(server, tmp_path):
    dest = tmp_path / "trace"
    lines = []
    assert not installed("trace-500", dest)
    assert fetch_dataset("trace-500", dest, server.url, log=lines.append) == dest
    assert relative_files(dest) == relative_files(SHARED_TRACE)  # no temporary files left
    for name in relative_files(SHARED_TRACE):
        assert (dest / name).read_bytes() == (SHARED_TRACE / name).read_bytes(), name
    assert installed("trace-500", dest)
    assert sorted(server.requests) == sorted("/" + f.path for f in MANIFEST.files)
    assert sum("fetched, sha256 ok" in line for line in lines) == len(MANIFEST.files)


def test_default_destination_is_the_data_folder(server, tmp_path):
    assert dataset_dir("trace-500") == tmp_path / "data-root" / "trace-500"
    assert fetch_dataset("trace-500", source=server.url, log=lambda _: None) == dataset_dir("trace-500")
    assert installed("trace-500")


def test_second_fetch_transfers_nothing_and_repairs_only_what_differs(server, tmp_path):
    dest = tmp_path / "trace"
    fetch_dataset("trace-500", dest, server.url, log=lambda _: None)
    server.requests.clear()
    lines = []
    fetch_dataset("trace-500", dest, server.url, log=lines.append)
    assert server.requests == []
    assert "already installed" in lines[-1] and "nothing to download" in lines[-1]

    (dest / "NumGLUE-cm" / "test.json").unlink()
    damaged = dest / "FOMC" / "eval.json"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"#")
    lines.clear()
    fetch_dataset("trace-500", dest, server.url, log=lines.append)
    assert sorted(server.requests) == ["/FOMC/eval.json", "/NumGLUE-cm/test.json"]
    assert sum(line.endswith("already present, sha256 ok") for line in lines) == len(MANIFEST.files) - 2
    assert any("FOMC/eval.json" in line and "replaced" in line for line in lines)
    assert installed("trace-500", dest)


def test_a_file_missing_at_the_source_is_named(server, tmp_path):
    (server.root / "ScienceQA" / "test.json").unlink()
    dest = tmp_path / "trace"
    with pytest.raises(UserError) as caught:
        fetch_dataset("trace-500", dest, server.url, log=lambda _: None)
    message = str(caught.value)
    assert "ScienceQA/test.json" in message and "not found" in message and server.url in message
    assert_nothing_wrong_left(dest, "ScienceQA/test.json")


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "connection cut"])
def test_a_bad_download_is_refused_and_not_installed(server, tmp_path, damage):
    served = server.root / "FOMC" / "train.json"
    data = bytearray(served.read_bytes())
    if damage == "corrupted":
        data[len(data) // 2] ^= 0x01  # one byte changed, same size
        served.write_bytes(bytes(data))
    elif damage == "truncated":
        served.write_bytes(bytes(data[:-1000]))
    else:
        server.behaviours["FOMC/train.json"] = "cut"
    dest = tmp_path / "trace"
    with pytest.raises(UserError) as caught:
        fetch_dataset("trace-500", dest, server.url, log=lambda _: None)
    message = str(caught.value)
    assert message.startswith("FOMC/train.json: ") and "\n" not in message
    if damage == "corrupted":
        assert "expected 180920 bytes, sha256 ad55548875b2" in message and "got 180920 bytes" in message
    elif damage == "truncated":
        assert "truncated" in message and "expected 180920 bytes" in message and "got 179920 bytes" in message
    assert_nothing_wrong_left(dest, "FOMC/train.json")
    assert (dest / "FOMC" / "eval.json").is_file()  # files before it stay: the next fetch resumes


def test_local_folder_and_file_url_sources(served_copy, tmp_path):
    for source in (str(served_copy), served_copy.as_uri()):
        dest = tmp_path / f"from-{source[:4]}"
        fetch_dataset("trace-500", dest, source, log=lambda _: None)
        assert installed("trace-500", dest)
        assert all((dest / n).read_bytes() == (SHARED_TRACE / n).read_bytes() for n in relative_files(SHARED_TRACE))
    (served_copy / "reference.json").unlink()
    with pytest.raises(UserError, match=r"^reference.json: not found in the source folder .*served"):
        fetch_dataset("trace-500", tmp_path / "incomplete", str(served_copy), log=lambda _: None)
    with pytest.raises(UserError, match=r"no such folder"):
        fetch_dataset("trace-500", tmp_path / "x", str(tmp_path / "nowhere"), log=lambda _: None)


def test_network_failures_name_the_url_and_reason(server, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    with pytest.raises(UserError) as caught:
        fetch_dataset("trace-500", tmp_path / "a", closed, log=lambda _: None, timeout=2)
    assert f"{closed}FOMC/eval.json" in str(caught.value) and "refused" in str(caught.value).lower()

    server.behaviours["FOMC/eval.json"] = "stall"
    with pytest.raises(UserError) as caught:
        fetch_dataset("trace-500", tmp_path / "b", server.url, log=lambda _: None, timeout=0.3)
    assert f"{server.url}FOMC/eval.json" in str(caught.value) and "timed out" in str(caught.value)
    with pytest.raises(UserError, match="unknown dataset 'trace-5000'; known datasets: trace-500"):
        fetch_dataset("trace-5000", tmp_path / "c", server.url)


def test_cli_fetch_and_list(server, tmp_path):
    root = tmp_path / "cli-root"
    dest = root / "trace-500"
    listed = cli("data", "list", env={"LORAWATCH_DATA": str(root)})
    assert listed.returncode == 0 and f"trace-500: not installed (would go to {dest})" in listed.stdout

    result = cli("data", "fetch", "trace-500", "--source", server.url, "--dest", dest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dest)  # progress on stderr, the folder on stdout
    assert "FOMC/train.json" in result.stderr and "fetched, sha256 ok" in result.stderr
    assert installed("trace-500", dest)
    again = cli("data", "fetch", "trace-500", "--source", server.url, "--dest", dest)
    assert again.returncode == 0 and "already installed" in again.stderr

    listed = cli("data", "list", env={"LORAWATCH_DATA": str(root)})
    assert listed.returncode == 0 and f"trace-500: installed in {dest}" in listed.stdout
    assert "13 files, 1.6 MB" in listed.stdout


def test_cli_errors_are_one_line_with_exit_code_2(server, tmp_path):
    result = lorawatch("data", "fetch", "trace-500", "--source", tmp_path / "nowhere", "--dest", tmp_path / "d")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], result.stderr
    assert not (tmp_path / "d").exists()

    (server.root / "NumGLUE-cm" / "train.json").unlink()
    result = lorawatch("data", "fetch", "trace-500", "--source", server.url, "--dest", tmp_path / "d")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines of the files before it
    assert last.startswith("error: NumGLUE-cm/train.json: not found"), result.stderr


def test_a_folder_in_the_way_and_a_zero_timeout_are_one_line_errors(served_copy, tmp_path):
    dest = tmp_path / "dest"
    (dest / "FOMC" / "train.json").mkdir(parents=True)  # a folder where a file must go
    with pytest.raises(UserError, match=r"FOMC/train.json: cannot write \(Is a directory\); verified files are kept"):
        fetch_dataset("trace-500", dest, str(served_copy), log=lambda _: None)
    with pytest.raises(UserError, match=r"^--timeout must be a positive number of seconds, got 0$"):
        fetch_dataset("trace-500", tmp_path / "other", str(served_copy), log=lambda _: None, timeout=0)


@pytest.mark.parametrize("kind", ["named pipe", "folder", "device"])
def test_a_source_file_that_is_not_a_regular_file_is_refused_not_blocked_on(served_copy, tmp_path, kind):
    """A named pipe in a local --source would block the read for ever (nothing writes to it), a device would be
    read without end: each is refused by name before it is opened for reading, and the files before it are kept."""
    bad = "NumGLUE-cm/train.json"  # the files before it in the manifest are fetched first
    path = served_copy / bad
    path.unlink()
    if kind == "named pipe":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    dest = tmp_path / "dest"
    result = lorawatch("data", "fetch", "trace-500", "--source", served_copy, "--dest", dest)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    what = "a folder" if kind == "folder" else "not a regular file (a named pipe, socket or device)"
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {bad}: {path} in the source folder is {what}; expected the dataset's file"
    assert_nothing_wrong_left(dest, bad)
    paths = [entry.path for entry in MANIFEST.files]
    assert relative_files(dest) == set(paths[:paths.index(bad)])  # the files before it, verified


def test_sigterm_during_a_fetch_is_one_line_and_keeps_the_verified_files(server, tmp_path):
    """SIGTERM (a scheduler's preemption, `kill`) while a download hangs: exit code 143 and one line, as `run`
    gives it, no traceback; the files fetched before stay verified and a second fetch finishes the rest."""
    stalled = "NumGLUE-cm/eval.json"
    server.behaviours[stalled] = "stall"
    dest = tmp_path / "dest"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "lorawatch", "data", "fetch", "trace-500", "--source",
                                server.url, "--dest", str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        deadline = time.time() + 60
        while f"/{stalled}" not in server.requests and time.time() < deadline:
            time.sleep(0.05)
        assert f"/{stalled}" in server.requests, "the fetch never asked for the stalled file"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("terminated (SIGTERM): verified files are kept; run the same command "
                                               "again to finish")
    assert "Traceback" not in stderr
    assert_nothing_wrong_left(dest, stalled)
    paths = [entry.path for entry in MANIFEST.files]
    assert relative_files(dest) == set(paths[:paths.index(stalled)])  # the files before it, verified
    server.behaviours.clear()
    again = cli("data", "fetch", "trace-500", "--source", server.url, "--dest", dest)
    assert again.returncode == 0 and installed("trace-500", dest), again.stderr
