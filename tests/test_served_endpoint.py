"""The packaged model behind a real `mlflow models serve`, as an outside HTTP client meets it."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.classifier import build_classifier
from transfer_learning.serving.classifier import MAX_PIXELS_VARIABLE, ImageClassifier
from transfer_learning.serving.packaging import save_image_model

# A real server process: start-up takes seconds.
pytestmark = pytest.mark.slow

CLASSES = ["china", "flower"]
SERVER_MAX_PIXELS = 1_000_000


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A saved image model served on localhost; stopped (with its workers) after the tests."""
    folder = tmp_path_factory.mktemp("served")
    settings = BackboneSettings(image_size=32)
    network, _ = build_classifier(settings, len(CLASSES), seed=0)
    model = ImageClassifier("parameter_transfer", CLASSES, settings.name, 32, network.state_dict())
    save_image_model(model, folder / "model")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env[MAX_PIXELS_VARIABLE] = str(SERVER_MAX_PIXELS)
    # mlflow starts `uvicorn` by name: the environment's own, as an activated venv would find it.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder / "model")]
    process = subprocess.Popen(
        [*command, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "wb"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, folder / "server.log")
        yield url, folder / "server.log"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
        process.wait(timeout=60)


def wait_until_up(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail("server did not start:\n" + log.read_text()[-3000:])
        time.sleep(1)


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_the_endpoint_answers_good_rows_and_codes_bad_ones_in_strict_json(server):
    url, log = server
    photo = Image.fromarray(load_sample_images().images[0]).resize((160, 120))
    rows = [
        {"image": base64.b64encode(png_bytes(photo)).decode()},
        {"path": "/etc/passwd"},
        {"path": "/etc/nonexistent"},
        {"image": "%%% not base64 %%%"},
        {"image": base64.b64encode(b"GIF89a? no, just text").decode()},
        {"image": base64.b64encode(png_bytes(Image.new("RGB", (1200, 1000)))).decode()},
    ]
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"dataframe_records": rows}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert answer.status == 200
        body = answer.read().decode()
    # A strict parser: NaN or Infinity anywhere would fail here, as in JavaScript's JSON.parse.
    predictions = json.loads(body, parse_constant=refuse_constant)["predictions"]
    codes = [row["error"] for row in predictions]
    assert codes == [
        "",
        "path_not_allowed",
        "path_not_allowed",  # exists or not: the client learns nothing about the server's files
        "bad_base64",
        "not_an_image",
        "too_large",
    ]
    good = predictions[0]
    assert good["predicted_class"] in CLASSES
    assert np.isclose(good["probability_china"] + good["probability_flower"], 1.0)
    for row in predictions[1:]:
        assert row["probability_china"] is None and row["predicted_class"] == ""
    assert "etc" not in body and "Error" not in body and "0x" not in body
    assert "server-side path" in log.read_text()  # the detail stays in the server's log
