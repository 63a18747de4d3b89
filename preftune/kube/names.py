"""Kubernetes name rules, checked when the run config (or a command line) is validated.

Kubernetes has three name formats; which one applies depends on the object:

- DNS-1035 label (``[a-z]([-a-z0-9]*[a-z0-9])?``, at most 63): names that become Services or
  hostnames — a TrainJob (the Trainer's CRD enforces it: its JobSet, Jobs and headless Service
  take the name), so the TrainJob name and its prefix;
- DNS-1123 label (``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63): namespaces, container names;
- DNS-1123 subdomain (labels joined by ``.``, at most 253): Secrets, ServiceAccounts,
  PersistentVolumeClaims, (Cluster)TrainingRuntimes.

Each check returns the name or raises ValueError saying what was expected (pydantic turns it into a
ConfigError naming the field; the CLI exits 2).
"""

from __future__ import annotations

import re

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _checked(name: str, what: str, pattern: re.Pattern[str], max_len: int, kind: str, rule: str) -> str:
    if not isinstance(name, str) or len(name) > max_len or not pattern.match(name):
        raise ValueError(f"{what} {name!r} is not a valid Kubernetes name ({kind}): {rule}")
    return name


def dns1035_label(name: str, what: str = "name", max_len: int = 63) -> str:
    """``name`` if it is a DNS-1035 label of at most ``max_len`` characters."""
    return _checked(
        name,
        what,
        DNS1035_LABEL,
        max_len,
        "DNS-1035 label",
        f"at most {max_len} lowercase letters, digits and '-', starting with a letter and "
        "ending with a letter or digit",
    )


def dns1123_label(name: str, what: str = "name") -> str:
    """``name`` if it is a DNS-1123 label (at most 63)."""
    return _checked(
        name,
        what,
        DNS1123_LABEL,
        63,
        "DNS-1123 label",
        "at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
    )


def dns1123_subdomain(name: str, what: str = "name") -> str:
    """``name`` if it is a DNS-1123 subdomain (at most 253)."""
    return _checked(
        name,
        what,
        DNS1123_SUBDOMAIN,
        253,
        "DNS-1123 subdomain",
        "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253",
    )
