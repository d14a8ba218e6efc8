"""Prometheus metrics served at /metrics."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "sam3_http_requests_total", "HTTP requests by route and status", ["route", "method", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "sam3_http_request_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_SECONDS = Histogram(
    "sam3_model_forward_seconds", "Model forward time by stage (encode, segment, detect)", ["stage"],
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CACHE_EVENTS = Counter("sam3_encoding_cache_total", "Image encoding cache lookups", ["result"], registry=REGISTRY)
CACHE_BYTES = Gauge("sam3_encoding_cache_bytes", "Bytes held by cached image encodings", registry=REGISTRY)
MODEL_LOADED = Gauge("sam3_model_loaded", "1 once the model is loaded", registry=REGISTRY)
