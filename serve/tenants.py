"""Tenants and their API keys: the file the operator writes (``dispider-serve --tenants FILE``).

A request names its tenant by its API key, sent as the OpenAI SDK sends it (``Authorization: Bearer KEY``);
a WebSocket may instead put it in the handshake URL (``/v1/sessions/{id}/ws?api_key=KEY``), since browsers
cannot set headers on one (the server redacts ``api_key=`` from its logs). ``/health``, ``/metrics`` and
``/openapi.json`` stay open: they carry no tenant's data beyond tenant names in metric labels.

Without ``--tenants`` the server runs *open*, for local use: no key is asked for and every request belongs to
the tenant ``default`` (no quotas). With a tenants file every tenant needs at least one key, so open mode is
off whenever a key is configured.

The file is TOML (``.toml``) or JSON (anything else), a list of tenants::

    # tenants.toml
    [[tenants]]
    name = "acme"                      # [A-Za-z0-9_.-]{1,64}; shows in metric labels and logs
    keys = ["sha256:9f86d08..."]       # hashes of the tenant's keys, never the keys: `dispider-serve hash-key`
    priority = 0                       # reaction queue order under --scheduling-policy priority: lower first
    max_sessions = 8                   # live sessions + chat completions open at once
    frames_per_second = 30             # frames received per second, over all its sessions (token bucket)
    frame_burst = 120                  # the bucket's size (default: 4 s worth of frames_per_second)
    tokens_per_minute = 20000          # reaction tokens generated per minute (token bucket of a minute's worth)

    [[tenants]]
    name = "lab"
    keys = ["sha256:..."]              # no quota given: unlimited (the server's capacity still applies)

and in JSON ``{"tenants": [{"name": "acme", "keys": ["sha256:..."], "max_sessions": 8, ...}]}``.

A key is stored as ``sha256:<hex of SHA-256 of the key's UTF-8 bytes>``; keys are long random strings
(``hash-key`` without a key makes one), so a plain hash is enough to keep them out of the file::

    dispider-serve hash-key                  # a new random key and its hash
    dispider-serve hash-key KEY              # the hash of KEY  (also: python -m serve.tenants hash-key KEY)
    echo -n KEY | dispider-serve hash-key -  # the same, keeping the key out of the shell history
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

OPEN_TENANT_NAME = "default"
KEY_SCHEME = "sha256"
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_BURST_SECONDS = 4.0  # frame_burst, when not given: this many seconds of frames_per_second
QUOTA_FIELDS = ("max_sessions", "frames_per_second", "frame_burst", "tokens_per_minute")
TENANT_FIELDS = {"name", "keys", "priority", *QUOTA_FIELDS}


class TenantsFileError(ValueError):
    """The tenants file is malformed; the message names the tenant and field."""


@dataclass(frozen=True)
class TenantQuotas:
    """None: no limit of that kind."""

    max_sessions: int | None = None
    frames_per_second: float | None = None
    frame_burst: float | None = None
    tokens_per_minute: int | None = None

    @property
    def frame_bucket_size(self) -> float | None:
        if self.frames_per_second is None:
            return None
        return self.frame_burst if self.frame_burst is not None else self.frames_per_second * DEFAULT_BURST_SECONDS


@dataclass(frozen=True)
class Tenant:
    name: str
    priority: int = 0  # vLLM's priority: lower is scheduled first
    quotas: TenantQuotas = TenantQuotas()


OPEN_TENANT = Tenant(OPEN_TENANT_NAME)


def hash_key(key: str) -> str:
    return f"{KEY_SCHEME}:{hashlib.sha256(key.encode()).hexdigest()}"


def new_key() -> str:
    return "dsp-" + secrets.token_urlsafe(32)


class TenantDirectory:
    """Who a key belongs to. ``open`` when no key is configured: every request is the ``default`` tenant."""

    def __init__(self, tenants: Iterable[Tenant] = (), key_hashes: Mapping[str, str] | None = None) -> None:
        self.tenants = {tenant.name: tenant for tenant in tenants}
        self._owner_by_hash = dict(key_hashes or {})  # "sha256:<hex>" -> tenant name

    @property
    def open(self) -> bool:
        return not self._owner_by_hash

    def authenticate(self, key: str | None) -> Tenant | None:
        """The key's tenant, or None for a missing or unknown key (always the open tenant in open mode)."""
        if self.open:
            return OPEN_TENANT
        if not key:
            return None
        # Looked up by hash: comparing hashes of the presented key leaks nothing usable about a stored key.
        owner = self._owner_by_hash.get(hash_key(key))
        return self.tenants[owner] if owner is not None else None


