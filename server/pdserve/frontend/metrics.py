"""Prometheus metrics for one node: Triton's nv_inference_* names plus pdserve_* LLM metrics.

Request figures are observed in the front end as requests finish; engine figures (running,
waiting, KV use) are the engines' last Stats answers, which the load plane (cluster/load.py)
polls whether or not metrics are served; they are read at scrape time, so an engine that is
gone leaves no stale series behind.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from pdserve.cluster.load import LoadPlane
from pdserve.common.constants import KV_TRANSFER_BUCKETS
from pdserve.common.errors import FAILURE_LABELS, HANDOFF_LABELS, Cause

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
FIRST_RESPONSE_MS_BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 60000)


class TritonCounters:
    """Triton's counters keep their exact names (no `_total`), as Triton's dashboards expect.

    They are exported untyped: prometheus_client would write a counter's TYPE line as
    `<name>_total`, which would not match these sample names. PromQL's rate() works the same."""

    def __init__(self):
        self.success = defaultdict(int)
        self.failure = defaultdict(int)
        self.count = defaultdict(int)
        self.duration_us = defaultdict(int)
        self.queue_us = defaultdict(int)
        self.pending = defaultdict(int)

    def collect(self):
        def counter(name, doc, values, label_names=("model", "version")):
            metric = Metric(name, doc, "unknown")
            for labels, value in values.items():
                metric.add_sample(name, dict(zip(label_names, labels)), value)
            return metric
        yield counter("nv_inference_request_success", "Number of successful inference requests", self.success)
        yield counter("nv_inference_request_failure", "Number of failed inference requests", self.failure,
                      ("model", "version", "reason"))
        yield counter("nv_inference_count", "Number of inferences performed", self.count)
        yield counter("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
                      self.duration_us)
        yield counter("nv_inference_queue_duration_us", "Cumulative time requests wait before their first token",
                      self.queue_us)
        gauge = GaugeMetricFamily("nv_inference_pending_request_count", "Requests in flight", labels=["model", "version"])
        for labels, value in self.pending.items():
            gauge.add_metric(list(labels), value)
        yield gauge


