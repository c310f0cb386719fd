"""The API's pod operations (`pod_add`, `pod_del`: the CNI plugin and `podrouter pod`): the request
(untrusted) validated like a config pod, the registry changed and the daemon reconciled, under its
lock, before the answer. The daemon is taken as ports.ServesPods describes it."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from podrouter import api as apimod
from podrouter import config as configmod
from podrouter.ports import ServesPods

log = logging.getLogger("podrouter")


def add(d: ServesPods, raw: Any, cni: Any = None) -> dict[str, Any]:
    """Register a pod; an error naming its own routes (a conflict) fails the request."""
    pod, problems, warnings = configmod.pod_from_dict(raw, d.cfg.node.pod_cidrs)
    if pod is None:
        raise apimod.ApiError("; ".join(problems))
    attachment = apimod.cni_attachment(cni)
    with d.lock:
        entry = d.pods.install(pod, "api", raise_errors=True, cni=attachment)
        d._reconcile_locked(f"pod {pod.name} added")
        nets = [str(ipaddress.ip_network(a)) for a in pod.addresses]
        errs = [e for e in d.route_errors if any(n in e for n in nets)]
        if errs:
            raise apimod.ApiError("; ".join(errs))
        return {"pod": entry.status(), "warnings": warnings}


def delete(d: ServesPods, name: Any, container_id: Any = None) -> dict[str, Any]:
    """Remove a pod; with `container_id`, only if it is still that sandbox's."""
    if not isinstance(name, str):
        raise apimod.ApiError("pod_del needs a string 'name'")
    if container_id is not None and not apimod.valid_container_id(container_id):
        raise apimod.ApiError(f"pod_del: container_id {str(container_id)[:80]!r} is not a container ID")
    with d.lock:
        current = d.pods.entries.get(name)
        if container_id is not None and current is not None:
            owner = (current.cni or {}).get("container_id")
            if owner != container_id:
                # a late DEL of a sandbox this pod name has since been given to: not ours to remove
                log.info(
                    "pod_del %s for container %s ignored: the pod belongs to %s",
                    name,
                    container_id,
                    owner or f"the {current.source}",
                )
                return {"removed": None, "kept": name, "owner": owner}
        entry = d.pods.remove(name)
        if entry is None:
            raise apimod.ApiError(f"no pod named {name!r}")
        d._reconcile_locked(f"pod {name} removed")
        return {"removed": name}
