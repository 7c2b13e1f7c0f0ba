"""`llmos up` serves the REST API too: a key for tenant `default` on the first start only."""

import re
import signal
import socket
import stat
import subprocess
import sys
import time

import httpx
import pytest

from llmos.settings import Settings
from tests.helpers import service_env
from tests.integration.test_api import free_port

pytestmark = pytest.mark.e2e

LLMOS = [sys.executable, "-m", "llmos.cli"]
KEY = re.compile(r"API key for tenant default \(shown only this once, store it now\): (llmos_\S+)")


class Up:
    """`llmos up ARGS` on its own LLMOS_HOME, read until it says it is up."""

    def __init__(self, tmp_path, *args: str) -> None:
        env = service_env(LLMOS_HOME=str(tmp_path / "home"))
        self.proc = subprocess.Popen(LLMOS + ["up", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        self.seen = ""
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in self.seen:
            line = self.proc.stdout.readline()
            assert line or self.proc.poll() is None, self.seen
            self.seen += line
            assert time.monotonic() < deadline, self.seen

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, self.seen + rest
        return rest


def test_up_serves_the_api_and_shows_the_first_key_once(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = Up(tmp_path, "--api-port", str(port))
    try:
        assert f"REST API at {url}" in first.seen and url in first.seen
        key = KEY.search(first.seen).group(1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            models = {m["name"]: m for m in http.get("/v1/models").json()["data"]}
            assert models["minilm"]["served"]
            job = http.post("/v1/jobs", json={"model": "minilm", "task": "sentiment",
                                              "input": {"text": "I love it, wonderful!"}}).json()
            done = http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 30}).json()
            assert done["status"] == "succeeded" and done["result"]["label"] == "POSITIVE", done
        # the dashboard is on with no setting: a secret of this home, 0600, given to the API
        secret_file = tmp_path / "home" / "dashboard.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        with httpx.Client(base_url=url, timeout=60) as browser:
            resp = browser.post("/dashboard/login", data={"key": key}, follow_redirects=False)
            assert resp.status_code == 303 and "llmos_dashboard=" in resp.headers["set-cookie"], resp.text
            assert 'id="panel-counts"' in browser.get("/dashboard").text
    finally:
        rest = first.stop()
    assert "stopped" in rest
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)  # stopped with the rest
    assert not Settings(home=tmp_path / "home").redis_socket.exists()

    second = Up(tmp_path, "--api-port", str(port))  # same home: the key exists, it is not shown again
    try:
        assert f"REST API at {url}" in second.seen and "llmos keys create --tenant default" in second.seen
        assert not KEY.search(second.seen) and key not in second.seen
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"  # the same key works
    finally:
        second.stop()


def test_a_taken_port_is_refused_before_anything_starts_and_no_api_skips_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res = subprocess.run(LLMOS + ["up", "--api-port", str(port)], capture_output=True, text=True,
                             env=service_env(LLMOS_HOME=str(tmp_path / "a")), cwd=tmp_path, timeout=60)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"cannot serve the API on 127.0.0.1:{port}" in res.stderr and "--no-api" in res.stderr
        assert "--api-port N" in res.stderr
        assert not (tmp_path / "a" / "llmos.db").exists()  # nothing was started

        up = Up(tmp_path, "--no-api", "--api-port", str(port))
        try:
            assert "REST API" not in up.seen and "minilm" in up.seen
        finally:
            up.stop()


def test_a_bad_tenants_table_stops_up_before_anything_starts(tmp_path):
    (tmp_path / "llmos.toml").write_text('[tenants.acme]\nmax_queued_jobs = "many"\n')
    res = subprocess.run(LLMOS + ["up", "--api-port", str(free_port())], capture_output=True, text=True,
                         env=service_env(LLMOS_HOME=str(tmp_path / "a")), cwd=tmp_path, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "[tenants.acme] max_queued_jobs = 'many' is invalid" in res.stderr and "llmos.toml" in res.stderr
    assert not (tmp_path / "a").exists()
