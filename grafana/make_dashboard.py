"""Writes grafana/dashboards/pdserve.json, the PD cluster dashboard: python grafana/make_dashboard.py

Panels are listed once here, as (title, unit, [(legend, PromQL)][, {type, mappings}]); the JSON is committed so a
user needs nothing but Grafana. tests/test_observability.py runs every expression through a
real Prometheus scraping a real node.
"""
import json
import os

Q = "{model=~\"$model\"}"
QI = "{model=~\"$model\", instance=~\"$instance\"}"


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [(f"p{q}{' {{' + by + '}}' if by else ''}",
             f"histogram_quantile(0.{q}, sum by ({group}) (rate({metric}_bucket{Q}[1m])))") for q in (50, 90, 99)]


# The role timeline shows each engine's role as a value mapped to its name (AUTO engines change it).
ROLE_CODES = {"PREFILL": 1, "DECODE": 2, "BOTH": 3}
STATE_TIMELINE = {"type": "state-timeline", "mappings": [
    {"type": "value", "options": {str(code): {"text": role, "index": code - 1} for role, code in ROLE_CODES.items()}}]}

ROWS = [
    ("Latency", [
        ("Time to first token", "s", quantiles("pdserve_time_to_first_token_seconds")),
        ("Time per output token", "s", quantiles("pdserve_time_per_output_token_seconds")),
        ("End-to-end latency", "s", quantiles("pdserve_e2e_request_latency_seconds")),
    ]),
    ("Traffic", [
        ("Requests per second", "reqps", [
            ("success {{model}}", f"sum by (model) (rate(nv_inference_request_success{Q}[1m]))"),
            ("failed {{model}} {{reason}}", f"sum by (model, reason) (rate(nv_inference_request_failure{Q}[1m]))")]),
        ("Tokens per second", "short", [
            ("generated {{model}}", f"sum by (model) (rate(pdserve_generation_tokens_total{Q}[1m]))"),
            ("prompt {{model}}", f"sum by (model) (rate(pdserve_prompt_tokens_total{Q}[1m]))")]),
        ("Requests in flight (front end)", "short", [
            ("{{model}} v{{version}}", f"sum by (model, version) (nv_inference_pending_request_count{Q})")]),
    ]),
    ("Engines", [
        ("Running sequences per role", "short", [
            ("{{role}}", f"sum by (role) (pdserve_requests_running{QI})")]),
        ("Waiting sequences per role", "short", [
            ("{{role}}", f"sum by (role) (pdserve_requests_waiting{QI})")]),
        ("KV cache use per instance", "percentunit", [
            ("{{role}} {{instance}}", f"pdserve_kv_cache_usage_ratio{QI}")]),
        ("Preemptions", "short", [
            ("{{instance}}", f"sum by (instance) (rate(pdserve_preemptions_total{QI}[1m]))")]),
    ]),
    ("Prefix cache", [
        ("Prefix-cache hit ratio per instance", "percentunit", [
            ("{{role}} {{instance}}", f"pdserve_prefix_cache_hit_ratio{QI}")]),
        ("Prompt tokens from the prefix cache per role", "short", [
            ("hits {{role}}", f"sum by (role) (rate(pdserve_prefix_cache_hits_total{QI}[1m]))"),
            ("looked up {{role}}", f"sum by (role) (rate(pdserve_prefix_cache_queries_total{QI}[1m]))")]),
        ("Cached KV blocks per instance", "short", [
            ("{{role}} {{instance}}", f"pdserve_kv_cache_cached_blocks{QI}")]),
    ]),
    ("KV transfer (PD)", [
        ("KV transfer latency", "s", quantiles("pdserve_kv_transfer_seconds")),
        ("KV transfer bandwidth", "Bps", [
            ("{{instance}}", f"sum by (instance) (rate(pdserve_kv_transfer_bytes_total{QI}[1m]))")]),
        ("KV handoff failures", "short", [
            ("{{cause}}", f"sum by (cause) (increase(pdserve_kv_handoff_failures_total{Q}[5m]))"),
            ("transfer {{instance}}", f"sum by (instance) (increase(pdserve_kv_transfer_failures_total{QI}[5m]))")]),
    ]),
    ("Reliability", [
        ("Failures by cause", "short", [
            ("{{reason}}", "sum by (reason) (increase(nv_inference_request_failure{model=~\"$model\", "
                           "reason=~\"overloaded|deadline_exceeded|internal|engine_failure|no_engine\"}[5m]))")]),
        ("Requests migrated mid-stream", "short", [
            ("{{model}} v{{version}}", f"sum by (model, version) (increase(pdserve_request_migrations_total{Q}[5m]))")]),
    ]),
    ("Elastic roles (AUTO)", [
        ("Role per instance over time", "short", [
            ("{{instance}}", "max by (instance) (" + " or ".join(
                f"pdserve_engine_role{{model=~\"$model\", instance=~\"$instance\", role=\"{role}\"}} * {code}"
                for role, code in ROLE_CODES.items()) + ")")], STATE_TIMELINE),
        ("Engines per role", "short", [
            ("{{model}} {{role}}", f"sum by (model, role) (pdserve_engine_role{Q})")]),
        ("Role switches (5m)", "short", [
            ("{{instance}} {{from_role}} -> {{to_role}}",
             f"sum by (instance, from_role, to_role) (increase(pdserve_role_switches_total{QI}[5m])) or on() vector(0)")]),
    ]),
    ("Cluster", [
        ("Instances per role (etcd view)", "short", [
            ("{{role}} {{state}}", f"sum by (role, state) (pdserve_cluster_instances{Q})")]),
        ("Instances per role (this node)", "short", [
            ("{{role}}", f"sum by (role) (pdserve_instances{Q})")]),
        ("Model states", "short", [
            ("{{model}} v{{version}} {{state}}", f"sum by (model, version, state) (pdserve_model_state{Q})")]),
        ("etcd health", "short", [
            ("watch outages", "sum(pdserve_etcd_outages_total)"),
            ("keepalive failures", f"sum(pdserve_lease_keepalive_failures_total{Q})")]),
    ]),
]


def build() -> dict:
    panels, y, pid = [], 0, 1
    for row_title, row in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        width = 24 // len(row)
        for i, (title, unit, targets, *extra) in enumerate(row):
            kind = extra[0] if extra else {}   # a panel other than a time series: its type and value mappings
            panels.append({
                "type": kind.get("type", "timeseries"), "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                "fieldConfig": {"defaults": {"unit": unit, **({"mappings": kind["mappings"]} if "mappings" in kind else {})},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                            for j, (legend, expr) in enumerate(targets)]})
            pid += 1
        y += 8
    return {
        "title": "pdserve: PD cluster", "uid": "pdserve-cluster", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "tags": ["pdserve", "llm"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "model", "type": "query", "label": "Model", "includeAll": True, "multi": True, "allValue": ".*",
             "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
             "query": {"query": "label_values(pdserve_model_state, model)", "refId": "model"},
             "definition": "label_values(pdserve_model_state, model)",
             "current": {"text": "All", "value": "$__all"}},
            {"name": "instance", "type": "query", "label": "Instance", "includeAll": True, "multi": True,
             "allValue": ".*", "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
             "query": {"query": "label_values(pdserve_kv_cache_usage_ratio{model=~\"$model\"}, instance)",
                       "refId": "instance"},
             "definition": "label_values(pdserve_kv_cache_usage_ratio{model=~\"$model\"}, instance)",
             "current": {"text": "All", "value": "$__all"}}]},
        "panels": panels}


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "pdserve.json")
    with open(path, "w") as f:
        json.dump(build(), f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
