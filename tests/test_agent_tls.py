"""
An https agent is called over TLS, its certificate checked: a certificate the
orchestrator trusts gets the task, one it does not gets nothing, and neither is
ever called over plain HTTP.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.web.server import Site
from zope.interface import implementer

from .agents import COMPLETE, FakeAgent
from .conftest import StartService
from .test_routing import FAST, call, submit, wait_for


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class Authority:
    """A CA of the test's own, and certificates for localhost."""

    def __init__(self, directory: Path, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _certificate(name, self.key, name, self.key, ca=True)
        self.bundle = directory / f"{name}.pem"
        self.bundle.write_bytes(_pem(self.certificate))

    def server_options(self) -> _ServerContext:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate("localhost", key, _issuer(self), self.key, ca=False)
        return _ServerContext(leaf, key)


@implementer(IOpenSSLContextFactory)
class _ServerContext:
    """A server's TLS context from cryptography objects, as pyOpenSSL prefers."""

    def __init__(
        self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(certificate)
        self._context.use_privatekey(key)

    def getContext(self) -> SSL.Context:
        return self._context


def _issuer(authority: Authority) -> str:
    return str(
        authority.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[
            0
        ].value
    )


async def tls_agent(authority: Authority) -> FakeAgent:
    agent = FakeAgent(COMPLETE)
    site = Site(agent)
    site.noisy = False
    endpoint = SSL4ServerEndpoint(
        reactor, 0, authority.server_options(), interface="127.0.0.1"
    )
    agent.port = await endpoint.listen(site)
    return agent


@pytest_twisted.ensureDeferred
async def test_https_agents_are_called_over_tls_with_their_certificate_checked(
    start_service: StartService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted, stranger = Authority(tmp_path, "trusted-ca"), Authority(tmp_path, "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted.bundle))
    service = await start_service(**FAST)
    good, bad = await tls_agent(trusted), await tls_agent(stranger)
    try:
        for agent, agent_id, kind in ((good, "good", "cost"), (bad, "bad", "resource")):
            assert agent.port is not None
            port = agent.port.getHost().port
            code, _ = await call(
                service,
                "POST",
                "/api/v1/agents/register",
                {
                    "agent_id": agent_id,
                    "agent_type": kind,
                    "endpoint": f"https://localhost:{port}/agent",
                    "capabilities": ["analyze_cost", "predict_scaling"],
                },
            )
            assert code == 200
        task = await wait_for(service, await submit(service))
        assert (task["status"], task["agent_id"]) == ("completed", "good")
        [received] = good.received
        assert (received.path, received.secure) == ("/agent/task", True)
        task = await wait_for(
            service,
            await submit(
                service,
                task_type="predict_scaling",
                agent_type="resource",
                max_retries=1,
            ),
        )
        assert task["status"] == "failed"
        assert "certificate verify failed" in task["error"], task["error"]
        assert bad.received == []
    finally:
        for agent in (good, bad):
            assert agent.port is not None
            await agent.port.stopListening()
