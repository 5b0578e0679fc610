"""Issue 16, fault 7: webhooks could reach the platform's own network and read the answer back.

A webhook URL naming 127.0.0.1 (in any spelling), a private or link-local address, the cloud's
metadata address, or Redis's and MLflow's ports was posted to by the worker, and the delivery log
kept 300 characters of the answer. Now the host is resolved and every address checked when the
URL is saved and again before each attempt, the request goes to the address that was checked,
redirects are not followed, and the log keeps the status and the time taken, never the body.

The unit cases need no network; the rest post to real HTTP(S) servers on this machine
(127.0.0.1, and 127.0.0.2 as "another internal service").
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.urls import reverse

from r1platform.notifications import addresses, delivery, services
from r1platform.notifications.delivery import deliver
from r1platform.notifications.models import Delivery, DeliveryStatus, NotificationSettings

SECRET = "redis_version:7.2.4 requirepass=hunter2"  # what an internal service might answer


# -- real servers --------------------------------------------------------------------------------


class Receiver:
    """A real HTTP(S) server on one address that records each request reaching it."""

    def __init__(self, host: str, port: int, answer: Callable[[], tuple[int, str, dict]]) -> None:
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append({"path": self.path, "headers": self.headers, "body": body})
                status, reason, headers = answer()
                payload = SECRET.encode()
                self.send_response(status, reason or None)
                for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]

    def url(self, host: str = "127.0.0.1", path: str = "/hook", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


@contextmanager
def receiver(
    host: str = "127.0.0.1",
    port: int = 0,
    status: int = 200,
    reason: str = "",
    headers: dict | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Receiver]:
    found = Receiver(host, port, lambda: (status, reason, headers or {}))
    if tls is not None:
        found.server.socket = tls.wrap_socket(found.server.socket, server_side=True)
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()
        thread.join(5)


def queued(team, url: str) -> Delivery:
    """A webhook delivery to ``url`` as ``notify`` records it (the URL saved earlier, e.g.
    before an operator narrowed R1_WEBHOOK_ALLOW_NETWORKS or before its name was re-pointed)."""
    NotificationSettings.objects.update_or_create(team=team, defaults={"webhook_url": url})
    return Delivery.objects.create(
        team=team, event="test", channel="webhook", target=url, payload={"data": {}}
    )


class FakeDNS:
    """Names -> the addresses each successive lookup returns (the last one repeats); other
    names resolve as usual."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups: dict[str, int] = {}
        self.real = socket.getaddrinfo

    def getaddrinfo(self, host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        seen = self.lookups[name] = self.lookups.get(name, 0) + 1
        ips = self.answers[name]
        ip = ips[min(seen, len(ips)) - 1]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port))]


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    """Patched in ``socket`` itself, so every client (urllib3 included) sees it."""
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


# -- unit: what counts as internal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address", "kind"),
    [
        ("127.0.0.1", "127.0.0.1", "loopback"),
        ("127.1", "127.0.0.1", "loopback"),
        ("2130706433", "127.0.0.1", "loopback"),
        ("0x7f.1", "127.0.0.1", "loopback"),
        ("0177.0.0.1", "127.0.0.1", "loopback"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "loopback"),
        ("[::1]", "::1", "loopback"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("0", "0.0.0.0", "unspecified"),
        ("[::]", "::", "unspecified"),
        ("169.254.169.254", "169.254.169.254", "metadata"),
        ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "fd00:ec2::254", "metadata"),
        ("169.254.1.1", "169.254.1.1", "link-local"),
        ("[fe80::1]", "fe80::1", "link-local"),
        ("10.0.0.5", "10.0.0.5", "private"),
        ("172.16.3.4", "172.16.3.4", "private"),
        ("192.168.1.10", "192.168.1.10", "private"),
        ("[fd12:3456::1]", "fd12:3456::1", "private"),
        ("100.64.0.1", "100.64.0.1", "not a public address"),
        ("224.0.0.1", "224.0.0.1", "multicast"),
        ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of the metadata
        ("[2002:7f00:1::]", "2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_internal_addresses_in_any_spelling_are_refused(host, address, kind):
    assert addresses.literal_address(host) == ipaddress.ip_address(address)
    with pytest.raises(addresses.AddressRefused, match=kind):
        addresses.vetted(host.strip("[]"), 80)
    with pytest.raises(ValidationError, match="points inside the platform's network"):
        services.check_webhook_url(f"http://{host}/hook")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",  # Redis
        "http://localhost:5000/api/2.0/mlflow/experiments/search",  # MLflow
        "http://localhost:5432/",  # PostgreSQL
        "http://user@127.1:6379/",
    ],
)
def test_the_platforms_own_services_are_refused_when_saved(url):
    with pytest.raises(ValidationError, match="loopback address"):
        services.check_webhook_url(url)


