"""Wiring of the agents' broker identity (actuate/mqtt_identity.py): the agent keeps its
certificate, the leading controller signs requests. Both only when configured
(`mqtt.enroll_file` for the agent, `mqtt.signer_ca_file`/`signer_key_file` for the
controller)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from watchdog.actuate.mqtt_identity import CertificateSigner, Enrollment
from watchdog.actuate.writer import KubeWriter
from watchdog.metrics import Metrics
from watchdog.runtime.settings import Settings
from watchdog.transport.certificates import Authority, held
from watchdog.transport.kube import KubeApi


def start_enrollment(
    tg: asyncio.TaskGroup, settings: Settings, api: KubeApi, metrics: Metrics
) -> Enrollment | None:
    path = settings.mqtt.enroll_file
    if path is None:
        return None
    assert settings.node_name
    writer = KubeWriter(api.api_client, request_timeout_s=settings.api_request_timeout_s)

    def expiry() -> float:
        h = held(path)
        return h.not_after.timestamp() if h is not None else 0.0

    metrics.mqtt_certificate_expiry.set_function(expiry)
    enrollment = Enrollment(
        writer, settings.node_name, path, lifetime_s=settings.mqtt.enroll_lifetime_s
    )
    tg.create_task(enrollment.run(), name="broker certificate")
    return enrollment


def start_signer(
    tg: asyncio.TaskGroup,
    settings: Settings,
    api: KubeApi,
    metrics: Metrics,
    leading: Callable[[], bool],
) -> CertificateSigner | None:
    ca_file, key_file = settings.mqtt.signer_ca_file, settings.mqtt.signer_key_file
    if ca_file is None or key_file is None:
        return None
    writer = KubeWriter(api.api_client, request_timeout_s=settings.api_request_timeout_s)
    signer = CertificateSigner(
        writer,
        lambda: Authority.load(ca_file, key_file),
        f"system:serviceaccount:{settings.namespace}:{settings.mqtt.agent_service_account}",
        leading,
        on_result=lambda result: metrics.mqtt_certificates.labels(result=result).inc(),
    )
    tg.create_task(signer.run(), name="broker certificate signer")
    return signer
