"""Trust at scale on object storage: the writer's lease, object-store errors, bounded requests, ``unlock s3://``.

Everything runs against a real S3 server (moto's, the ``s3`` fixture), with real writer
processes where a second process matters. The lease is shortened with
``FISHERSTORE_LOCK_TTL`` so that an expiry takes seconds, not a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

pytest.importorskip("obstore", reason="s3:// stores need obstore (pip install 'fisherstore[s3]')")
pytest.importorskip("moto", reason="the S3 tests run against moto's server (pip install 'moto[server]')")

import fisherstore  # noqa: E402
from fisherstore import InvalidArgumentError, RecoveryWarning, StorageError, StoreLockedError  # noqa: E402
from fisherstore.verify import verify_store  # noqa: E402

TTL = 3.0  # the lease in these tests (FISHERSTORE_LOCK_TTL); production's is 60 s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first writer: commits step 1 (2.0), streams an uncommitted step 2 (100.0) into a new
# generation, says "ready", then on "go" tries one more step and a flush, then closes.
WRITER = r"""
import json, sys, torch, fisherstore
s = fisherstore.open(sys.argv[1], mode="a", backend=sys.argv[2], decay=0.5, memory_budget=0)
s.create("t", "w", (8, 4))
s.update("t", {"w": torch.full((8, 4), 2.0)}, tokens=1)
s.flush()
s.update("t", {"w": torch.full((8, 4), 100.0)}, tokens=1)
print("ready", flush=True)
sys.stdin.readline()
out = {}
for what, act in (("flush", lambda: (s.update("t", {"w": torch.full((8, 4), 100.0)}, tokens=1), s.flush())),
                  ("close", s.close)):
    try:
        act()
        out[what] = "ok"
    except Exception as e:
        out[what] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def short_lease(monkeypatch):
    monkeypatch.setenv("FISHERSTORE_LOCK_TTL", str(TTL))
    return TTL


def _boto():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _lock_object(url: str) -> dict | None:
    """The lock record on the server, read with boto3 (not fisherstore), or None."""
    bucket, prefix = url[len("s3://"):].split("/", 1)
    try:
        body = _boto().get_object(Bucket=bucket, Key=f"{prefix}/.fisherstore.lock")["Body"].read()
    except Exception as e:
        if "NoSuchKey" in str(e):
            return None
        raise
    return json.loads(body)


def _put_lock(url: str, record: dict) -> None:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    _boto().put_object(Bucket=bucket, Key=f"{prefix}/.fisherstore.lock", Body=json.dumps(record).encode())


class _Writer:
    """The first writer, a real process (``WRITER``), with its output read line by line."""

    def __init__(self, url: str, backend: str) -> None:
        env = dict(os.environ, FISHERSTORE_LOCK_TTL=str(TTL), PYTHONPATH=ROOT)
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, url, backend], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()

    def line(self, timeout: float = 120) -> str:
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            self.p.kill()
            raise AssertionError(f"the writer said nothing for {timeout} s; stderr: {self.p.stderr.read()}") from None

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.p.pid, signal.SIGCONT)
        self.p.kill()
        self.p.wait(30)


def test_force_refuses_a_live_lease_and_takes_over_an_expired_one(s3, short_lease):
    url = s3()
    w1 = _Writer(url, "zarr")
    try:
        assert w1.line() == "ready"
        with pytest.raises(StoreLockedError, match=rf"pid {w1.p.pid} on host .*last heartbeat"):
            fisherstore.open(url, mode="a", force=True)
        time.sleep(1.5 * TTL)  # longer than the lease: only W1's heartbeat keeps it live
        with pytest.raises(StoreLockedError, match=rf"pid {w1.p.pid} on host .*lease is live"):
            fisherstore.open(url, mode="a", force=True)
        assert _lock_object(url)["beat"] >= 2  # renewed on the server, by conditional PUTs
        w1.p.send_signal(signal.SIGKILL)
        w1.p.wait(30)
        with pytest.raises(StoreLockedError, match=rf"pid {w1.p.pid}"):  # dead, but its lease has not expired
            fisherstore.open(url, mode="a", force=True)
        time.sleep(TTL + 2)  # S3 keeps whole seconds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fisherstore.open(url, mode="a", force=True) as s:
                assert s.step("t") == 1  # W1's commit; its uncommitted step 2 is rolled back
                assert torch.equal(s.fisher("t", "w", bias_corrected=False).load(), torch.full((8, 4), 1.0))
                assert _lock_object(url)["pid"] == os.getpid()
        assert any(issubclass(w.category, RecoveryWarning) and f"pid {w1.p.pid}" in str(w.message) for w in caught)
        assert _lock_object(url) is None  # released on close
        assert verify_store(url).ok
    finally:
        w1.close()


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_a_writer_whose_lease_was_taken_writes_commits_and_deletes_nothing(s3, short_lease, backend):
    url = s3()
    w1 = _Writer(url, backend)
    try:
        assert w1.line() == "ready"
        w1.p.send_signal(signal.SIGSTOP)  # frozen: its heartbeat stops, the process lives on
        time.sleep(TTL + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecoveryWarning)
            w2 = fisherstore.open(url, mode="a", backend=backend, decay=0.5, memory_budget=0, force=True)
        w2.update("t", {"w": torch.full((8, 4), 8.0)}, tokens=1)
        w2.flush()
        w1.p.send_signal(signal.SIGCONT)
        w1.p.stdin.write("go\n")
        w1.p.stdin.flush()
        out = json.loads(w1.line())
        assert out["flush"].startswith("StoreLockedError") and f"pid {os.getpid()}" in out["flush"], out
        assert out["close"] == "ok" or out["close"].startswith("StoreLockedError"), out
        assert w1.p.wait(60) == 0
        # W1's release left W2's lock, so a third writer is still refused, even with force
        assert _lock_object(url)["pid"] == os.getpid()
        with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}"):
            fisherstore.open(url, mode="a", backend=backend, force=True)
        w2.update("t", {"w": torch.full((8, 4), 4.0)}, tokens=1)
        w2.close()
        with fisherstore.open(url, mode="r", backend=backend) as r:
            # by hand, β = 0.5, T = 1: W1's step 1: 0.5·2 = 1; W2's: 0.5·1 + 0.5·8 = 4.5; 0.5·4.5 + 0.5·4 = 4.25
            assert r.step("t") == 3
            assert torch.equal(r.fisher("t", "w", bias_corrected=False).load(), torch.full((8, 4), 4.25))
        rep = verify_store(url, backend=backend)
        assert rep.ok and rep.rolled_back == [], ([f.message for f in rep.problems], rep.rolled_back)
    finally:
        w1.close()


