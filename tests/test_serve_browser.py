"""`anomalens serve` end to end: the real command on a free loopback port, its API over HTTP, and the web
page in Debian's headless Chromium (driven by selenium through the system's chromedriver).

`.ci/run` installs chromium and chromium-driver with apt-get when they are absent; these tests skip only
where neither is installed (e.g. a developer machine without them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
START_TIMEOUT_S = 90  # imports + model build on a busy 2-core machine
SERVE = [
    *("serve", "--method", "aa-clip", "--backbone", "test-tiny", "--pretrained", "none"),
    *("--set", "image_size=64", "--threshold", "0.5", "--quiet"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of `anomalens serve` running in a subprocess on 127.0.0.1."""
    port = free_port()
    src = str(Path(anomalens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "anomalens.cli", *SERVE, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"anomalens serve exited with {process.returncode}: {process.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"anomalens serve did not answer /health within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post_image(url: str, name: str, data: bytes) -> tuple[int, dict]:
    """POST one file in the multipart field `image` with the standard library only."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_over_http(server, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "part.png")
    status, result = post_image(f"{server}/v1/predict", "part.png", (tmp_path / "part.png").read_bytes())
    assert status == 200 and (result["width"], result["height"]) == (40, 48)
    assert result["verdict"] == ("anomalous" if result["score"] > 0.5 else "normal")
    status, error = post_image(f"{server}/v1/predict", "notes.txt", b"not an image")
    assert status == 400 and error["error"].startswith("cannot read image notes.txt")
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert response.status == 200


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver are not installed")
def test_web_page_in_headless_chromium(server, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium look for a browser online
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "class-name").get_attribute("value") == "object")
        driver.find_element(By.ID, "files").send_keys(str(path))
        heatmap = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result img.heatmap"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete", heatmap))
        size = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", heatmap
        )
        score = driver.find_element(By.CSS_SELECTOR, ".result .score").text
        verdict = driver.find_element(By.CSS_SELECTOR, ".result .verdict").text
        value = float(score.removeprefix("score "))
        # Dragging the threshold slider above the score turns the verdict to normal.
        driver.execute_script(
            "const s = document.getElementById('threshold'); s.value = s.max;"
            "s.dispatchEvent(new Event('input'));"
        )
        moved = driver.find_element(By.CSS_SELECTOR, ".result .verdict").text
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert size == [90, 60]  # the heatmap has the image's size
    assert verdict == ("anomalous" if value > 0.5 else "normal")
    assert moved == "normal"
    assert errors == []
