"""Task wiring for the roles `run`, `agent`, `controller` and `preflight`.

One root TaskGroup per process, every task named; SIGTERM/SIGINT cancel it, and shutdown
releases the leader Lease and publishes the agent's clean `offline` on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from watchdog import __version__
from watchdog.actuate.actuator import Actuator
from watchdog.actuate.events import ObjectRef
from watchdog.actuate.lease_lock import LeaseLock
from watchdog.actuate.power_fence import InventoryError, PowerFencer
from watchdog.actuate.preflight import run_preflight
from watchdog.decide import actions as act
from watchdog.decide.acks import BrokerContact
from watchdog.decide.actions import EventType
from watchdog.decide.config import FenceMode
from watchdog.decide.heartbeats import HeartbeatBook, RejectReason
from watchdog.decide.names import NODE_LEASE_NAMESPACE
from watchdog.decide.peer_reports import PeerBook
from watchdog.decide.state import Phase
from watchdog.heartbeat.agent import Agent, read_boot_id
from watchdog.metrics import Metrics
from watchdog.observe.cluster_cache import (
    HARVESTER_SETTINGS,
    HARVESTER_UPGRADES,
    LEASES,
    MIGRATIONS,
    NODES,
    PODS,
    VMIS,
    ClusterCache,
)
from watchdog.observe.informer import EventKind, RestartCause
from watchdog.observe.mqtt import HeartbeatSubscriber
from watchdog.observe.node_probe import node_lease_probe, node_phase_probe
from watchdog.runtime.controller import Controller
from watchdog.runtime.evacuation import Evacuations
from watchdog.runtime.http import Health, make_app, serve
from watchdog.runtime.identity import start_enrollment, start_signer
from watchdog.runtime.leader import LeaderElector
from watchdog.runtime.probe_lists import ProbeLists
from watchdog.runtime.scheduler import NodeScheduler
from watchdog.runtime.settings import Settings
from watchdog.runtime.view import CacheView
from watchdog.transport.certificates import Authority
from watchdog.transport.kube import ConfigError, KubeApi, load_api_client

log = logging.getLogger("watchdog")

# An evacuation's look due while this replica may not act (a renewal overdue) comes this much
# later, instead of waking the evacuation loop again at once.
NOT_ACTING_RETRY_S = 1.0


def configure_logging(settings: Settings) -> None:
    """Text, or one JSON object per line (`log_format: json`, the deployed default): quotes,
    newlines and tracebacks are escaped inside the object, so a collector can parse every
    line, the error lines included (python-json-logger does the escaping)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={
                    "asctime": "t",
                    "levelname": "level",
                    "name": "logger",
                    "message": "msg",
                    "exc_info": "error",
                },
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def main(role: str, settings: Settings, args: argparse.Namespace) -> int:
    configure_logging(settings)
    if role == "preflight":
        try:
            return asyncio.run(preflight(settings, getattr(args, "role", "controller")))
        except ConfigError as e:
            print(f"FAIL kubeconfig: {e}", file=sys.stderr)
            return 1
    if role in ("run", "agent") and not settings.node_name:
        print("invalid configuration: node_name is required (WATCHDOG_NODE_NAME)", file=sys.stderr)
        return 2
    if settings.fence_mode is FenceMode.NONE:
        log.warning(
            "fence_mode=none: VMs of a partitioned node may run twice (Harvester-compatible)"
        )
    if role in ("run", "controller") and settings.fence_mode is FenceMode.POWER:
        # A fence that cannot run must be found now, not during a failover.
        if settings.power_fence_inventory is None:
            print(
                "invalid configuration: fence_mode 'power' needs power_fence_inventory "
                "(WATCHDOG_POWER_FENCE_INVENTORY): the BMC of each node",
                file=sys.stderr,
            )
            return 2
        fencer = PowerFencer(settings.power_fence_inventory, settings.fence_hook_timeout_s)
        try:
            bmcs = fencer.check()
        except InventoryError as e:
            print(f"invalid configuration: power_fence_inventory: {e}", file=sys.stderr)
            return 2
        log.info("fence_mode=power: BMCs of %d nodes in the inventory", len(bmcs))
    node = settings.node_name or ""
    if role in ("run", "agent") and settings.mqtt.enroll_file is not None and len(node) > 64:
        print(
            f"invalid configuration: mqtt.enroll_file: node name {node!r} has {len(node)} "
            "characters, a certificate's common name at most 64; give this node's agent "
            "mqtt.cert_file/key_file instead",
            file=sys.stderr,
        )
        return 2
    ca_file, key_file = settings.mqtt.signer_ca_file, settings.mqtt.signer_key_file
    if role in ("run", "controller") and ca_file is not None and key_file is not None:
        # A signer that cannot sign must be found now, not when a node joins.
        try:
            Authority.load(ca_file, key_file)
        except (OSError, ValueError) as e:
            print(
                f"invalid configuration: mqtt.signer_ca_file/signer_key_file: {e}",
                file=sys.stderr,
            )
            return 2
    if settings.mqtt.max_queued_messages is not None:
        log.warning("mqtt.max_queued_messages is ignored: heartbeats are not queued any more")
    if role in ("run", "controller") and settings.accept_weak_self_fence:
        log.warning(
            "accept_weak_self_fence: a self-fence without a watchdog device counts as proof; "
            "an agent that freezes or whose fence command fails leaves VMs that run twice"
        )
    if role in ("run", "agent") and settings.fence_command and not settings.watchdog_device:
        log.warning(
            "no watchdog_device: this node's self-fence is weak and a controller resets its "
            "VMs on it only with accept_weak_self_fence"
        )
    try:
        return asyncio.run(_serve(role, settings))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