def test_a_taken_lease_stops_the_writer_and_its_close_leaves_the_new_lock(s3, short_lease):
    url = s3()
    s = fisherstore.open(url, mode="w", decay=0.5, memory_budget=0)
    s.create("t", "w", (8, 4))
    s.update("t", {"w": torch.full((8, 4), 2.0)}, tokens=1)
    s.flush()
    s.update("t", {"w": torch.full((8, 4), 9.0)}, tokens=1)  # step 2: streamed into a new generation, not committed
    other = {"pid": 4242, "host": "elsewhere", "since": time.time(), "heartbeat": time.time(), "ttl": 60,
             "token": "not-ours"}
    _put_lock(url, other)  # another writer holds the lock now (as after a takeover)
    time.sleep(TTL / 2 + 0.5)  # the heartbeat's conditional PUT has failed by now, or the next write renews
    with pytest.raises(StoreLockedError, match="taken over.*pid 4242 on host elsewhere"):
        s.flush()  # no commit
    with pytest.raises(StoreLockedError, match="pid 4242"):
        s.update("t", {"w": torch.full((8, 4), 5.0)}, tokens=1)  # no new generation
    with contextlib.suppress(StoreLockedError):
        s.close()
    assert _lock_object(url) == other  # not deleted, not overwritten
    with fisherstore.open(url, mode="r") as r:  # nothing committed after the takeover
        assert r.step("t") == 1
        assert torch.equal(r.fisher("t", "w", bias_corrected=False).load(), torch.full((8, 4), 1.0))
    # nothing deleted either: step 2's generation is still there for the lock's holder to roll back
    rep = verify_store(url)
    assert rep.ok and [f.kind for f in rep.rolled_back] == ["uncommitted_generation"], rep.rolled_back


def test_a_writer_renews_its_lease_and_deletes_only_its_own_lock(s3, short_lease):
    url = s3()
    s = fisherstore.open(url, mode="w")
    first = _lock_object(url)
    assert (first["pid"], first["ttl"]) == (os.getpid(), TTL)
    time.sleep(TTL)
    now = _lock_object(url)
    assert now["token"] == first["token"] and now["beat"] > first["beat"] and now["heartbeat"] > first["heartbeat"]
    s.close()
    assert _lock_object(url) is None


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fisherstore.cli", *args], capture_output=True, text=True,
                          timeout=120, env=dict(env if env is not None else os.environ, PYTHONPATH=ROOT))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("cmd", ["info", "verify"])
@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_cli_on_a_closed_endpoint_exits_5_with_one_line(s3, cmd, backend):
    port = _closed_port()
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    r = _cli(cmd, "s3://some-bucket/runs/f", "--backend", backend, env=env)
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"s3://some-bucket/runs/f/zarr.json at http://127.0.0.1:{port} failed" in r.stderr
    assert "refused" in r.stderr.lower()


@pytest.mark.parametrize("cmd", ["info", "verify"])
def test_cli_without_credentials_exits_5_and_says_so(s3, cmd):
    url = s3()
    with fisherstore.open(url, mode="w") as s:
        s.create("t", "w", (4, 4))
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                            "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = os.devnull
    r = _cli(cmd, url, env=env)
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "credentials" in r.stderr and os.environ["AWS_ENDPOINT_URL"] in r.stderr


