"""Download an image from an http(s) URL that a remote client named, without letting that client reach
this machine or its network: the host is resolved once, every address it resolves to must be a public
one (no loopback, link-local, private, shared, multicast or reserved address), and the connection goes to
that checked address (so a second DNS answer cannot swap in 127.0.0.1). Redirects are not followed (the
target would need the same checks; clients can send the final URL). Proxies from the environment are not
used. Size and time are bounded."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

MAX_BYTES = 20 * 1024 * 1024
TIMEOUT_S = 10.0


class FetchError(ValueError):
    """The URL was refused or the download failed; the message says why in plain words."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def public_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to; FetchError unless all of them are public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"the host {host!r} cannot be resolved ({e})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses or not all(is_public(a) for a in addresses):
        raise FetchError(f"the host {host!r} is not a public internet address; images are only fetched from "
                         "public hosts")
    return addresses


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:  # TLS with the URL's host name (certificate check and SNI), to the checked IP
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, *, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT_S) -> bytes:
    """The body of a GET to a public http(s) URL, at most `max_bytes`."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise FetchError(f"malformed URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("only http:// and https:// URLs with a host name can be fetched")
    if parts.username or parts.password:
        raise FetchError("URLs with a user name or password are not fetched")
    address = public_addresses(parts.hostname, port)[0]
    conn_type = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = conn_type(parts.hostname, port, address, timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "dsvl-serve", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            raise FetchError(f"the server answered HTTP {response.status} {response.reason}"
                             + (" (redirects are not followed)" if 300 <= response.status < 400 else ""))
        data = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"download failed ({type(e).__name__}: {e})") from None
    finally:
        conn.close()
    if len(data) > max_bytes:
        raise FetchError(f"the download is larger than {max_bytes // 2**20} MiB")
    return data
