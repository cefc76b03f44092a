"""Image references, parsed and normalised exactly like Docker does.

The grammar is the one of github.com/distribution/reference, including the
rule that decides whether the first path component is a registry host:
it is one when it contains '.' or ':', is 'localhost', or has uppercase
letters. Otherwise the image lives on Docker Hub, and a single-component
Hub name lives under 'library/'. Users type these references in sbatch
scripts; accepting exactly what `docker pull` accepts avoids surprises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

from .digests import is_valid_digest
from .errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST_GENERIC = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}"

_PATH_RE = re.compile(rf"^{_PATH}$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(rf"^{_TAG}$", re.ASCII)
_DIGEST_GENERIC_RE = re.compile(rf"^{_DIGEST_GENERIC}$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")


def _show(text: str) -> str:
    """text as it may appear in a message: every control or non-printable character
    escaped (\\n, \\x1b, ...), so a hostile reference can neither start a line of its own
    nor send an escape sequence to the user's terminal."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def repository(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        """domain/path, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def identifier(self) -> str:
        """What to put after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> "Reference":
        if not is_valid_digest(digest):
            raise InvalidReference(f"invalid digest '{_show(str(digest))}': expected "
                                   f"sha256:<64 lowercase hex> or sha512:<128 lowercase hex>")
        return replace(self, digest=digest)

    def with_tag(self, tag: Optional[str]) -> "Reference":
        if tag is not None and not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag '{_show(tag)}'")
        return replace(self, tag=tag)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def familiar(self) -> str:
        """The short form Docker prints: 'ubuntu:24.04', 'me/app', 'reg:5000/x:1'."""
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            if name.startswith(OFFICIAL_REPO_PREFIX) and name.count("/") == 1:
                name = name[len(OFFICIAL_REPO_PREFIX):]
        else:
            name = self.name
        if self.tag:
            name += ":" + self.tag
        if self.digest:
            name += "@" + self.digest
        return name


def _split_domain(name: str):
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i < 0 or ("." not in first and ":" not in first and first != "localhost"
                 and first.lower() == first):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, name[i + 1:]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(text: str, *, default_tag: Optional[str] = DEFAULT_TAG) -> Reference:
    """Parse a Docker-style image reference into its normalised form.

    When neither tag nor digest is given the tag is `default_tag` ("latest").
    """
    if not isinstance(text, str):
        raise InvalidReference("invalid image reference: expected a string")
    if len(text) > 4 * NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"invalid image reference '{_show(text)}': it is too long")
    if not text:
        raise InvalidReference("invalid image reference: it is empty")
    if any(c.isspace() for c in text):
        raise InvalidReference(f"invalid image reference '{_show(text)}': it contains whitespace")
    if not text.isprintable() or not text.isascii():
        raise InvalidReference(f"invalid image reference '{_show(text)}': "
                               f"it contains non-ASCII or control characters")
    if _HEX64_RE.fullmatch(text):
        # Docker refuses these: they could be an image ID as well as a Hub name.
        raise InvalidReference(f"invalid image reference '{_show(text)}': a 64-character hex "
                               f"string is ambiguous; use sha256:<hex> after '@'")

    rest, digest = text, None
    if "@" in text:
        rest, digest = text.split("@", 1)
        if not _DIGEST_GENERIC_RE.fullmatch(digest):
            raise InvalidReference(f"invalid image reference '{_show(text)}': "
                                   f"invalid digest '{_show(digest)}'")
        if not is_valid_digest(digest):
            raise InvalidReference(f"invalid image reference '{_show(text)}': unsupported digest "
                                   f"'{_show(digest)}' (expected sha256:<64 lowercase hex> "
                                   f"or sha512:<128 lowercase hex>)")
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid image reference '{_show(text)}': invalid tag "
                                   f"'{_show(tag)}' (letters, digits, '_', '.', '-'; "
                                   f"at most 128; not starting with '.' or '-')")
    if not rest:
        raise InvalidReference(f"invalid image reference '{_show(text)}': the name is empty")

    domain, path = _split_domain(rest)
    if domain != DEFAULT_DOMAIN or rest.startswith(DEFAULT_DOMAIN + "/") \
            or rest.startswith(LEGACY_DEFAULT_DOMAIN + "/"):
        given_domain = rest.split("/", 1)[0]
        if not _DOMAIN_RE.fullmatch(given_domain):
            raise InvalidReference(f"invalid image reference '{_show(text)}': invalid registry "
                                   f"host '{_show(given_domain)}'")
    if path.lower() != path:
        raise InvalidReference(f"invalid image reference '{_show(text)}': the repository name "
                               f"must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise InvalidReference(f"invalid image reference '{_show(text)}': invalid repository "
                               f"name '{_show(path)}' (lowercase letters, digits and "
                               f"separators '.', '_', '__', '-' between '/'-separated parts)")
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"invalid image reference '{_show(text)}': the repository name "
                               f"is longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if tag is None and digest is None:
        tag = default_tag
    return Reference(domain=domain, path=path, tag=tag, digest=digest)