@pytest.mark.parametrize(
    "url", ["https://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook", "http://1.1.1.1:8080/"]
)
def test_a_public_address_is_allowed(url):
    assert services.check_webhook_url(url) == url


def test_a_name_is_refused_if_any_of_its_addresses_is_internal(dns):
    dns.answers["mixed.test"] = ["93.184.215.14"]
    assert addresses.vetted("mixed.test", 443) == [ipaddress.ip_address("93.184.215.14")]
    dns.answers["evil.test"] = ["10.1.2.3"]
    with pytest.raises(ValidationError, match=r"evil.test \(10.1.2.3\) is a private address"):
        services.check_webhook_url("https://evil.test/hook")


def test_a_name_that_does_not_resolve_is_judged_when_delivered(team):
    url = "https://hooks.nowhere.invalid/hook"

    assert services.check_webhook_url(url) == url  # nothing to judge yet
    row = queued(team, url)
    with pytest.raises(delivery.TransientDeliveryError, match="could not resolve"):
        deliver(row.pk)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO"])
def test_a_target_that_is_not_http_is_never_requested(team, url):
    row = queued(team, url)  # saved by something other than the settings form, say

    assert deliver(row.pk) == DeliveryStatus.FAILED
    row.refresh_from_db()
    assert row.last_error.startswith(f"not sent: {url!r} is not an http(s) URL")


def test_an_operator_can_allow_a_network(settings):
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "10.20.0.0/16, fd12::/16"

    assert addresses.vetted("10.20.3.4", 80)
    assert addresses.vetted("::ffff:10.20.3.4", 80)
    assert addresses.vetted("fd12:3456::1", 80)
    with pytest.raises(addresses.AddressRefused):
        addresses.vetted("10.21.0.1", 80)
    with pytest.raises(addresses.AddressRefused):
        addresses.vetted("127.0.0.1", 80)
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "10.20.0.0/16,nonsense"
    with pytest.raises(ImproperlyConfigured, match="'nonsense' is not a network"):
        addresses.vetted("8.8.8.8", 80)


def test_the_api_refuses_a_loopback_url_with_a_clear_message(api, team):
    refused = api.put(
        "/api/v1/notifications",
        {"webhook_url": "http://2130706433:6379/"},
        content_type="application/json",
    )

    assert refused.status_code == 400
    detail = refused.json()["detail"]
    assert "2130706433 (127.0.0.1) is a loopback address" in detail
    assert "R1_WEBHOOK_ALLOW_NETWORKS" in detail
    assert not NotificationSettings.objects.exists()


# -- real: a server on this machine ----------------------------------------------------------------


def test_a_server_on_this_machine_is_not_reached_by_default(team, member_client):
    with receiver() as local:
        prefix = f"team-{team.pk}-"
        saved = member_client.post(
            reverse("notifications:save", args=[team.pk]),
            {prefix + "webhook_url": local.url(), prefix + "events": []},
        )
        assert saved.status_code == 400 and "loopback address" in saved.content.decode()
        row = queued(team, local.url("127.1"))

        assert deliver(row.pk) == DeliveryStatus.FAILED

    assert local.requests == [], "nothing reached the server"
    row.refresh_from_db()
    assert row.last_error.startswith("not sent: 127.1 (127.0.0.1) is a loopback address")
    assert row.response_status is None and row.duration_ms is None


