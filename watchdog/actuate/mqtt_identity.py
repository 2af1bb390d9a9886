"""Each agent's broker identity, issued without a manual step: the agent asks for a client
certificate of its node through a CertificateSigningRequest (`Enrollment`), the leading
controller grants it only for the node the requesting pod runs on (`CertificateSigner`).

The broker takes the certificate's common name as username and client id (deploy/base/broker/
mosquitto.conf), so an agent can write its own node's topics only and cannot take over another
client's connection. Nothing here decides who deserves a certificate (decide/csr_review.py) or
touches keys (transport/certificates.py).

Must not: sign anything while not leading; hand out a key (the agent's key never leaves its
pod); create a new request per retry (one request is followed until it is answered or gone, so
a controller that is down for hours does not pile requests up in etcd).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from watchdog.actuate.writer import KubeWriter
from watchdog.decide.csr_review import Verdict, review
from watchdog.decide.names import MQTT_CLIENT_SIGNER
from watchdog.transport.certificates import (
    Authority,
    held,
    held_in,
    new_key_and_request,
    write_private,
)
from watchdog.transport.kube_errors import KubeError, NotFound

log = logging.getLogger(__name__)

Obj = dict[str, Any]
CSRS = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
# The longest certificate the signer issues, whatever is asked: a node that is removed from
# the cluster (or whose certificate leaked) keeps broker access at most this long.
MAX_LIFETIME_S = 24 * 3600
# Requests read per pass at most (a flood beyond it waits for Kubernetes to delete answered
# ones, after an hour).
MAX_LISTED = 5000


def _csr_path(name: str, sub: str = "") -> str:
    path = f"{CSRS}/{quote(name, safe='')}"
    return f"{path}/{sub}" if sub else path


def _request_of(obj: Obj) -> bytes:
    """The request's PEM (`spec.request` is base64); b"" when it is not base64 (denied)."""
    try:
        return base64.b64decode(str((obj.get("spec") or {}).get("request", "")), validate=True)
    except ValueError:
        return b""


def _condition(obj: Obj, kind: str) -> Obj | None:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(c, dict) and c.get("type") == kind and c.get("status", "True") == "True":
            return c
    return None


class EnrollmentRefused(Exception):
    """The signer denied the request (or failed it): the message says which field and why."""


