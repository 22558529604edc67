"""Constants that more than one layer reads (engines fill these buckets, the front end exports them)."""

# Upper bounds (seconds) of the KV handoff write-time histogram: engines count into them,
# the front end's /metrics exports them as pdserve_kv_transfer_seconds.
KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
