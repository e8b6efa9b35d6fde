"""Re-take docs/images/airflow-dag.png: the `transfer-learning-feature-transfer` DAG's graph in Airflow's UI.

Starts `make airflow-standalone` on a free port, signs in as the admin it generates, opens the DAG
in the graph view, saves the picture, then stops Airflow (its whole process group). Needs
Debian's `chromium` and Playwright in any Python (`pip install playwright`; Playwright's own
browser download is not needed):

    python docs/images/airflow_screenshot.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

PROJECT = Path(__file__).resolve().parents[2]
OUTPUT = PROJECT / "docs" / "images" / "airflow-dag.png"
DAG = "transfer-learning-feature-transfer"  # the whole default DAG is too wide to read


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5) as response:
            health = json.loads(response.read())
    except OSError:
        return False
    return all(part.get("status") == "healthy" for part in health.values())


def main() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW__API__PORT=str(port), KEDRO_DISABLE_TELEMETRY="true")
    airflow = subprocess.Popen(
        ["make", "airflow-standalone"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not healthy(base):
            if time.monotonic() > deadline:
                raise SystemExit("Airflow did not become healthy in 10 minutes")
            time.sleep(3)
        passwords = PROJECT / "airflow_home" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900}, device_scale_factor=1.5)
            page.goto(base)
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", password)
            page.keyboard.press("Enter")
            page.wait_for_url(lambda url: "login" not in url, timeout=60_000)
            page.wait_for_load_state("networkidle")  # the sign-in redirects have finished
            page.goto(f"{base}/dags/{DAG}")
            page.get_by_role("button", name="Show Graph (Press g)").click()
            page.wait_for_selector(".react-flow__node", timeout=120_000)
            time.sleep(3)  # the layout settles
            # The graph alone, top to bottom: the tasks' long names stay readable.
            page.get_by_role("button", name="Collapse Details Panel").click()
            page.get_by_role("button", name="Options").click()
            page.locator("[data-part=trigger]", has_text="Left to Right").click()
            page.get_by_role("option", name="Top to Bottom").click()
            page.keyboard.press("Escape")
            time.sleep(2)
            page.get_by_role("button", name="Fit View").click()
            time.sleep(2)
            page.screenshot(path=str(OUTPUT))
            browser.close()
        print(f"wrote {OUTPUT}")
    finally:
        os.killpg(airflow.pid, signal.SIGTERM)
        try:
            airflow.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(airflow.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
