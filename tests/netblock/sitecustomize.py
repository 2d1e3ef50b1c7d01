"""Put this folder on PYTHONPATH to forbid a Python process any network but loopback.

Every attempt is refused with an OSError and logged to $FEDSWEEP_NETLOG (if set), so a test can
assert that a job never tried to reach the network.
"""

import os
import socket

_LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def _log(what):
    path = os.environ.get("FEDSWEEP_NETLOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


def _host(address):
    return str(address[0]) if isinstance(address, tuple) else str(address)


def connect(self, address):
    if self.family == socket.AF_UNIX or _host(address).startswith(_LOOPBACK):
        return _connect(self, address)
    _log(f"connect {address!r}")
    raise OSError(f"network blocked by tests/netblock: connect {address!r}")


def getaddrinfo(host, *args, **kwargs):
    if host is None or str(host).startswith(_LOOPBACK):
        return _getaddrinfo(host, *args, **kwargs)
    _log(f"getaddrinfo {host!r}")
    raise socket.gaierror(f"network blocked by tests/netblock: {host!r}")


socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
