import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fisherstore  # noqa: E402

BACKENDS = ["ram", "zarr", "tensorstore"]
DISK_BACKENDS = ["zarr", "tensorstore"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=DISK_BACKENDS)
def disk_backend(request):
    return request.param


@pytest.fixture
def open_store(tmp_path):
    """open_store(backend, **kw) -> a new store in a fresh directory (closed at teardown)."""
    opened = []

    def _open(backend="zarr", mode="w", sub="store", **kw):
        s = fisherstore.open(tmp_path / sub, mode=mode, backend=backend, **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        if not s.closed:
            s.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port, its AWS_* environment, and a bucket factory (``s3() -> URL``).

    A real S3 server (moto's), started here for the module that asks for it.
    """
    pytest.importorskip("obstore", reason="s3:// stores need obstore (pip install 'fisherstore[s3]')")
    pytest.importorskip("moto", reason="the S3 tests run against moto's server (pip install 'moto[server]')")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    counter = iter(range(10**6))

    def bucket() -> str:
        name = f"fs-test-{next(counter)}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}/runs/fisher"

    try:
        yield bucket
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