async def preflight(settings: Settings, role: str = "controller") -> int:
    api_client = await load_api_client()
    # In the audit log, the checks are told apart from the service's own requests.
    api_client.user_agent = user_agent("preflight", settings)
    try:
        checks = await run_preflight(api_client, settings, role)
    finally:
        await api_client.close()
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def user_agent(role: str, settings: Settings) -> str:
    """`node-watchdog/<version> (<role>; <node>_<pid>)`: the identity the leader Lease uses."""
    return f"node-watchdog/{__version__} ({role}; {process_identity(settings)})"


def process_identity(settings: Settings) -> str:
    return f"{settings.node_name or socket.gethostname()}_{os.getpid()}"


async def _serve(role: str, settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    stopping = asyncio.Event()

    def stop(signame: str) -> None:
        if not stopping.is_set():
            log.info("%s: shutting down", signame)
            stopping.set()
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)

    metrics = Metrics()
    health = Health()
    api_client = await load_api_client()
    # In the API server's audit log, each request names the replica that made it.
    api_client.user_agent = user_agent(role, settings)
    api = KubeApi.from_settings(api_client, settings)
    runner = None
    elector: LeaderElector | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            if role in ("run", "controller"):
                elector = _controller(tg, settings, api, metrics, health)
            if role in ("run", "agent"):
                assert settings.node_name
                # Before the agent: its first broker connection needs the certificate.
                start_enrollment(tg, settings, api, metrics)
                boot_id_file = settings.boot_id_file
                probe = node_phase_probe(
                    api, settings.node_name, lambda: read_boot_id(boot_id_file)
                )
                agent = Agent(
                    settings,
                    api_probe=probe,
                    lease_probe=node_lease_probe(api, settings.node_name),
                    on_probe=lambda result: metrics.peer_probes.labels(result=result.value).inc(),
                )
                tg.create_task(agent.run(), name="agent")
                health.readiness("agent", lambda: bool(agent.statistics().get("connected")))
            if settings.metrics_port:
                runner = await serve(
                    make_app(metrics.registry, health), settings.metrics_host, settings.metrics_port
                )
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
    finally:
        if elector is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(elector.release(), 3)
        if runner is not None:
            await runner.cleanup()
        await api.close()
    return 0