class _BlackHole:
    """A TCP server that accepts connections and never answers; or, with ``target``, a proxy to it
    that forwards until :attr:`hole` is set, then swallows every byte."""

    def __init__(self, target: int | None = None) -> None:
        self.target, self.hole, self.held = target, threading.Event(), []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        if target is None:
            self.hole.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if not self.hole.is_set():
                up = socket.create_connection(("127.0.0.1", self.target))
                self.held.append(up)
                threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
                threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.hole.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        for s in [self.sock, *self.held]:
            s.close()


@pytest.mark.parametrize("mode", ["r", "a"])
def test_a_server_that_never_answers_fails_in_bounded_time(s3, mode):
    hole = _BlackHole()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=rf"at {hole.url} failed.*gives up after 1 s and 1 retries"):
            fisherstore.open("s3://quiet/runs/f", mode=mode,
                             storage_options={"endpoint": hole.url, "timeout": 1, "retries": 1})
        assert time.monotonic() - t0 < 15  # two attempts of 1 s and a backoff; obstore's defaults took 181 s
    finally:
        hole.close()


_TS_OPEN = r"""
import sys, time
from fisherstore.backends.tensorstore_backend import TensorStoreBackend
be = TensorStoreBackend("s3://quiet/x", read_only=True, storage_options={"endpoint": sys.argv[1], "timeout": 2,
                                                                         "retries": 1})
t = time.monotonic()
try:
    be._open("t/w")  # TensorStore's own S3 client, not obstore's
except Exception as e:
    print(type(e).__name__, round(time.monotonic() - t, 1), e)
"""


def test_tensorstore_s3_requests_are_bounded_too(s3):
    # A fresh process: TensorStore reads its HTTP limits once per process, from variables an
    # earlier TensorStore store of this process may have set (and a child inherits).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORSTORE_CURL_")}
    hole = _BlackHole()
    try:
        r = subprocess.run([sys.executable, "-c", _TS_OPEN, hole.url], capture_output=True, text=True, timeout=120,
                           env=dict(env, PYTHONPATH=ROOT))
    finally:
        hole.close()
    kind, seconds, msg = r.stdout.split(" ", 2)
    assert kind == "StorageError" and float(seconds) < 30, r.stdout
    assert f"open array s3://quiet/x/t/w at {hole.url} failed" in msg and "tensorstore_spec" not in msg


def test_a_flush_to_a_server_that_stops_answering_fails_in_bounded_time(s3):
    url = s3()
    proxy = _BlackHole(target=int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    try:
        opts = {"endpoint": proxy.url, "timeout": 1, "retries": 1}
        s = fisherstore.open(url, mode="w", memory_budget=1 << 20, storage_options=opts)
        s.create("t", "w", (8, 4))
        s.update("t", {"w": torch.ones(8, 4)}, tokens=1)
        proxy.hole.set()
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=rf"at {proxy.url} failed"):
            s.flush()
        assert time.monotonic() - t0 < 20
        with contextlib.suppress(StorageError):
            s.close()
    finally:
        proxy.close()
    with fisherstore.open(url, mode="r") as r:  # the store kept its last commit: none
        assert r.tasks() == []


def test_storage_options_are_checked(s3):
    url = s3()
    with fisherstore.open(url, mode="w", storage_options={"timeout": 3, "retries": 0}) as s:
        s.create("t", "w", (4, 4))
    with fisherstore.open(url, mode="r", storage_options={"timeout": 2.5}) as r:
        assert r.params("t") == ["w"]
    for bad, name in (({"timeout": "3"}, "timeout"), ({"timeout": 0}, "timeout"), ({"retries": -1}, "retries"),
                      ({"retries": 1.5}, "retries"), ({"bogus_setting": "x"}, "bogus_setting"),
                      ({"region": 5}, "region")):
        with pytest.raises(InvalidArgumentError, match=name):
            fisherstore.open(url, mode="r", storage_options=bad)


def test_unlock_s3_exit_codes(s3):
    url = s3()
    r = _cli("unlock", url, "--force")
    assert (r.returncode, "no writer lock is held") == (0, r.stdout.strip().split(": ", 1)[1]), r
    s = fisherstore.open(url, mode="w")  # a live writer, renewing its lease
    r = _cli("unlock", url)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr and "--force" in r.stderr, r
    r = _cli("unlock", url, "--force")
    assert r.returncode == 4 and f"pid {os.getpid()}" in r.stderr and "lease is live" in r.stderr, r
    assert _lock_object(url)["pid"] == os.getpid()
    s.close()
    # a holder on another host that stopped renewing: removed once its lease expired (server clock)
    _put_lock(url, {"pid": 7, "host": "gone", "since": 0, "heartbeat": 0, "ttl": 1, "token": "t"})
    time.sleep(2.5)
    r = _cli("unlock", url, "--force")
    assert r.returncode == 0 and "removed the expired lock of pid 7 on host gone" in r.stdout, r
    assert _lock_object(url) is None
    # a lock from before leases (no ttl: never renewed) is removed with --force, as before
    _put_lock(url, {"pid": 8, "host": "old", "since": 0})
    assert _cli("unlock", url).returncode == 2
    assert _cli("unlock", url, "--force").returncode == 0 and _lock_object(url) is None
