"""Constants that more than one layer reads (engines fill these buckets, the front end exports them)."""

# Upper bounds (seconds) of the KV handoff write-time histogram: engines count into them,
# the front end's /metrics exports them as pdserve_kv_transfer_seconds.
KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The largest gRPC message any pdserve server or channel takes: the front end, the engines and
# the channels between them agree, so a request the front end accepts always reaches its engine.
MAX_MESSAGE_BYTES = 64 * 2**20
GRPC_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]

# Request limits checked at the front end, before any work is queued.
MAX_PROMPT_BYTES = 4 * 2**20      # text_input; longer prompts cannot fit any model's max_model_len anyway
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
