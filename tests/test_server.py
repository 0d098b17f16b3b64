"""examples/server.py on CPU: torchrun with 2 processes serving the tiny random FLUX.1 pipeline, real HTTP requests
over 127.0.0.1; images equal a one-process run of the same request, bad requests get 4xx and the server goes on."""
from __future__ import annotations

import argparse
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
REQUEST = {"prompt": "a red cat on a mat", "seed": 3, "steps": 3, "height": 48, "width": 64, "guidance": 4.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    port, log = _free_port(), tempfile.TemporaryFile()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "examples/server.py", "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: stopped with all its ranks below
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not become ready:\n{log.read().decode()[-4000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@functools.cache
def _one_process_server():
    """examples/server.py as a module, and its tiny pipeline on this one process, without fastusp."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import server
    finally:
        sys.path.remove(str(REPO / "examples"))
    return server, *server.build(argparse.Namespace(model=None, max_size=None, true_cfg=4.0))


def _one_process_png(request: dict) -> np.ndarray:
    """The same request, served by examples/server.py's own functions on one process."""
    server, pipe, defaults = _one_process_server()
    image = pipe(**server.call_kwargs(pipe, server.GenerateRequest(**request), defaults)).images[0]
    return _pixels(server.png_bytes(image))


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def _generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=60)


def test_server_images_equal_one_process(server_url):
    for request in (REQUEST, dict(REQUEST, negative_prompt="a dog", seed=4)):
        response = _generate(server_url, request)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        served, expected = _pixels(response.content), _one_process_png(request)
        assert served.shape == expected.shape == (REQUEST["height"], REQUEST["width"], 3)
        # float32 sums in another order (a few 1e-7) may round a pixel to the next level, nothing more
        assert np.abs(served - expected).max() <= 1


@pytest.mark.parametrize("body, status, words", [
    (dict(REQUEST, style="oil"), 422, "Extra inputs are not permitted"),
    (dict(REQUEST, seed="3"), 422, "valid integer"),
    ({"seed": 3}, 422, "Field required"),
    (dict(REQUEST, height=63), 422, "height must be a multiple of 4"),
    (dict(REQUEST, height=4, width=4), 400, "1 image tokens cannot be split over 2 ranks"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server_url, body, status, words):
    response = _generate(server_url, body)
    assert response.status_code == status and words in response.text, response.text
    assert response.headers["content-type"] == "application/json"
    again = _generate(server_url, REQUEST)
    assert again.status_code == 200 and again.headers["content-type"] == "image/png"
