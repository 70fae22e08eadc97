"""``moekit dashboard`` and the read-only runs endpoints: a run still being written shows its new
records, a compare directory lists every model and seed, nothing outside the directory is reachable,
and the run is never written."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from serve_util import InProcessServer, _free_port

pytest.importorskip("fastapi")
from moekit.serve import create_dashboard_app  # noqa: E402
from moekit.serve.runs import read_since  # noqa: E402


def _get(server, path):
    status, text, _ = server.raw("GET", path)
    return status, json.loads(text)


def _append(run, *records, tail=""):
    with open(run / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_run_that_is_still_training_shows_its_new_records(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    s = InProcessServer(create_dashboard_app(run))
    try:
        status, body = _get(s, "/v1/moekit/runs")
        assert status == 200 and [r["name"] for r in body["data"]] == ["run"]
        status, page = _get(s, "/v1/moekit/runs/run/metrics")  # no metrics yet: empty, not an error
        assert status == 200 and page["records"] == [] and page["offset"] == 0
        _append(run, {"step": 10, "tokens": 100, "train_loss": 5.0}, tail='{"step": 20, "tok')  # a line half written
        _, page = _get(s, "/v1/moekit/runs/run/metrics?offset=0")
        assert [r["step"] for r in page["records"]] == [10]
        offset = page["offset"]
        with open(run / "metrics.jsonl", "a") as f:  # the trainer finishes the line and writes another
            f.write('ens": 200, "train_loss": 4.0}\n' + json.dumps({"step": 20, "tokens": 200, "val_loss": 4.1}) + "\n")
        before = _snapshot(run)
        _, page = _get(s, f"/v1/moekit/runs/run/metrics?offset={offset}")
        assert [(r["step"], "val_loss" in r) for r in page["records"]] == [(20, False), (20, True)]
        _, again = _get(s, f"/v1/moekit/runs/run/metrics?offset={page['offset']}")
        assert again["records"] == [] and again["offset"] == page["offset"]
        assert _snapshot(run) == before  # read-only
        # a resumed run rewrites a shorter log: the page is told to start again
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 100, "train_loss": 5.0}) + "\n")
        _, page = _get(s, f"/v1/moekit/runs/run/metrics?offset={page['offset']}")
        assert page["reset"] is True and [r["step"] for r in page["records"]] == [10]
    finally:
        assert s.stop()


@pytest.fixture()
def compare(tmp_path):
    root = tmp_path / "compare"
    for name in ("dense-s0", "dense-s1", "moe-top2-s0", "moe-top2-s1"):
        run = root / name
        (run / "checkpoints" / "step-10").mkdir(parents=True)
        (run / "checkpoints" / "step-10" / "config.json").write_text("{}")  # a checkpoint is not a run of its own
        _append(run, {"step": 10, "tokens": 100, "train_loss": 5.0, "model": name})
    (root / "report.md").write_text("# report")
    (tmp_path / "secret").mkdir()
    _append(tmp_path / "secret", {"secret": True})
    os.symlink(tmp_path / "secret", root / "escape-s9")  # a symlink out of the directory is no run of it
    return root


def test_a_compare_directory_lists_every_model_and_seed(compare):
    s = InProcessServer(create_dashboard_app(compare))
    try:
        status, body = _get(s, "/v1/moekit/runs")
        assert status == 200 and body["root"] == "compare"
        assert [(r["name"], r["model"], r["seed"]) for r in body["data"]] == [
            ("dense-s0", "dense", 0), ("dense-s1", "dense", 1), ("moe-top2-s0", "moe-top2", 0),
            ("moe-top2-s1", "moe-top2", 1)]
        for r in body["data"]:
            _, page = _get(s, f"/v1/moekit/runs/{r['name']}/metrics")
            assert page["records"] == [{"step": 10, "tokens": 100, "train_loss": 5.0, "model": r["name"]}]
    finally:
        assert s.stop()


@pytest.mark.parametrize("name", ["..", "../secret", "escape-s9", "%2e%2e/secret", "dense-s0/..", "/etc",
                                  "dense-s0/checkpoints/step-10", "nope"])
def test_nothing_outside_the_runs_is_reachable(compare, name):
    s = InProcessServer(create_dashboard_app(compare))
    try:
        status, text, _ = s.raw("GET", f"/v1/moekit/runs/{name}/metrics")
        assert status == 404, text
        assert "secret\": true" not in text
    finally:
        assert s.stop()


def test_bad_offsets_are_a_400(compare):
    s = InProcessServer(create_dashboard_app(compare))
    try:
        for offset in ("-1", "x"):
            status, body = _get(s, f"/v1/moekit/runs/dense-s0/metrics?offset={offset}")
            assert status == 400 and body["error"]["param"] == "query.offset"
    finally:
        assert s.stop()


def test_read_since_skips_a_torn_line_and_stops_at_the_limit(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"torn\n{"a": 2}\n{"a": 3}\n')
    assert [r["a"] for r in read_since(path, 0)["records"]] == [1, 2, 3]
    first = read_since(path, 0, limit=12)  # the first line and part of the torn one
    assert first["records"] == [{"a": 1}] and first["offset"] == len('{"a": 1}\n')


def test_the_dashboard_command_serves_the_page(compare):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "dashboard", str(compare), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/moekit/runs", timeout=1) as r:
                    assert len(json.loads(r.read())["data"]) == 4
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"dashboard.js" in r.read()
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_dashboard_command_names_a_missing_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moekit", "dashboard", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "is not a directory" in out.stderr