class Enrollment:
    """The agent's side: keeps `path` (certificate and key, one PEM file) holding a valid
    certificate of `node`, renewing it at two thirds of its lifetime."""

    def __init__(
        self,
        writer: KubeWriter,
        node: str,
        path: Path,
        *,
        lifetime_s: int = 24 * 3600,
        poll_s: float = 1.0,
        poll_max_s: float = 10.0,
        retry_max_s: float = 60.0,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.writer = writer
        self.node = node
        self.path = path
        self.lifetime_s = lifetime_s
        self.poll_s = poll_s
        self.poll_max_s = poll_max_s
        self.retry_max_s = retry_max_s
        self._now = now
        # The request being waited for (its name, our key): a failed poll resumes it rather
        # than asking again.
        self._pending: tuple[str, bytes] | None = None

    def due_in(self) -> float | None:
        """Seconds until the certificate in place must be renewed; None: there is none of this
        node (or it is due), enroll now. A restarted agent finds the one its pod holds."""
        h = held(self.path)
        if h is None or h.common_name != self.node:
            return None
        left = (h.renew_at() - self._now()).total_seconds()
        return left if left > 0 else None

    async def run(self) -> None:
        """Until cancelled: enroll when there is no usable certificate, then sleep until it is
        due."""
        delay = self.poll_s
        while True:
            due = self.due_in()
            if due is not None:
                await asyncio.sleep(max(due, 1.0))
                continue
            try:
                await self.enroll()
                delay = self.poll_s
            except (KubeError, EnrollmentRefused, OSError, ValueError) as e:
                log.error(
                    "broker certificate of node %s: %s; retrying in %.0fs", self.node, e, delay
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.retry_max_s)

    async def enroll(self) -> None:
        """One request, followed until the certificate is issued (written to `path`), denied
        (`EnrollmentRefused`) or deleted (`KubeError` NotFound: the next call asks
        again). A request left pending is polled, never duplicated: after an error the next
        call resumes it."""
        if self._pending is None:
            self._pending = await self._ask()
        name, key_pem = self._pending
        try:
            await self._wait_for(name, key_pem)
        except (EnrollmentRefused, NotFound):
            self._pending = None
            raise
        self._pending = None

    async def _ask(self) -> tuple[str, bytes]:
        key_pem, request_pem = new_key_and_request(self.node)
        created = await self.writer.call(
            "POST",
            CSRS,
            body={
                "apiVersion": "certificates.k8s.io/v1",
                "kind": "CertificateSigningRequest",
                "metadata": {"generateName": f"node-watchdog-{self.node[:200]}-"},
                "spec": {
                    "request": base64.b64encode(request_pem).decode(),
                    "signerName": MQTT_CLIENT_SIGNER,
                    "expirationSeconds": self.lifetime_s,
                    "usages": ["client auth", "digital signature"],
                },
            },
            what=f"ask for the broker certificate of node {self.node}",
        )
        name = str(created["metadata"]["name"])
        log.info("broker certificate of node %s: asked (%s)", self.node, name)
        return name, key_pem

    async def _wait_for(self, name: str, key_pem: bytes) -> None:
        interval = self.poll_s
        while True:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self.poll_max_s)
            obj = await self.writer.call("GET", _csr_path(name), what=f"read {name}")
            for kind in ("Denied", "Failed"):
                c = _condition(obj, kind)
                if c is not None:
                    raise EnrollmentRefused(f"{name} {kind.lower()}: {c.get('message') or ''}")
            issued = (obj.get("status") or {}).get("certificate")
            if issued:
                data = base64.b64decode(issued) + key_pem
                h = held_in(data)
                if h is None or h.common_name != self.node:
                    raise EnrollmentRefused(
                        f"{name}: the certificate issued is not of our key and node {self.node}"
                    )
                write_private(self.path, data)
                log.info("broker certificate of node %s: issued (%s)", self.node, name)
                return