def test_it_is_reached_when_an_operator_allows_the_network(team, settings):
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "127.0.0.0/8"
    with receiver() as local:
        services.update_settings(team, webhook_url=local.url(), emails=[], events=[])
        row = queued(team, local.url())

        assert deliver(row.pk) == DeliveryStatus.SENT

    ((request,),) = [local.requests]
    assert request["path"] == "/hook"
    assert request["headers"]["Host"] == f"127.0.0.1:{local.port}"
    row.refresh_from_db()
    assert (row.response_status, row.last_error) == (200, "")
    assert row.duration_ms is not None and row.duration_ms >= 0


def test_the_log_keeps_the_status_and_time_never_the_answer(team, settings):
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "127.0.0.1/32"
    with receiver(status=404, reason=f"Nope {SECRET}") as local:
        row = queued(team, local.url())

        assert deliver(row.pk) == DeliveryStatus.FAILED

    assert len(local.requests) == 1
    row.refresh_from_db()
    assert row.response_status == 404
    assert row.last_error.startswith("the webhook answered 404 Not Found in ")
    assert " ms (permanent, not retried)" in row.last_error
    assert "redis_version" not in row.last_error and "hunter2" not in row.last_error
    assert "Nope" not in row.last_error, "not even the receiver's own reason phrase"


def test_a_redirect_to_an_internal_address_is_not_followed(team, settings):
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "127.0.0.1/32"  # the receiver, not 127.0.0.2
    with receiver("127.0.0.2") as internal:
        target = internal.url("127.0.0.2", "/admin")
        with receiver(status=307, headers={"Location": target}) as allowed:
            row = queued(team, allowed.url())

            assert deliver(row.pk) == DeliveryStatus.FAILED

    assert len(allowed.requests) == 1 and internal.requests == []
    row.refresh_from_db()
    assert row.response_status == 307
    assert "redirects are not followed" in row.last_error
    assert "127.0.0.2" not in row.last_error and "redis_version" not in row.last_error


def test_a_name_re_pointed_after_the_check_still_reaches_the_checked_address(team, settings, dns):
    """DNS rebinding: the first lookup says an allowed address, any later one an internal one.
    The request goes to the address that was checked, with the name in its Host header."""
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "127.0.0.1/32"
    with receiver() as checked, receiver("127.0.0.2", checked.port) as internal:
        dns.answers["rebind.test"] = ["127.0.0.1", "127.0.0.2"]
        row = queued(team, checked.url("rebind.test"))

        assert deliver(row.pk) == DeliveryStatus.SENT

    assert internal.requests == []
    ((request,),) = [checked.requests]
    assert request["headers"]["Host"] == f"rebind.test:{checked.port}"
    assert dns.lookups["rebind.test"] == 1


# -- real: https to the checked address, verified against the name -------------------------------


def tls_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A throwaway CA (its PEM) and a server certificate + key for ``name`` (one PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r1 test CA")])
    signs = dict.fromkeys(
        ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment"]
        + ["key_agreement", "encipher_only", "decipher_only"],
        False,
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**signs, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, server_pem = tmp_path / "ca.pem", tmp_path / f"{name}.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, server_pem


@pytest.mark.parametrize(("certified", "delivered"), [("hooks.test", True), ("other.test", False)])
def test_https_goes_to_the_checked_address_and_verifies_the_name(
    team, settings, dns, monkeypatch, tmp_path, certified, delivered
):
    settings.R1_WEBHOOK_ALLOW_NETWORKS = "127.0.0.1/32"
    dns.answers["hooks.test"] = ["127.0.0.1", "127.0.0.2"]
    ca_pem, server_pem = tls_files(tmp_path, certified)
    monkeypatch.setattr(delivery, "ca_bundle", lambda: str(ca_pem))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_pem)
    names: list[str | None] = []
    tls.sni_callback = lambda _sock, name, _ctx: names.append(name)

    with receiver(tls=tls) as server:
        row = queued(team, server.url("hooks.test", scheme="https"))
        status = deliver(row.pk, last_try=True)  # a TLS failure is retried: fail it now

    assert names == ["hooks.test"], "the name is sent for SNI, not the address"
    row.refresh_from_db()
    if delivered:
        assert status == DeliveryStatus.SENT and row.response_status == 200
        assert server.requests[0]["headers"]["Host"] == f"hooks.test:{server.port}"
    else:
        assert status == DeliveryStatus.FAILED and server.requests == []
        assert "TLS handshake with the webhook failed" in row.last_error
        assert "hooks.test" in row.last_error