# ---- the file ---------------------------------------------------------------------------------------------
def load_tenants(path: str | Path) -> TenantDirectory:
    path = Path(path)
    try:
        text = path.read_text()
        document = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise TenantsFileError(f"{path}: {error}") from None
    return parse_tenants(document, source=str(path))


def parse_tenants(document: object, source: str = "tenants file") -> TenantDirectory:
    entries = document.get("tenants") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TenantsFileError(f"{source}: expected a non-empty list 'tenants'")
    tenants: list[Tenant] = []
    owners: dict[str, str] = {}
    for index, entry in enumerate(entries):
        tenant, hashes = _parse_tenant(entry, f"{source}: tenants[{index}]")
        if any(t.name == tenant.name for t in tenants):
            raise TenantsFileError(f"{source}: tenant {tenant.name!r} appears twice")
        for key_hash in hashes:
            if key_hash in owners:
                raise TenantsFileError(f"{source}: a key of {tenant.name!r} is also a key of {owners[key_hash]!r}")
            owners[key_hash] = tenant.name
        tenants.append(tenant)
    return TenantDirectory(tenants, owners)


def _parse_tenant(entry: object, where: str) -> tuple[Tenant, list[str]]:
    if not isinstance(entry, dict):
        raise TenantsFileError(f"{where}: a tenant is a table/object")
    unknown = set(entry) - TENANT_FIELDS
    if unknown:
        raise TenantsFileError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(TENANT_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise TenantsFileError(f"{where}: 'name' must match {TENANT_NAME.pattern}")
    where = f"{where} ({name})"
    priority = entry.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TenantsFileError(f"{where}: 'priority' must be an integer")
    quotas = TenantQuotas(
        max_sessions=_positive(entry, "max_sessions", where, integer=True),
        frames_per_second=_positive(entry, "frames_per_second", where),
        frame_burst=_positive(entry, "frame_burst", where),
        tokens_per_minute=_positive(entry, "tokens_per_minute", where, integer=True),
    )
    if quotas.frame_burst is not None and quotas.frames_per_second is None:
        raise TenantsFileError(f"{where}: 'frame_burst' needs 'frames_per_second'")
    return Tenant(name, priority, quotas), _key_hashes(entry.get("keys"), where)


def _positive(entry: dict, field: str, where: str, *, integer: bool = False):
    value = entry.get(field)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise TenantsFileError(f"{where}: '{field}' must be a {'whole ' if integer else ''}number > 0")
    return value if integer else float(value)


def _key_hashes(keys: object, where: str) -> list[str]:
    if not isinstance(keys, list) or not keys:
        raise TenantsFileError(f"{where}: 'keys' must be a non-empty list of {KEY_SCHEME}:<hex> hashes")
    hashes = []
    for key in keys:
        scheme, _, digest = key.partition(":") if isinstance(key, str) else ("", "", "")
        if scheme != KEY_SCHEME or not re.fullmatch(r"[0-9a-f]{64}", digest.lower()):
            raise TenantsFileError(
                f"{where}: a key is stored as '{KEY_SCHEME}:<64 hex digits>' (from `dispider-serve hash-key`), "
                "never as the key itself"
            )
        hashes.append(f"{KEY_SCHEME}:{digest.lower()}")
    return hashes


# ---- the CLI ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dispider-serve hash-key", description="Print the hash of an API key, for the tenants file."
    )
    parser.add_argument("command", choices=["hash-key"])
    parser.add_argument("key", nargs="?", help="the key; '-' reads it from stdin; none makes a new random key")
    args = parser.parse_args(argv)
    if args.key is None:
        key = new_key()
        print(f"key:  {key}\nhash: {hash_key(key)}")
        return
    key = sys.stdin.read().strip() if args.key == "-" else args.key
    if not key:
        parser.error("the key is empty")
    print(hash_key(key))


if __name__ == "__main__":
    main()