class EngineCollector:
    """Engine, cluster and repository figures, read at scrape time: this node's engines from
    their last Stats (the load plane's), the cluster from the registry view, the models from
    the manager."""

    def __init__(self, manager, registry=None, plane: LoadPlane | None = None):
        self.manager = manager
        self.registry = registry
        self.plane = plane

    def collect(self):
        running = GaugeMetricFamily("pdserve_requests_running", "Sequences running in the engine",
                                    labels=["model", "role", "instance"])
        waiting = GaugeMetricFamily("pdserve_requests_waiting", "Sequences waiting in the engine",
                                    labels=["model", "role", "instance"])
        kv = GaugeMetricFamily("pdserve_kv_cache_usage_ratio", "Share of the engine's KV blocks in use",
                               labels=["model", "role", "instance"])
        preempt = Metric("pdserve_preemptions", "Sequences preempted for lack of KV blocks", "counter")
        transfer = HistogramMetricFamily("pdserve_kv_transfer_seconds", "KV handoff write time, per prefill engine",
                                         labels=["model", "role", "instance"])
        transfer_bytes = Metric("pdserve_kv_transfer_bytes", "KV bytes written to decode engines", "counter")
        transfer_failures = Metric("pdserve_kv_transfer_failures", "KV handoffs that failed", "counter")
        keepalive = Metric("pdserve_lease_keepalive_failures", "etcd lease keepalives that failed, per engine", "counter")
        cache_queries = Metric("pdserve_prefix_cache_queries", "Prompt tokens looked up in the engine's prefix cache",
                               "counter")
        cache_hits = Metric("pdserve_prefix_cache_hits", "Prompt tokens served from the engine's prefix cache", "counter")
        hit_ratio = GaugeMetricFamily("pdserve_prefix_cache_hit_ratio", "Prefix-cache hits / queries since the engine "
                                      "started (0 before its first lookup)", labels=["model", "role", "instance"])
        cached_blocks = GaugeMetricFamily("pdserve_kv_cache_cached_blocks", "KV blocks holding reusable prefix KV "
                                          "(in use or free)", labels=["model", "role", "instance"])
        tier_labels = ["model", "role", "instance", "tier"]
        tier_hits = Metric("pdserve_kv_offload_hits", "Prompt tokens whose KV came from an offload tier instead of "
                           "being computed", "counter")
        tier_saved = Metric("pdserve_kv_offload_saved_bytes", "KV bytes the pool evicted into an offload tier",
                            "counter")
        tier_loaded = Metric("pdserve_kv_offload_loaded_bytes", "KV bytes loaded back into the pool from an offload "
                             "tier", "counter")
        tier_seconds = Metric("pdserve_kv_offload_copy_seconds", "Time spent copying KV to and from an offload tier",
                              "counter")
        tier_used = GaugeMetricFamily("pdserve_kv_offload_used_bytes", "KV bytes an offload tier holds",
                                      labels=tier_labels)
        tier_capacity = GaugeMetricFamily("pdserve_kv_offload_capacity_bytes", "KV bytes an offload tier can hold",
                                          labels=tier_labels)
        instances = GaugeMetricFamily("pdserve_instances", "Live engine instances on this node", labels=["model", "role"])
        cluster = GaugeMetricFamily("pdserve_cluster_instances", "Engine instances in the etcd view, by state",
                                    labels=["model", "role", "state"])
        outages = Metric("pdserve_etcd_outages", "Times this front end lost its etcd watch", "counter")
        states = GaugeMetricFamily("pdserve_model_state", "1 for each model version's state",
                                   labels=["model", "version", "state"])
        roles = GaugeMetricFamily("pdserve_engine_role", "1 for the role each engine of this node serves now "
                                  "(AUTO instances change it)", labels=["model", "version", "instance", "role"])
        switches = Metric("pdserve_role_switches", "AUTO engines switched from one role to another", "counter")
        abandoned = Metric("pdserve_role_switches_abandoned", "AUTO role switches given up (the engine did not "
                           "drain within planner_drain_timeout_s, or failed)", "counter")
        live = defaultdict(int)
        for dep in self.manager.all_deployments():
            for engine in dep.live_engines():
                live[(dep.name, engine.role)] += 1
                roles.add_metric([dep.name, str(dep.version), engine.instance_id, engine.role], 1)
                stats = self.plane.last_stats(engine.address) if self.plane is not None else None
                if stats is None:
                    continue
                labels = [dep.name, engine.role, engine.instance_id]
                running.add_metric(labels, stats.num_running)
                waiting.add_metric(labels, stats.num_waiting)
                total = max(stats.num_total_blocks, 1)
                kv.add_metric(labels, (stats.num_total_blocks - stats.num_free_blocks) / total)
                named = dict(zip(["model", "role", "instance"], labels))
                preempt.add_sample("pdserve_preemptions_total", named, stats.num_preemptions)
                keepalive.add_sample("pdserve_lease_keepalive_failures_total", named, stats.lease_keepalive_failures)
                cache_queries.add_sample("pdserve_prefix_cache_queries_total", named, stats.prefix_cache_queries)
                cache_hits.add_sample("pdserve_prefix_cache_hits_total", named, stats.prefix_cache_hits)
                queried = stats.prefix_cache_queries
                hit_ratio.add_metric(labels, stats.prefix_cache_hits / queried if queried else 0.0)
                cached_blocks.add_metric(labels, stats.num_cached_blocks)
                for t in stats.kv_tiers:
                    per_tier = {**named, "tier": t.tier}
                    tier_hits.add_sample("pdserve_kv_offload_hits_total", per_tier, t.hit_tokens)
                    tier_saved.add_sample("pdserve_kv_offload_saved_bytes_total", per_tier, t.saved_bytes)
                    tier_loaded.add_sample("pdserve_kv_offload_loaded_bytes_total", per_tier, t.loaded_bytes)
                    tier_seconds.add_sample("pdserve_kv_offload_copy_seconds_total", per_tier, t.copy_seconds)
                    tier_used.add_metric([*labels, t.tier], t.used_bytes)
                    tier_capacity.add_metric([*labels, t.tier], t.capacity_bytes)
                if engine.role == "PREFILL" or stats.kv_transfers:
                    buckets = [(str(b), c) for b, c in zip(KV_TRANSFER_BUCKETS, stats.kv_transfer_bucket_counts)]
                    transfer.add_metric(labels, buckets + [("+Inf", stats.kv_transfers)], stats.kv_transfer_seconds)
                    transfer_bytes.add_sample("pdserve_kv_transfer_bytes_total", named, stats.kv_transfer_bytes)
                    transfer_failures.add_sample("pdserve_kv_transfer_failures_total", named, stats.kv_transfer_failures)
        for (model, role), n in live.items():
            instances.add_metric([model, role], n)
        for name, status in self.manager.index():
            states.add_metric([name, status.version, status.state], 1)
        supervisor = getattr(self.manager, "supervisor", None)
        for counts, metric, sample in ((getattr(supervisor, "role_switches", {}), switches, "pdserve_role_switches_total"),
                                       (getattr(supervisor, "role_switches_abandoned", {}), abandoned,
                                        "pdserve_role_switches_abandoned_total")):
            for key, n in counts.items():
                metric.add_sample(sample, dict(zip(("model", "version", "instance", "from_role", "to_role"), key)), n)
        if self.registry is not None:
            counts = defaultdict(int)
            for record in self.registry.records.values():
                counts[(record.model, record.role, record.state)] += 1
            for labels, n in counts.items():
                cluster.add_metric(list(labels), n)
            outages.add_sample("pdserve_etcd_outages_total", {}, self.registry.outages)
        yield from (running, waiting, kv, preempt, transfer, transfer_bytes, transfer_failures, keepalive,
                    cache_queries, cache_hits, hit_ratio, cached_blocks, tier_hits, tier_saved, tier_loaded,
                    tier_seconds, tier_used, tier_capacity, instances, cluster, outages, states,
                    roles, switches, abandoned)