def _controller(
    tg: asyncio.TaskGroup, settings: Settings, api: KubeApi, metrics: Metrics, health: Health
) -> LeaderElector:
    clock = time.monotonic
    book = HeartbeatBook(
        will_fresh_s=settings.suspect_after_s, contact_slack_s=settings.heartbeat_interval_s
    )
    metrics.weak_fence_accepted.set(1 if settings.accept_weak_self_fence else 0)
    # Read at scrape time (O(nodes) per scrape, nothing per heartbeat): a standby shows which
    # declarations it would count on if it took over.
    metrics.fences_declared.labels(armed="true").set_function(lambda: book.count_declared(True))
    metrics.fences_declared.labels(armed="false").set_function(lambda: book.count_declared(False))
    peer_book = PeerBook()
    for index in ("observers", "targets", "retired_boots"):
        metrics.input_entries.labels(book=f"peers_{index}").set_function(
            functools.partial(lambda i: peer_book.sizes()[i], index)
        )
    metrics.input_entries.labels(book="heartbeat_retired_boots").set_function(book.retired_count)
    metrics.peer_targets_ignored.set_function(lambda: peer_book.ignored_targets)
    actuator = Actuator(api.api_client, settings)
    taint = actuator.taint
    controller: Controller

    # The volumes of reset pods, captured before the force-delete removes them from the cache.
    claims_of_reset: dict[str, list[tuple[str, str]]] = {}

    async def execute(action: act.Action, basis: act.Basis | None = None) -> str:
        claims: list[tuple[str, str]] = []
        if isinstance(action, act.ForceDeletePods):
            claims_of_reset[action.node] = [
                (p.namespace, c) for p in cache.pods_on(action.node) for c in p.claims
            ]
        if isinstance(action, act.DeleteVolumeAttachments):
            claims = claims_of_reset.pop(action.node, [])
        if isinstance(action, act.StartEvacuation):
            started = await evacuations.start(action)
            # The evacuation loop learns of its time limit (it may sleep until a later one).
            evacuation_ticks.put_nowait(action.node)
            return started
        if isinstance(action, act.StopEvacuation):
            return await evacuations.stop(action)
        outcome = await actuator.execute(action, claims=claims, basis=basis)
        return outcome.result.value

    def on_event(resource: str, kind: EventKind, key: str, old: Any, new: Any) -> None:
        if resource == NODES.name:
            if kind is EventKind.DELETED:
                book.known.discard(key)
                controller.forget_node(key)
                scheduler.forget(key)
                probe_lists.node_deleted(key)
                probe_lists.set_members(len(book.known))
                controller.node_count_changed()
                for target in peer_book.forget(key):
                    if target in book.known:
                        scheduler.mark(target)
                return
            if key not in book.known:
                book.known.add(key)
                probe_lists.set_members(len(book.known))
                controller.node_count_changed()
            controller.node_known(key)
            scheduler.mark(key)
        elif resource == LEASES.name:
            scheduler.mark(key.removeprefix(f"{NODE_LEASE_NAMESPACE}/"))
        elif resource == PODS.name:
            for rec in (old, new):
                if rec is not None and rec.node:
                    scheduler.mark(rec.node)
        elif resource == VMIS.name and new is not None:
            vmi_changes.put_nowait((new.namespace, new.name))
            for rec in (old, new):
                if rec is not None and rec.node in evacuations.active:
                    evacuation_ticks.put_nowait(rec.node)
            # A node held in maintenance has no wake-up of its own: a VMI showing on it ends
            # the maintenance (decide/maintenance.py), so it is decided again at once.
            if new.node is not None and (held := controller.states.get(new.node)) is not None:
                if held.phase is Phase.MAINTENANCE:
                    scheduler.mark(new.node)
        elif resource == MIGRATIONS.name:
            node = evacuations.migration_changed(key, old, new)
            if new is not None and new.final and (old is None or not old.final):
                # A migration ended: a slot KubeVirt's limits held is free for every evacuation.
                for waiting in evacuations.active:
                    evacuation_ticks.put_nowait(waiting)
            elif node in evacuations.active:
                evacuation_ticks.put_nowait(node)
        elif resource in (HARVESTER_SETTINGS.name, HARVESTER_UPGRADES.name):
            # A policy change or an upgrade starting/ending changes what every node may do (and
            # the policy carries the evacuations' time limit).
            scheduler.mark_all(list(book.known))
            for waiting in evacuations.active:
                evacuation_ticks.put_nowait(waiting)

    def on_health(up: bool) -> None:
        controller.api_connection(up)
        scheduler.mark_all(list(book.known))

    def on_restart(resource: str, cause: RestartCause) -> None:
        metrics.watch_restarts.labels(resource=resource, cause=cause.value).inc()

    def on_api_answer() -> None:
        for node in controller.api_answered_now():
            scheduler.mark(node)

    cache = ClusterCache(
        api,
        settings,
        clock=clock,
        on_event=on_event,
        on_restart=on_restart,
        on_health=on_health,
        on_api_answer=on_api_answer,
    )
    controller = Controller(
        settings.decide_config(),
        settings.default_policy(),
        (taint.key, taint.effect),
        CacheView(cache),
        book,
        execute,
        metrics,
        clock,
        peers=peer_book,
        observers_of=lambda node: probe_lists.observers_of(node),
        peer_quorum=settings.peer_quorum,
    )
    scheduler = NodeScheduler(controller.evaluate_now, clock, rearm=controller.rearm)
    controller.mark = scheduler.mark
    controller.health.api_answered = lambda: cache.api_answered_at
    controller.request_api_probe = cache.probe_soon
    evacuations = Evacuations(
        cache, actuator, metrics, clock, lambda: controller.policy.vm_migration_timeout_s
    )
    evacuation_ticks: asyncio.Queue[str] = asyncio.Queue()
    vmi_changes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_change(node: str) -> None:
        metrics.heartbeats.inc()
        if node not in book.known:
            return
        rec = book.nodes.get(node)
        if rec is not None and not rec.offline:
            probe_lists.address_seen(node, rec.peer)
        # A heartbeat of a quiet HEALTHY node waits for its wake-up; a Will ("offline") never.
        if rec is None or rec.offline or controller.heartbeat_needs_evaluation(node):
            scheduler.mark(node)

    def on_connection(up: bool) -> None:
        controller.broker_connection(up)
        if up:
            probe_lists.reconnected()
        scheduler.mark_all(list(book.known))

    lag_state = [False]

    def on_lag(lagging: bool, lag_s: float) -> None:
        metrics.ingest_lag.set(lag_s)
        if lagging != lag_state[0]:
            lag_state[0] = lagging
            # Blind nodes schedule no wake-ups: look at every node again when it clears.
            scheduler.mark_all(list(book.known))

    def on_reject(reason: RejectReason) -> None:
        metrics.heartbeats_rejected.labels(reason=reason.value).inc()

    def on_peers(observer: str, targets: set[str]) -> None:
        # A report can corroborate (or contradict) a silent target now: look at it now.
        metrics.peer_reports.inc()
        for target in targets:
            if target in book.known:
                scheduler.mark(target)

    def on_peer_reject(reason: RejectReason) -> None:
        metrics.peer_reports_rejected.labels(reason=reason.value).inc()

    subscriber = HeartbeatSubscriber(
        settings,
        book,
        on_change=on_change,
        on_connection=on_connection,
        on_reject=on_reject,
        on_lag=on_lag,
        echo_interval_s=min(settings.heartbeat_interval_s, settings.mqtt.max_ingest_lag_s / 2),
        max_lag_s=settings.mqtt.max_ingest_lag_s,
        peers=peer_book,
        on_peers=on_peers,
        on_peer_reject=on_peer_reject,
    )
    probe_lists = ProbeLists(
        settings.peer_count, settings.mqtt.topic_prefix, subscriber.publish_retained
    )
    controller.ingest_lagging = subscriber.ingest_lagging

    async def on_leader(leading: bool) -> None:
        if leading:
            await cache.wait_synced()
            controller.become_leader()
            probe_lists.set_members(len(book.known))
            probe_lists.lead()
            scheduler.mark_all(list(book.known))
        else:
            controller.step_down()
            probe_lists.step_down()
            subscriber.clear_outbox()
            # The next leader resumes DEGRADED nodes as HEALTHY and evacuates them itself.
            evacuations.forget_all()

    identity = process_identity(settings)
    elector = LeaderElector(
        LeaseLock(
            api.api_client,
            settings.namespace,
            settings.leader.lease_name,
            request_timeout_s=settings.api_request_timeout_s,
        ),
        identity,
        lease_duration_s=settings.leader.lease_duration_s,
        renew_deadline_s=settings.leader.renew_deadline_s,
        retry_period_s=settings.leader.retry_period_s,
        on_change=on_leader,
        clock=clock,
    )
    controller.lease_held = elector.holds_lease
    controller.lease_left_s = elector.lease_left_s
    if settings.mqtt.broker_contact is BrokerContact.LEADER_ACK:
        # Only the leader's hearing is then an agent's broker contact (decide/acks.py): a
        # replica acknowledges heartbeats while it holds the Lease, from its acquisition (the
        # book fills before the cache has synced), and stops at its renew deadline, before
        # another can lead.
        subscriber.acks_when = elector.holds_lease

    async def follow_vmis() -> None:
        while True:
            ns, name = await vmi_changes.get()
            await controller.vmi_changed(ns, name)
            metrics.queue_depth.labels(queue="vmi_changes").set(vmi_changes.qsize())

    async def evacuate() -> None:
        # Ticks coalesce: one per node however many events arrived meanwhile. Between events
        # the loop sleeps until the earliest look an evacuation needs for time alone (its time
        # limit, `Evacuations.next_wake`), not polling.
        while True:
            wake = evacuations.next_wake()
            timeout = None if wake is None else max(0.0, wake - clock())
            try:
                node = await asyncio.wait_for(evacuation_ticks.get(), timeout=timeout)
                nodes = {node}
                while not evacuation_ticks.empty():
                    nodes.add(evacuation_ticks.get_nowait())
            except TimeoutError:
                nodes = evacuations.due(clock())
            if controller.acting:
                for n in nodes:
                    await evacuations.tick(n)
            else:
                # Not acting for a moment (a renewal overdue): look again later, not at once
                # (a look still due would wake this loop again and again).
                evacuations.defer(nodes, clock() + NOT_ACTING_RETRY_S)

    reported_policy_problem: list[str | None] = [None]

    async def report_policy_problem() -> None:
        """An Event on the Setting, once per distinct problem (the metric says it continuously)."""
        problem = controller.policy_problem()
        if problem and problem != reported_policy_problem[0] and controller.acting:
            ref = ObjectRef(
                kind="Setting",
                name=settings.harvester_setting,
                api_version="harvesterhci.io/v1beta1",
            )
            message = f"invalid value, keeping {controller.policy}: {problem}"
            await actuator.events.record_event(ref, EventType.WARNING, "PolicyInvalid", message)
        reported_policy_problem[0] = problem

    async def heartbeat_loop() -> None:
        # /healthz: the scheduler and caches must keep moving.
        while True:
            await report_policy_problem()
            health.beat("controller", allowance_s=30.0)
            metrics.queue_depth.labels(queue="dirty_nodes").set(scheduler.statistics()["dirty"])
            await asyncio.sleep(5)

    health.readiness("api-caches", lambda: cache.synced)
    health.readiness("broker", lambda: subscriber.connected)
    tg.create_task(cache.run(), name="caches")

    async def subscribe() -> None:
        # Only once every Node is known: the broker hands over its retained peer reports and
        # statuses at once on subscribing, and one about a node not known yet would be refused
        # (unknown node) and not sent again until its agent's verdict changes.
        await cache.wait_synced()
        controller.members_synced()  # the quorum's member count starts from every Node
        await subscriber.run()

    tg.create_task(subscribe(), name="heartbeat subscriber")
    tg.create_task(scheduler.run(), name="node scheduler")
    tg.create_task(follow_vmis(), name="vm follower")
    tg.create_task(evacuate(), name="evacuations")
    tg.create_task(heartbeat_loop(), name="health")
    # Events the API refused or lost: written again while we lead (actuate/event_backlog.py).
    metrics.queue_depth.labels(queue="events_unwritten").set_function(
        lambda: len(actuator.events.backlog)
    )
    tg.create_task(actuator.events.backlog.run(lambda: controller.acting), name="event backlog")

    async def campaign() -> None:
        # Only a replica whose caches are synced campaigns: one that took the Lease first and
        # synced after would hold it, renewing, while nothing acts (or for ever, should a
        # cache never sync); a synced standby leads instead.
        await cache.wait_synced()
        await elector.run()

    tg.create_task(campaign(), name="leader election")
    start_signer(tg, settings, api, metrics, lambda: controller.acting)
    return elector
