"""The chat page at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium),
and `bitllm serve` as a real subprocess.

The page test types a message, sends it and watches the answer stream in: the text must grow over
several reads before the page marks the answer done, and end equal to the engine's own `LLM.chat`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

pytest.importorskip("fastapi")

import bitllm  # noqa: E402
from bitllm.serve import ServeConfig, Server  # noqa: E402
from bitllm.serve.server import free_port  # noqa: E402
from serve_helpers import tiny_chat_checkpoint  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("serve_page") / "tiny")


def test_chat_page_streams_in_chromium(model_dir, monkeypatch):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("headless Chromium test needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By

    llm = bitllm.LLM(model_dir, threads=1)
    want = llm.chat([{"role": "user", "content": "Shall I compare thee"}], max_new_tokens=40)
    assert len(want) > 10
    forward = llm.backend.forward

    def slow_forward(*a, **k):  # ~25 ms a token, so the page visibly receives the answer piece by piece
        time.sleep(0.025)
        return forward(*a, **k)

    monkeypatch.setattr(llm.backend, "forward", slow_forward)
    with Server(llm, ServeConfig(model_name="tiny-page")) as server, tempfile.TemporaryDirectory() as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
        try:
            driver.set_page_load_timeout(30)
            driver.get(server.url + "/")
            assert "tiny-page" in driver.title
            driver.find_element(By.ID, "temperature").clear()
            driver.find_element(By.ID, "temperature").send_keys("0")  # greedy: the answer is known
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("40")
            box = driver.find_element(By.ID, "input")
            box.send_keys("Shall I compare thee")
            driver.find_element(By.ID, "send").click()
            seen: list[str] = []
            t0 = time.monotonic()
            state = None
            while time.monotonic() - t0 < 30:
                state, text = driver.execute_script(
                    "const m = document.querySelector('.msg.assistant, .msg.error');"
                    "return m ? [m.dataset.state, m.textContent] : [null, ''];")
                if text and (not seen or text != seen[-1]):
                    seen.append(text)
                if state in ("done", "error"):
                    break
                time.sleep(0.05)
            assert state == "done", f"the page ended in state {state!r}: {seen[-1:]}"
            assert len(seen) >= 3, f"the answer did not stream in (saw {len(seen)} distinct texts)"
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), "streamed text must only grow"
            assert seen[-1] == want
            user = driver.find_element(By.CSS_SELECTOR, ".msg.user").text
            assert user == "Shall I compare thee"
        finally:
            driver.quit()


def test_cli_serve_subprocess(model_dir):
    """`bitllm serve` binds loopback, answers, honours --api-key, and stops on SIGTERM."""
    port = free_port()
    cmd = [sys.executable, "-m", "bitllm.cli", "serve", str(model_dir), "--port", str(port), "--api-key", "k",
           "--threads", "1", "--max-batch", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "tiny"
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "The quick", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
