"""The Pod security checker every test that renders a pod uses: the chart's pods and the TrainJob's nodes.

:func:`restricted_problems` is the restricted Pod Security Standard (Kubernetes' own list: no host
namespaces, only the allowed volume types, non-root, no privilege escalation, capabilities dropped,
a seccomp profile) plus a read-only root filesystem with a writable emptyDir at /tmp.
"""

from __future__ import annotations

from typing import Any

#: Volume types the restricted Pod Security Standard allows.
PSS_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_problems(where: str, spec: dict[str, Any]) -> list[str]:
    """What in a Pod spec breaks the restricted Pod Security Standard (or our read-only-root rule)."""
    p: list[str] = []
    psc = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            p.append(f"{where}: {flag}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        kinds = set(v) - {"name"}
        if not kinds <= PSS_VOLUME_TYPES:
            p.append(f"{where}: volume {v['name']} of type {kinds} is not allowed by the restricted standard")
    if psc.get("runAsUser") == 0:
        p.append(f"{where}: pod runs as UID 0")
    for c in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            p.append(f"{cw}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if uid == 0:
            p.append(f"{cw}: runs as UID 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            p.append(f"{cw}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            p.append(f"{cw}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            p.append(f"{cw}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            p.append(f"{cw}: adds capabilities {caps['add']}")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            p.append(f"{cw}: seccompProfile is {seccomp}")
        if sc.get("readOnlyRootFilesystem") is not True:
            p.append(f"{cw}: root filesystem is writable")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        tmp = mounts.get("/tmp")
        if not tmp or "emptyDir" not in volumes.get(tmp["name"], {}):
            p.append(f"{cw}: no writable emptyDir at /tmp")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                p.append(f"{cw}: mounts undefined volume {m['name']}")
    return p
