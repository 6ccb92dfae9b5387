"""Where ``agentpolicy serve`` may listen: loopback by default, the network only over TLS.

Bearer tokens and session cookies cross the network on every request. On a
loopback address they never leave the machine; on any other address they
must travel inside TLS: the service's own (``--tls-cert`` and
``--tls-key``), or a TLS-terminating proxy in front that the operator
declares (``--behind-tls-proxy``). ``--insecure-bind`` serves plain HTTP on
the network anyway, for a private network the operator trusts.
"""

from __future__ import annotations

import ipaddress

__all__ = ["LOOPBACK_NAMES", "bind_problem", "is_loopback"]

LOOPBACK_NAMES = ("localhost",)
"""Host names taken as loopback without resolving them (any other name is not)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``.

    Other names are not resolved: a name may point elsewhere tomorrow, so
    it counts as the network.
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(
    host: str, *, tls: bool, behind_tls_proxy: bool, insecure_bind: bool
) -> str | None:
    """Why serving on ``host`` is refused (one line), or ``None`` when it is allowed."""
    if is_loopback(host) or tls or behind_tls_proxy or insecure_bind:
        return None
    return (
        f"refusing to serve plain HTTP on {host}, which is not a loopback address: tokens and "
        "session cookies would cross the network unencrypted; give --tls-cert and --tls-key, "
        "or --behind-tls-proxy when a TLS-terminating proxy is in front, or --insecure-bind"
    )