class Metrics:
    def __init__(self, manager, registry=None, plane: LoadPlane | None = None):
        self.manager = manager
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds", "Mean time per output token after the first, per request",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.first_response = Histogram("nv_inference_first_response_histogram_ms", "Time to the first response in ms",
                                        labels, buckets=FIRST_RESPONSE_MS_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Generated tokens", labels, registry=self.registry)
        self.handoff_failures = Counter("pdserve_kv_handoff_failures", "Requests that failed in the KV handoff, by cause",
                                        ["model", "version", "cause"], registry=self.registry)
        self.migrations = Counter("pdserve_request_migrations", "Requests moved to another engine mid-stream "
                                  "(migration_limit)", labels, registry=self.registry)
        self.prefills = Counter("pdserve_prefills", "Prompts sent to an engine, by where they are computed: local (the "
                                "engine that generates) or remote (a PREFILL engine, KV handed off)",
                                [*labels, "where"], registry=self.registry)
        self.triton = TritonCounters()
        self.registry.register(self.triton)
        self.registry.register(EngineCollector(manager, registry, plane))

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def request_started(self, key: tuple[str, str]) -> None:
        if key not in self.triton.pending:  # failure series exist (at 0) before the first failure
            for reason in FAILURE_LABELS:
                self.triton.failure[(*key, reason)] += 0
            for cause in HANDOFF_LABELS:
                self.handoff_failures.labels(*key, cause)
            self.migrations.labels(*key)
        self.triton.pending[key] += 1

    def prefill_routed(self, key: tuple[str, str], remote: bool) -> None:
        self.prefills.labels(*key, "remote" if remote else "local").inc()

    def migrated(self, key: tuple[str, str]) -> None:
        self.migrations.labels(*key).inc()

    def request_finished(self, key, failure: Cause | None, start: float, first: float | None,
                         n_in: int, n_out: int) -> None:
        now = time.monotonic()
        self.triton.pending[key] -= 1
        self.triton.duration_us[key] += int((now - start) * 1e6)
        if failure is not None:
            self.triton.failure[(*key, failure.failure_label)] += 1
            if failure.handoff_label:
                self.handoff_failures.labels(*key, failure.handoff_label).inc()
            return
        self.triton.success[key] += 1
        self.triton.count[key] += 1
        self.e2e.labels(*key).observe(now - start)
        self.prompt_tokens.labels(*key).inc(n_in)
        self.generation_tokens.labels(*key).inc(n_out)
        if first is not None:
            self.triton.queue_us[key] += int((first - start) * 1e6)
            self.ttft.labels(*key).observe(first - start)
            self.first_response.labels(*key).observe((first - start) * 1000)
            if n_out > 1:
                self.tpot.labels(*key).observe((now - first) / (n_out - 1))
