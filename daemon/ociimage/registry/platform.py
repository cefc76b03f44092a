"""Platforms (os/architecture/variant) and choosing a manifest from an index.

Names follow Go's GOOS/GOARCH, as image indexes do. Variants are compared
the way containerd does: a missing variant means the architecture's
baseline (arm64 -> v8, arm -> v7, amd64 -> v1), and a host may run older
variants of its own architecture (arm/v7 runs v6 and v5, amd64/v3 runs v2
and v1), preferring the closest one.
"""

from __future__ import annotations

import os as _os
import platform as _pyplatform
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, TypeVar

from ..errors import InvalidArgument, PlatformNotFound

_ARCH_ALIASES = {
    "x86_64": ("amd64", None), "x86-64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", None),
    "armhf": ("arm", "v7"), "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "armv5": ("arm", "v5"),
    "arm": ("arm", None),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None),
    "i686": ("386", None), "386": ("386", None),
    "ppc64le": ("ppc64le", None), "ppc64": ("ppc64", None),
    "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    "mips64": ("mips64", None), "mips64el": ("mips64le", None),
    "mips64le": ("mips64le", None), "loongarch64": ("loong64", None),
    "loong64": ("loong64", None),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
# Ordered newest first: what a host of a given variant can also run.
_VARIANT_LADDERS = {
    "arm": ["v8", "v7", "v6", "v5"],
    "amd64": ["v4", "v3", "v2", "v1"],
    "arm64": ["v8"],
}
_KNOWN_OS = {"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris",
             "illumos", "aix", "plan9", "dragonfly", "android", "ios", "js", "wasip1"}


def _normalize_arch(arch: str, variant: Optional[str]) -> Tuple[str, Optional[str]]:
    arch = arch.strip().lower()
    variant = variant.strip().lower() if variant else None
    mapped, implied = _ARCH_ALIASES.get(arch, (arch, None))
    if variant is None:
        variant = implied
    if mapped == "arm64" and variant in ("8", "v8.0"):
        variant = "v8"
    if mapped == "arm" and variant and not variant.startswith("v"):
        variant = "v" + variant
    return mapped, variant or None


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return out + f"/{self.variant}" if self.variant else out

    def normalized(self) -> "Platform":
        arch, variant = _normalize_arch(self.architecture, self.variant)
        return Platform(self.os.strip().lower(), arch, variant)

    def effective_variant(self) -> Optional[str]:
        p = self.normalized()
        return p.variant or _DEFAULT_VARIANT.get(p.architecture)

    @classmethod
    def from_dict(cls, d: dict) -> Optional["Platform"]:
        """From an index entry's "platform" object; None when absent or malformed."""
        if not isinstance(d, dict):
            return None
        os_, arch, variant = d.get("os"), d.get("architecture"), d.get("variant")
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        if variant is not None and not isinstance(variant, str):
            variant = None
        return cls(os_, arch, variant or None)

    def to_dict(self) -> dict:
        d = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            d["variant"] = self.variant
        return d

    def matches(self, other: "Platform") -> bool:
        """Exactly the same platform, after normalisation (arm64 == arm64/v8)."""
        a, b = self.normalized(), other.normalized()
        return (a.os == b.os and a.architecture == b.architecture
                and self.effective_variant() == other.effective_variant())

    def can_run(self, other: "Platform") -> bool:
        """Whether a host of this platform runs images built for `other`."""
        return self._rank(other) is not None

    def _rank(self, other: "Platform") -> Optional[int]:
        """0 for an exact match, n for the n-th older variant, None if unusable."""
        a, b = self.normalized(), other.normalized()
        if a.os != b.os or a.architecture != b.architecture:
            return None
        mine, theirs = self.effective_variant(), other.effective_variant()
        if mine == theirs:
            return 0
        ladder = _VARIANT_LADDERS.get(a.architecture)
        if not ladder or mine not in ladder or theirs not in ladder:
            return None
        diff = ladder.index(theirs) - ladder.index(mine)
        return diff if diff > 0 else None


def host_platform() -> Platform:
    machine = _pyplatform.machine() or _os.uname().machine
    arch, variant = _normalize_arch(machine, None)
    if arch == "arm64":
        variant = "v8"
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    """'linux/arm64/v8', 'linux/amd64', 'arm64' (os linux) or 'linux' (host arch)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("invalid platform: it is empty (expected os/arch[/variant], "
                              "e.g. linux/amd64)")
    parts = text.strip().split("/")
    if any(not p or not p.replace("_", "").replace("-", "").replace(".", "").isalnum()
           for p in parts) or len(parts) > 3:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise InvalidArgument(f"invalid platform '{shown}': expected os/arch[/variant], "
                              f"e.g. linux/arm64/v8")
    if len(parts) == 1:
        word = parts[0].lower()
        if word in _KNOWN_OS:
            host = host_platform()
            return Platform(word, host.architecture, host.variant)
        arch, variant = _normalize_arch(word, None)
        return Platform("linux", arch, variant)
    os_ = parts[0].lower()
    arch, variant = _normalize_arch(parts[1], parts[2] if len(parts) == 3 else None)
    return Platform(os_, arch, variant)


T = TypeVar("T")


def select_platform(want: Platform, candidates: Sequence[Tuple[Optional[Platform], T]]) -> T:
    """Pick the best candidate for `want` (exact first, then the closest older variant).

    candidates: (platform, item) pairs, e.g. from an index's manifests, in
    index order; among equally good candidates the first one wins, as in
    containerd. Raises PlatformNotFound naming what is available.
    """
    best: Optional[Tuple[int, int]] = None
    chosen = None
    for pos, (plat, item) in enumerate(candidates):
        if plat is None:
            continue
        rank = want._rank(plat)
        if rank is None:
            continue
        if best is None or (rank, pos) < best:
            best, chosen = (rank, pos), item
    if best is None:
        raise PlatformNotFound(f"no image for platform {want}; available: "
                               f"{', '.join(available_platforms(p for p, _ in candidates)) or 'none'}")
    return chosen  # type: ignore[return-value]


def available_platforms(platforms: Iterable[Optional[Platform]]) -> List[str]:
    """Printable platform names, without the 'unknown/unknown' of attestation entries."""
    out: List[str] = []
    for p in platforms:
        if p is None or p.os == "unknown" or p.architecture == "unknown":
            continue
        s = str(p)
        if s not in out:
            out.append(s)
    return out
