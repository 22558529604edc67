"""Metrics move as requests succeed, fail and stream; every dashboard query returns data
through a real Prometheus (Debian's) scraping a real node."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import ROOT, PdServer, add_model, config_text, free_port, inputs

from pdserve_clients import LLMClient

sys.path.insert(0, os.path.join(ROOT, "grafana"))
import make_dashboard  # noqa: E402

DASHBOARD = os.path.join(ROOT, "grafana", "dashboards", "pdserve.json")
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def node(tmp_path_factory, small_model):
    repo = str(tmp_path_factory.mktemp("obs-repo"))
    add_model(repo, "agg", small_model, config_text())
    add_model(repo, "pd", small_model, config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu"))))
    server = PdServer(repo).start()
    server.wait_ready("agg")
    server.wait_ready("pd")
    yield server
    server.stop()


def stream(server, model, prompt, max_tokens):
    client = LLMClient(server.url, model)
    try:
        client.stream_all(prompt, timeout=60, **GREEDY, max_tokens=max_tokens)
    finally:
        client.close()


def test_counters_and_histograms_move(node):
    labels = {"model": "agg", "version": "1"}
    before = {name: node.metric_value(name, **labels) for name in (
        "nv_inference_request_success", "nv_inference_count", "pdserve_time_to_first_token_seconds_count",
        "pdserve_time_per_output_token_seconds_count", "pdserve_e2e_request_latency_seconds_count",
        "pdserve_generation_tokens_total", "nv_inference_first_response_histogram_ms_count",
        "nv_inference_request_duration_us")}
    failures = node.metric_value("nv_inference_request_failure", reason="invalid_argument", **labels)
    node.client.infer("agg", inputs("a", False, {**GREEDY, "max_tokens": 5}))
    stream(node, "agg", "b", 7)
    node.client.infer("agg", inputs("c", False, {**GREEDY, "max_tokens": 1}))  # one token: no TPOT
    with pytest.raises(InferenceServerException):
        node.client.infer("agg", inputs("d", False, {"max_tokens": -3}))
    after = lambda name: node.metric_value(name, **labels) - before[name]  # noqa: E731
    assert after("nv_inference_request_success") == 3
    assert after("nv_inference_count") == 3
    assert after("pdserve_time_to_first_token_seconds_count") == 3, "TTFT once per request"
    assert after("nv_inference_first_response_histogram_ms_count") == 3
    assert after("pdserve_time_per_output_token_seconds_count") == 2, "TPOT once per request with 2+ tokens"
    assert after("pdserve_e2e_request_latency_seconds_count") == 3
    assert after("pdserve_generation_tokens_total") == 5 + 7 + 1
    assert after("nv_inference_request_duration_us") > 0
    assert node.metric_value("nv_inference_request_failure", reason="invalid_argument", **labels) == failures + 1
    assert node.metric_value("nv_inference_pending_request_count", **labels) == 0


def dashboard_queries() -> list[str]:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_file_is_what_the_generator_writes():
    with open(DASHBOARD) as f:
        assert json.load(f) == make_dashboard.build(), "run: python grafana/make_dashboard.py"


def test_every_dashboard_query_returns_data_in_prometheus(node, tmp_path):
    # traffic of every kind: aggregated and PD, unary and streaming, and a failure
    for i in range(3):
        node.client.infer("pd", inputs(f"x{i}", False, {**GREEDY, "max_tokens": 6}))
        stream(node, "agg", f"y{i}", 6)
    with pytest.raises(InferenceServerException):
        node.client.infer("pd", inputs("z", False, {"top_p": 7}))
    exported = set(node.metrics())
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pdserve\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{node.metrics_port}']\n")
    prometheus = subprocess.Popen(
        [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            body = json.load(urllib.request.urlopen(url, timeout=5))
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        def scrapes() -> float:
            try:
                result = query('count_over_time(up{job="pdserve"}[1m])')
                return float(result[0]["value"][1]) if result else 0
            except OSError:
                return 0
        deadline = time.time() + 60
        while scrapes() < 3 and time.time() < deadline:
            time.sleep(0.5)
        # more traffic between scrapes, so rates over the window are not empty
        for i in range(3):
            node.client.infer("pd", inputs(f"w{i}", False, {**GREEDY, "max_tokens": 6}))
            stream(node, "agg", f"v{i}", 6)
        time.sleep(3)
        empty = []
        for expr in dashboard_queries():
            for name in set(re.findall(r"\b((?:pdserve|nv)_[a-z0-9_]+)", expr)):
                assert any(name == f or name.startswith(f + "_") for f in exported), \
                    f"{expr} refers to {name}, which the server does not export"
            if not query(expr.replace("$model", ".*").replace("$instance", ".*")):
                empty.append(expr)
        assert empty == [], f"panels with no data: {empty}"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
