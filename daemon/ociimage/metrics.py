"""Prometheus metrics of one daemon (served on the address set by [daemon] metrics)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.conversions = Counter("ociimage_conversions_total", "Images converted by this daemon",
                                   ["result"], registry=r)
        self.cache_hits = Counter("ociimage_cache_hits_total",
                                  "Pulls answered from the shared cache", registry=r)
        self.cache_misses = Counter("ociimage_cache_misses_total",
                                    "Pulls that needed a conversion (here or on another node)", registry=r)
        self.registry_bytes = Counter("ociimage_registry_bytes_total",
                                      "Bytes of layers pulled from registries", registry=r)
        self.conversion_seconds = Histogram(
            "ociimage_conversion_seconds", "Wall time of one conversion", registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
        self.active_mounts = Gauge("ociimage_active_mounts", "Images loop-mounted on this node",
                                   registry=r)
        self.active_leases = Gauge("ociimage_active_leases", "Leases this node holds", registry=r)
        self.active_steps = Gauge("ociimage_active_steps", "Step containers on this node", registry=r)

    def bind(self, mounts: Callable[[], int], leases: Callable[[], int], steps: Callable[[], int]) -> None:
        self.active_mounts.set_function(mounts)
        self.active_leases.set_function(leases)
        self.active_steps.set_function(steps)

    def serve(self, listen: Optional[Tuple[str, int]]) -> None:
        if listen:
            try:
                start_http_server(listen[1], addr=listen[0], registry=self.registry)
            except OSError as e:
                from .errors import ConfigError
                raise ConfigError(f"cannot serve metrics on {listen[0]}:{listen[1]}: "
                                  f"{e.strerror or e}") from None
