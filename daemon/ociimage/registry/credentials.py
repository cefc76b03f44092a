"""Registry credentials from the files podman and docker write.

Looked up in the order podman (containers/image) uses, then Docker's
config: $REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json,
~/.config/containers/auth.json, ${DOCKER_CONFIG:-~/.docker}/config.json.
The first file that yields credentials for the registry wins. Within one
file, a per-registry credential helper comes first, then the default
credential store, then the inline `auths` entry (the last one is also the
fallback when a desktop credential store is missing on a cluster node, a
common state when ~/.docker was copied from a laptop).

Secrets never reach a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

from ..asuser import read_file_safely
from ..errors import NotFound

if TYPE_CHECKING:
    from ..asuser import Identity

log = logging.getLogger("ociimage.registry")

DOCKER_HUB = "docker.io"
# The key `docker login` writes for Docker Hub, and what helpers expect for it.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
# A docker/podman config is a few KiB; anything near this is not one.
MAX_FILE_BYTES = 1 << 20
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com", DOCKER_HUB}


@dataclass(frozen=True)
class Credentials:
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    #: OAuth2 refresh token (`identitytoken`), exchanged at the token realm.
    identity_token: Optional[str] = field(default=None, repr=False)
    #: A bearer token to send to the registry as is (`registrytoken`).
    registry_token: Optional[str] = field(default=None, repr=False)

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and self.password is not None

    def __bool__(self) -> bool:
        return bool(self.has_basic or self.identity_token or self.registry_token)

    def secrets(self) -> List[str]:
        """The secret strings, so callers can scrub them from text as a last resort."""
        return [s for s in (self.password, self.identity_token, self.registry_token) if s]


def normalize_registry(key: str) -> str:
    """'https://index.docker.io/v1/' -> 'docker.io'; 'https://reg:5000/x' -> 'reg:5000'."""
    key = key.strip()
    for scheme in ("https://", "http://"):
        if key.lower().startswith(scheme):
            key = key[len(scheme):]
            break
    key = key.split("/", 1)[0].lower()
    if key in _HUB_ALIASES:
        return DOCKER_HUB
    return key


def helper_server_url(domain: str) -> str:
    return DOCKER_HUB_SERVER_URL if normalize_registry(domain) == DOCKER_HUB else domain


class CredentialStore:
    """Read-only view of the user's registry credentials.

    home/env default to the current user's; the daemon and tests pass them
    explicitly (credentials of another user must be read with that user's
    home and environment). as_user: the root daemon reading a job user's
    files reads them *as that user* (asuser.read_files), so a symlink to
    another user's file, a FIFO or a huge file gets them nothing.
    """

    def __init__(self, home: Optional[os.PathLike] = None,
                 env: Optional[Mapping[str, str]] = None, helper_timeout: float = 30.0, *,
                 environ: Optional[Mapping[str, str]] = None,
                 allow_helpers: Optional[bool] = None,
                 as_user: Optional["Identity"] = None, max_file_bytes: int = MAX_FILE_BYTES):
        if env is None:
            env = environ  # alias used by callers that say "environ"
        self.env: Mapping[str, str] = dict(os.environ if env is None else env)
        # A root daemon reading a user's config must not run programs that
        # config names (with the user's HOME, as root): helpers are off for
        # root unless asked for.
        self.allow_helpers = (os.geteuid() != 0) if allow_helpers is None else allow_helpers
        if home is None:
            home = self.env.get("HOME") or Path.home()
        self.home = Path(home)
        self.helper_timeout = helper_timeout
        self.as_user = as_user
        self.max_file_bytes = max_file_bytes
        if as_user is not None:
            self.allow_helpers = False  # never a user's program, whoever runs us
        self._loaded: Optional[Dict[Path, Optional[dict]]] = None

    def files(self) -> List[Path]:
        """The files consulted, in order (whether or not they exist)."""
        out: List[Path] = []
        if self.env.get("REGISTRY_AUTH_FILE"):
            out.append(Path(self.env["REGISTRY_AUTH_FILE"]))
        if self.env.get("XDG_RUNTIME_DIR"):
            out.append(Path(self.env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
        out.append(self.home / ".config" / "containers" / "auth.json")
        docker_dir = Path(self.env["DOCKER_CONFIG"]) if self.env.get("DOCKER_CONFIG") \
            else self.home / ".docker"
        out.append(docker_dir / "config.json")
        return out

    def get(self, domain: str) -> Optional[Credentials]:
        domain = normalize_registry(domain)
        if self._loaded is None:
            # all files at once: for another user that is one helper process
            self._loaded = self._load_all(self.files())
        for path in self.files():
            config = self._loaded.get(path)
            if config is None:
                continue
            creds = self._from_config(config, domain, path)
            if creds:
                log.debug("using credentials for %s from %s", domain, path)
                return creds
        log.debug("no credentials for %s", domain)
        return None

    def _load_all(self, paths: List[Path]) -> Dict[Path, Optional[dict]]:
        if self.as_user is not None:
            from ..asuser import read_files
            raw = read_files(self.as_user, [str(p) for p in paths], limit=self.max_file_bytes)
        else:
            raw = []
            for p in paths:
                try:
                    raw.append(read_file_safely(str(p), self.max_file_bytes))
                except OSError as e:
                    raw.append(e)
        return {p: self._parse(p, r) for p, r in zip(paths, raw)}

    @staticmethod
    def _parse(path: Path, raw) -> Optional[dict]:
        if not isinstance(raw, bytes):
            if not isinstance(raw, (FileNotFoundError, NotFound)):
                # the content may hold secrets: name the error only
                log.debug("ignoring unreadable credentials file %s (%s)", path, raw)
            return None
        try:
            data = json.loads(raw)
        except ValueError as e:
            log.debug("ignoring credentials file %s (%s)", path, type(e).__name__)
            return None
        if not isinstance(data, dict):
            log.debug("ignoring credentials file %s: not a JSON object", path)
            return None
        return data

    def _from_config(self, config: dict, domain: str, path: Path) -> Optional[Credentials]:
        helpers = config.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if isinstance(key, str) and isinstance(helper, str) and helper \
                        and normalize_registry(key) == domain:
                    creds = self._run_helper(helper, domain)
                    if creds:
                        return creds
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            creds = self._run_helper(store, domain)
            if creds:
                return creds
        auths = config.get("auths")
        if isinstance(auths, dict):
            # an exact key beats one that only normalises to the domain
            entries = sorted(((k, v) for k, v in auths.items() if isinstance(k, str)),
                             key=lambda kv: kv[0] != domain)
            for key, entry in entries:
                if normalize_registry(key) == domain and isinstance(entry, dict):
                    creds = self._from_auth_entry(entry, domain, path)
                    if creds:
                        return creds
        return None

    @staticmethod
    def _from_auth_entry(entry: dict, domain: str, path: Path) -> Optional[Credentials]:
        username = entry.get("username") if isinstance(entry.get("username"), str) else None
        password = entry.get("password") if isinstance(entry.get("password"), str) else None
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                decoded = base64.b64decode(encoded, validate=False).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                log.debug("ignoring malformed 'auth' value for %s in %s", domain, path)
                decoded = None
            if decoded is not None:
                if ":" in decoded:
                    username, password = decoded.split(":", 1)
                else:
                    log.debug("ignoring 'auth' value without ':' for %s in %s", domain, path)
        identity = entry.get("identitytoken") if isinstance(entry.get("identitytoken"), str) else None
        regtoken = entry.get("registrytoken") if isinstance(entry.get("registrytoken"), str) else None
        creds = Credentials(username=username or None, password=password,
                            identity_token=identity or None, registry_token=regtoken or None)
        return creds if creds else None

    def _run_helper(self, helper: str, domain: str) -> Optional[Credentials]:
        if not self.allow_helpers:
            log.debug("not running credential helper for %s: helpers are disabled", domain)
            return None
        if "/" in helper or helper.startswith("."):
            log.debug("ignoring credential helper with a path in its name")
            return None
        program = f"docker-credential-{helper}"
        env = dict(self.env)
        env.setdefault("HOME", str(self.home))
        try:
            proc = subprocess.run([program, "get"], input=helper_server_url(domain).encode(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, timeout=self.helper_timeout, check=False)
        except FileNotFoundError:
            log.debug("credential helper %s not found on PATH", program)
            return None
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("credential helper %s failed to run (%s)", program, type(e).__name__)
            return None
        if proc.returncode != 0:
            # stdout/stderr may echo secrets or be noisy: log only the status
            log.debug("credential helper %s has no credentials for %s (exit status %d)",
                      program, domain, proc.returncode)
            return None
        try:
            data = json.loads(proc.stdout.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.debug("credential helper %s printed something that is not JSON", program)
            return None
        if not isinstance(data, dict):
            return None
        username, secret = data.get("Username"), data.get("Secret")
        if not isinstance(secret, str) or not secret:
            return None
        if username == "<token>":
            # docker-credential-helpers' convention for an identity token
            return Credentials(identity_token=secret)
        if not isinstance(username, str) or not username:
            return None
        return Credentials(username=username, password=secret)


class StaticCredentials:
    """Fixed credentials per registry (tests, or credentials passed over the API)."""

    def __init__(self, entries: Optional[Dict[str, Credentials]] = None):
        self._entries = {normalize_registry(k): v for k, v in (entries or {}).items()}

    def get(self, domain: str) -> Optional[Credentials]:
        return self._entries.get(normalize_registry(domain))