class CertificateSigner:
    """The controller's side: while `leading()`, answers the pending requests for
    `MQTT_CLIENT_SIGNER`: approves and signs what `review` grants, denies the rest (with the
    reason in the request's Denied condition, for `kubectl get csr`).

    Bounded against a node that floods requests: per pass it signs at most one request per
    node (the newest; older pending ones of that node are denied as superseded), none for a
    node it signed for less than `per_node_interval_s` ago, and writes at most `max_writes`
    answers; one request that fails is logged and skipped, never ends the pass."""

    def __init__(
        self,
        writer: KubeWriter,
        authority: Callable[[], Authority],
        agent_user: str,
        leading: Callable[[], bool],
        *,
        interval_s: float = 2.0,
        max_writes: int = 64,
        per_node_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.authority = authority  # read at each signature: a rotated CA applies at once
        self.agent_user = agent_user
        self.leading = leading
        self.interval_s = interval_s
        self.max_writes = max_writes
        self.per_node_interval_s = per_node_interval_s
        self._clock = clock
        self._on_result = on_result
        # When this replica last signed for each node (keyed by nodes the API server named,
        # pruned to the recent ones each pass: bounded by the cluster).
        self._signed_at: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            if self.leading():
                try:
                    await self.pass_()
                except KubeError as e:
                    log.warning("broker certificates: %s", e)
            await asyncio.sleep(self.interval_s)

    async def pass_(self) -> list[tuple[str, str]]:
        """One look at the pending requests; (name, result) for each answered."""
        pending = [
            obj
            for obj in await self._list()
            if not (obj.get("status") or {}).get("certificate")
            and not any(_condition(obj, k) for k in ("Denied", "Failed"))
        ]
        now = self._clock()
        self._signed_at = {
            n: t for n, t in self._signed_at.items() if now - t < self.per_node_interval_s
        }
        # Newest first: of one node's pending requests, the newest is the one its agent waits
        # for (it asks again only after the earlier one was answered or lost).
        pending.sort(key=lambda o: str((o.get("metadata") or {}).get("creationTimestamp")))
        pending.reverse()
        planned: list[tuple[Obj, bytes, Verdict, str | None]] = []
        seen: dict[str, str] = {}
        for obj in pending:
            request_pem = _request_of(obj)
            verdict = review(obj.get("spec") or {}, request_pem, self.agent_user)
            node, why = verdict.node, None
            if node is not None and node in seen:
                why = f"superseded by {seen[node]}, a newer request of node {node}"
            elif node is not None and node in self._signed_at:
                why = (
                    f"node {node} was issued a certificate less than "
                    f"{self.per_node_interval_s:.0f}s ago"
                )
            if node is not None:
                seen.setdefault(node, str(obj["metadata"]["name"]))
            planned.append((obj, request_pem, verdict, why))
        # Grants first: a flood of one node's requests never delays another node's certificate.
        planned.sort(key=lambda p: p[2].node is None or p[3] is not None)
        done: list[tuple[str, str]] = []
        for obj, request_pem, verdict, why in planned[: self.max_writes]:
            if not self.leading():
                break
            name = str(obj["metadata"]["name"])
            try:
                result = await self._answer(obj, request_pem, verdict, why)
            except Exception as e:  # one request must not end the pass, nor the controller
                log.warning("broker certificate request %s: %s", name, e)
                continue
            if result:
                done.append((name, result))
                if self._on_result is not None:
                    self._on_result(result)
        return done

    async def _list(self) -> list[Obj]:
        """Our signer's requests, read in pages (Kubernetes deletes answered ones after an
        hour, so they are about as many as nodes renewing per hour)."""
        items: list[Obj] = []
        query = {"fieldSelector": f"spec.signerName={MQTT_CLIENT_SIGNER}", "limit": "500"}
        while True:
            listing = await self.writer.call(
                "GET", CSRS, query=query, what="list broker certificate requests"
            )
            items.extend(listing.get("items") or ())
            token = (listing.get("metadata") or {}).get("continue")
            if not token or len(items) >= MAX_LISTED:
                return items
            query = {**query, "continue": token}

    async def _answer(
        self, obj: Obj, request_pem: bytes, verdict: Verdict, why: str | None
    ) -> str | None:
        name = str(obj["metadata"]["name"])
        spec = obj.get("spec") or {}
        if why is not None:
            verdict = Verdict(None, why)
        approved = _condition(obj, "Approved") is not None
        try:
            if verdict.node is None:
                # Approved by someone else (an administrator) yet not one we grant: failed,
                # never signed (a request cannot be both approved and denied).
                kind = "Failed" if approved else "Denied"
                await self._condition(obj, kind, f"NodeWatchdog{kind}", verdict.denial or "")
                log.warning("broker certificate request %s %s: %s", name, kind, verdict.denial)
                return "denied"
            if not approved:
                obj = await self._condition(
                    obj,
                    "Approved",
                    "NodeWatchdogApproved",
                    f"sent by the agent of node {verdict.node}",
                )
            lifetime = min(int(spec.get("expirationSeconds") or MAX_LIFETIME_S), MAX_LIFETIME_S)
            certificate = self.authority().sign(request_pem, max(lifetime, 600))
            obj.setdefault("status", {})["certificate"] = base64.b64encode(certificate).decode()
            await self.writer.call("PUT", _csr_path(name, "status"), body=obj, what=f"sign {name}")
        except NotFound:
            return None  # deleted meanwhile (garbage-collected, or by its owner)
        self._signed_at[verdict.node] = self._clock()
        log.info("broker certificate of node %s issued (%s)", verdict.node, name)
        return "issued"

    async def _condition(self, obj: Obj, kind: str, reason: str, message: str) -> Obj:
        status = obj.setdefault("status", {})
        status["conditions"] = [
            *(status.get("conditions") or ()),
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message[:1024],
                "lastUpdateTime": datetime.datetime.now(datetime.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
            },
        ]
        # Approved and Denied go through the approval subresource, Failed through status.
        return await self.writer.call(
            "PUT",
            _csr_path(str(obj["metadata"]["name"]), "status" if kind == "Failed" else "approval"),
            body=obj,
            what=f"{kind.lower()} {obj['metadata']['name']}",
        )
