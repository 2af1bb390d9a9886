"""The test cluster's real control plane (chaos/sim/controlplane.py) and its TCP proxy.

Cluster tests run the real etcd, kube-apiserver, kube-controller-manager and kube-scheduler;
every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from chaos.sim.binaries import BinariesUnavailable, ControlPlaneBinaries, ensure_binaries
from chaos.sim.controlplane import ControlPlane, ControlPlaneError, Timings, scale_timings
from chaos.sim.procs import pid_alive
from chaos.sim.proxy import ProxyMode, TcpProxy
from tests.eventually import eventually

REPO = Path(__file__).resolve().parents[2]


# -- helpers ----------------------------------------------------------------------------------


async def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        f"--kubeconfig={kubeconfig}",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def admin_session(cp: ControlPlane, timeout_s: float = 30.0) -> aiohttp.ClientSession:
    """A raw HTTPS client with the admin certificate, read from the admin kubeconfig."""
    return _session_from_kubeconfig(cp.admin_kubeconfig, timeout_s)


def _session_from_kubeconfig(path: Path, timeout_s: float) -> aiohttp.ClientSession:
    cfg = yaml.safe_load(path.read_text())
    ctx = ssl.create_default_context(
        cadata=base64.b64decode(
            cfg["clusters"][0]["cluster"]["certificate-authority-data"]
        ).decode()
    )
    user = cfg["users"][0]["user"]
    headers = {}
    if "token" in user:
        headers["Authorization"] = f"Bearer {user['token']}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "c"), Path(tmp, "k")
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            ctx.load_cert_chain(cert, key)
    return aiohttp.ClientSession(
        base_url=cfg["clusters"][0]["cluster"]["server"],
        headers=headers,
        connector=aiohttp.TCPConnector(ssl=ctx),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def status_of(session: aiohttp.ClientSession, path: str) -> int:
    async with session.get(path) as resp:
        return resp.status


# -- without a cluster ------------------------------------------------------------------------


def test_one_factor_compresses_every_kubernetes_timing() -> None:
    scaled = scale_timings(Timings(), 0.1)
    kcm = dict(flag.split("=", 1) for flag in scaled.kube_controller_manager)
    api = dict(flag.split("=", 1) for flag in scaled.kube_apiserver)
    assert kcm["--node-monitor-grace-period"] == "5000ms"  # 50 s, the v1.37 default
    assert kcm["--node-monitor-period"] == "500ms"
    assert kcm["--node-startup-grace-period"] == "6000ms"
    assert kcm["--node-eviction-rate"] == "1"  # rates grow as time shrinks
    assert kcm["--kube-api-qps"] == "200"
    assert kcm["--attach-detach-reconcile-sync-period"] == "6000ms"
    assert api["--default-not-ready-toleration-seconds"] == "30"
    assert api["--etcd-compaction-interval"] == "30000ms"
    assert scaled.scheduler_pod_max_backoff_s == 1


def test_scaling_stops_where_kubernetes_rejects_shorter_values() -> None:
    scaled = scale_timings(Timings(), 0.001)
    kcm = dict(flag.split("=", 1) for flag in scaled.kube_controller_manager)
    assert kcm["--attach-detach-reconcile-sync-period"] == "1001ms"  # must exceed 1 s
    assert "--default-not-ready-toleration-seconds=1" in scaled.kube_apiserver  # whole seconds
    with pytest.raises(ValueError, match="time_scale"):
        scale_timings(Timings(), 0)


def test_a_binaries_directory_lacking_a_component_is_named_in_the_error(tmp_path: Path) -> None:
    # envtest's asset directories hold kube-apiserver and etcd but no controller-manager.
    (tmp_path / "kube-apiserver").write_text("#!/bin/sh\n")
    (tmp_path / "kube-apiserver").chmod(0o755)
    with pytest.raises(BinariesUnavailable, match="kube-controller-manager, kube-scheduler"):
        ensure_binaries(tmp_path, progress=lambda _line: None)


def test_a_completed_build_in_the_cache_is_used_without_building(
    tmp_path: Path, control_plane_binaries: ControlPlaneBinaries, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "control-plane" / "v1.37.2"
    cache.mkdir(parents=True)
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        (cache / name).symlink_to(control_plane_binaries.directory / name)
    (cache / "BUILD-INFO.json").write_text("{}")
    monkeypatch.setenv("WATCHDOG_CHAOS_CACHE", str(tmp_path))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    lines: list[str] = []
    found = ensure_binaries(progress=lines.append)
    assert found.kube_apiserver == cache / "kube-apiserver"
    assert lines == []  # nothing was built
    assert os.access(found.etcd, os.X_OK)


def test_a_second_process_waits_for_a_running_build_instead_of_building_again(
    tmp_path: Path, control_plane_binaries: ControlPlaneBinaries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_CHAOS_CACHE", str(tmp_path))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    versions = tmp_path / "control-plane"
    versions.mkdir()
    lines: list[str] = []
    with (versions / ".v1.37.2.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" is building
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(ensure_binaries, progress=lines.append)
            deadline = time.monotonic() + 10
            while not any("waiting" in line for line in lines):
                assert time.monotonic() < deadline, lines
                time.sleep(0.05)
            # The other build completes: it renames its finished temp dir into place.
            done = versions / ".build-v1.37.2-other"
            done.mkdir()
            for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
                (done / name).symlink_to(control_plane_binaries.directory / name)
            (done / "BUILD-INFO.json").write_text("{}")
            done.rename(versions / "v1.37.2")
            fcntl.flock(lock, fcntl.LOCK_UN)
            found = waiting.result(timeout=30)
    assert found.kube_scheduler == versions / "v1.37.2" / "kube-scheduler"
    assert any("another process just built" in line for line in lines)


# -- proxy ------------------------------------------------------------------------------------


class EchoServer:
    """Upstream for proxy tests: echoes bytes, records connections and how they ended."""

    def __init__(self) -> None:
        self.connections = 0
        self.endings: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def proxied_echo() -> AsyncIterator[tuple[EchoServer, TcpProxy]]:
    async with EchoServer() as echo, TcpProxy("127.0.0.1", echo.port, name="test") as proxy:
        yield echo, proxy


async def test_proxy_passes_bytes_both_ways_and_forwards_a_half_close() -> None:
    async with proxied_echo() as (echo, proxy):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the echo's FIN came back
        await eventually(lambda: _true(echo.endings == ["eof"]), what="upstream saw FIN")
        assert proxy.statistics().bytes_to_target == 5
        writer.close()


async def test_blackhole_keeps_both_connections_open_but_forwards_nothing() -> None:
    async with proxied_echo() as (echo, proxy):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

        proxy.set_mode(ProxyMode.BLACKHOLE)
        writer.write(b"lost?")
        writer.write_eof()  # not even a FIN may cross
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # no data, no EOF, no reset
        assert echo.endings == []  # upstream saw no FIN or RST either
        assert proxy.statistics().active == 1

        proxy.set_mode(ProxyMode.PASS)  # the partition heals: held bytes arrive, in order
        assert await asyncio.wait_for(reader.read(), 5) == b"lost?"
        await eventually(lambda: _true(echo.endings == ["eof"]), what="upstream saw the FIN")
        writer.close()


async def test_a_connection_made_during_a_blackhole_reaches_the_target_only_after_healing() -> None:
    async with proxied_echo() as (echo, proxy):
        proxy.set_mode("blackhole")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"early")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
        assert echo.connections == 0
        proxy.set_mode("pass")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"early"
        assert echo.connections == 1
        writer.close()


async def test_reset_aborts_open_connections_and_refuses_new_ones() -> None:
    async with proxied_echo() as (echo, proxy):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), 5)
        proxy.set_mode(ProxyMode.RESET)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)  # an RST, not a polite FIN
        await eventually(lambda: _true(echo.endings == ["reset"]), what="upstream got an RST")

        reader2, _writer2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader2.read(1), 5)
        assert proxy.statistics().reset == 2
        assert proxy.statistics().active == 0
        writer.close()


async def _true(value: bool) -> bool:
    return value


# -- the shared control plane -----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def control_plane(
    control_plane_binaries: ControlPlaneBinaries, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(
        work_dir=tmp_path_factory.mktemp("controlplane"),
        binaries=control_plane_binaries,
        time_scale=0.1,
        audit_log=True,
    ) as cp:
        yield cp


@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
class TestSharedControlPlane:
    async def test_real_kubectl_lists_nodes_and_namespaces(
        self, control_plane: ControlPlane
    ) -> None:
        rc, out, err = await kubectl(control_plane.admin_kubeconfig, "get", "nodes")
        assert rc == 0, err
        rc, out, err = await kubectl(
            control_plane.admin_kubeconfig, "get", "namespaces", "-o", "name"
        )
        assert rc == 0, err
        assert {"namespace/default", "namespace/kube-system", "namespace/kube-node-lease"} <= set(
            out.split()
        )

    async def test_rbac_is_enforced_for_a_service_account_token(
        self, control_plane: ControlPlane, tmp_path: Path
    ) -> None:
        cp = control_plane
        kubeconfig = await cp.kubeconfig_for_service_account("rbac-test", "probe", tmp_path / "sa")
        rc, out, _ = await kubectl(kubeconfig, "auth", "can-i", "list", "nodes")
        assert (rc, out.strip()) == (1, "no")
        async with _session_from_kubeconfig(kubeconfig, 10) as sa:
            assert await status_of(sa, "/api/v1/nodes") == 403

            for args in (
                (
                    "create",
                    "clusterrole",
                    "rbac-test-node-reader",
                    "--verb=list",
                    "--resource=nodes",
                ),
                (
                    "create",
                    "clusterrolebinding",
                    "rbac-test-node-reader",
                    "--clusterrole=rbac-test-node-reader",
                    "--serviceaccount=rbac-test:probe",
                ),
            ):
                rc, _, err = await kubectl(cp.admin_kubeconfig, *args)
                assert rc == 0, err
            # The RBAC authorizer reads bindings through an informer: allowed shortly after.
            await eventually(
                lambda: _eq(status_of(sa, "/api/v1/nodes"), 200),
                what="list nodes allowed after binding",
            )
            assert await status_of(sa, "/api/v1/namespaces") == 403  # and nothing more
        rc, out, _ = await kubectl(kubeconfig, "auth", "can-i", "list", "nodes")
        assert (rc, out.strip()) == (0, "yes")

        # The audit log records who was denied what: later used to prove RBAC minimality.
        assert cp.audit_log_path is not None

        async def denial_audited() -> bool:
            for line in cp.audit_log_path.read_text().splitlines():  # type: ignore[union-attr]
                event = json.loads(line)
                if (
                    event["user"]["username"] == "system:serviceaccount:rbac-test:probe"
                    and event.get("objectRef", {}).get("resource") == "nodes"
                    and event["responseStatus"]["code"] == 403
                ):
                    return True
            return False

        await eventually(denial_audited, what="the 403 in the audit log")

    async def test_compaction_gives_a_watch_from_an_older_resource_version_410_gone(
        self, control_plane: ControlPlane
    ) -> None:
        async with admin_session(control_plane) as api:
            path = "/api/v1/namespaces/default/configmaps"
            async with api.post(path, json={"metadata": {"name": "compaction-probe"}}) as r:
                assert r.status == 201
                old_rv = (await r.json())["metadata"]["resourceVersion"]
            async with api.patch(
                f"{path}/compaction-probe",
                json={"data": {"k": "v"}},
                headers={"Content-Type": "application/merge-patch+json"},
            ) as r:
                assert r.status == 200

            # Before compaction the old resourceVersion still replays the change...
            assert (await _first_watch_event(api, path, old_rv))["type"] == "MODIFIED"
            revision = await control_plane.compact()
            assert revision > int(old_rv)
            # ...after it, the real apiserver answers 410 Gone, as etcd forgot that history.
            event = await _first_watch_event(api, path, old_rv)
            assert event["type"] == "ERROR"
            assert event["object"]["code"] == 410
            assert event["object"]["reason"] in ("Expired", "Gone")
            # A fresh list gives a resourceVersion that can be watched again.
            async with api.get(path) as r:
                fresh_rv = (await r.json())["metadata"]["resourceVersion"]
            async with api.delete(f"{path}/compaction-probe") as r:
                assert r.status == 200
            assert (await _first_watch_event(api, path, fresh_rv))["type"] == "DELETED"

    async def test_controller_manager_stop_and_start(
        self, control_plane: ControlPlane, tmp_path: Path
    ) -> None:
        cp = control_plane
        pid = cp.pids()["kube-controller-manager"]
        await cp.controller_manager_stop()
        assert not pid_alive(pid)
        assert "kube-controller-manager" not in cp.pids()
        # Work for its serviceaccount controller, queued while it is down...
        rc, _, err = await kubectl(cp.admin_kubeconfig, "create", "namespace", "while-kcm-down")
        assert rc == 0, err
        await cp.controller_manager_start()
        assert cp.pids()["kube-controller-manager"] != pid
        # ...is done by the restarted one.
        async with admin_session(cp) as api:
            await eventually(
                lambda: _eq(
                    status_of(api, "/api/v1/namespaces/while-kcm-down/serviceaccounts/default"), 200
                ),
                what="the restarted controller-manager created the default ServiceAccount",
            )

    async def test_scheduler_stop_and_start(self, control_plane: ControlPlane) -> None:
        pid = control_plane.pids()["kube-scheduler"]
        await control_plane.scheduler_stop()
        assert not pid_alive(pid)
        await control_plane.scheduler_start()
        assert pid_alive(control_plane.pids()["kube-scheduler"])

    async def test_a_node_identity_is_judged_by_the_node_authorizer(
        self, control_plane: ControlPlane, tmp_path: Path
    ) -> None:
        kubeconfig = control_plane.kubeconfig_for_user(
            "system:node:node-1", ["system:nodes"], tmp_path / "node-1"
        )
        for verb, resource, allowed in (
            ("create", "nodes", "yes"),
            ("get", "nodes/node-1", "yes"),
            ("list", "nodes", "no"),  # v1.37: a node reads only its own Node object
            ("list", "pods", "no"),  # only with a spec.nodeName field selector
        ):
            _, out, _ = await kubectl(kubeconfig, "auth", "can-i", verb, resource)
            assert out.split()[0] == allowed, (verb, resource, out)

    @pytest.mark.parametrize("mode", ["freeze", "stop"])
    async def test_api_outage_is_seen_by_clients_and_recovers(
        self, control_plane: ControlPlane, mode: Any
    ) -> None:
        cp = control_plane
        async with admin_session(cp, timeout_s=1.0) as api:
            assert await status_of(api, "/readyz") == 200
            await cp.api_outage_start(mode)
            try:
                # freeze: the request hangs until the client's timeout; stop: refused.
                with pytest.raises((TimeoutError, aiohttp.ClientError)):
                    await status_of(api, "/api/v1/namespaces")
                rc, _, _ = await kubectl(cp.admin_kubeconfig, "--request-timeout=1s", "get", "ns")
                assert rc != 0
            finally:
                await cp.api_outage_stop()
            await eventually(
                lambda: _eq(status_of(api, "/api/v1/namespaces"), 200),
                what="API answers after the outage",
            )
        await cp.ready(30)

    async def test_a_proxy_in_front_of_the_apiserver_cuts_a_client_off(
        self, control_plane: ControlPlane, tmp_path: Path
    ) -> None:
        port = int(control_plane.server_url.rsplit(":", 1)[1])
        async with TcpProxy("127.0.0.1", port, name="apiserver") as proxy:
            cfg = yaml.safe_load(control_plane.admin_kubeconfig.read_text())
            cfg["clusters"][0]["cluster"]["server"] = f"https://{proxy.address}"
            via_proxy = tmp_path / "via-proxy.kubeconfig"
            via_proxy.write_text(yaml.safe_dump(cfg))
            assert (await kubectl(via_proxy, "get", "ns"))[0] == 0
            proxy.set_mode(ProxyMode.BLACKHOLE)
            assert (await kubectl(via_proxy, "--request-timeout=1s", "get", "ns"))[0] != 0
            proxy.set_mode(ProxyMode.PASS)
            assert (await kubectl(via_proxy, "get", "ns"))[0] == 0


async def _eq(value: Awaitable[int], expected: int) -> bool:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        return await value == expected
    return False


async def _first_watch_event(api: aiohttp.ClientSession, path: str, rv: str) -> dict[str, Any]:
    params = {"watch": "1", "resourceVersion": rv, "timeoutSeconds": "10"}
    async with api.get(path, params=params) as resp:
        if resp.status == 410:  # an apiserver may also refuse before streaming
            return {"type": "ERROR", "object": await resp.json()}
        assert resp.status == 200, await resp.text()
        line = await asyncio.wait_for(resp.content.readline(), 10)
        return dict(json.loads(line))


# -- lifecycle: each test its own control plane -----------------------------------------------


@pytest.mark.cluster
async def test_starts_in_seconds_and_teardown_leaves_no_process(
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    started = time.monotonic()
    cp = ControlPlane(binaries=control_plane_binaries, time_scale=0.1)
    async with cp:
        startup_s = time.monotonic() - started
        pids = cp.pids()
        work_dir = cp.work_dir
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
        assert all(pid_alive(p) for p in pids.values())
    print(f"control plane startup: {startup_s:.1f}s")
    assert startup_s < 30  # seconds, not minutes (about 4 s on 2 cores)
    assert not any(pid_alive(p) for p in pids.values())
    assert not work_dir.exists()  # a temporary work dir is removed


@pytest.mark.cluster
async def test_a_startup_failure_reports_the_component_log(
    control_plane_binaries: ControlPlaneBinaries, tmp_path: Path
) -> None:
    cp = ControlPlane(
        binaries=control_plane_binaries,
        work_dir=tmp_path,
        extra_args={"kube-apiserver": ["--no-such-flag=1"]},
    )
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver exited.*no-such-flag"):
        await cp.start()
    assert cp.pids() == {}  # etcd, already started, was stopped too


_CHILD = """
import asyncio, json, sys
from pathlib import Path
from chaos.sim.binaries import ControlPlaneBinaries
from chaos.sim.controlplane import ControlPlane

async def main():
    binaries = ControlPlaneBinaries(*map(Path, sys.argv[2:6]))
    async with ControlPlane(binaries=binaries, work_dir=Path(sys.argv[1]), time_scale=0.1) as cp:
        print(json.dumps(cp.pids()), flush=True)
        await asyncio.Event().wait()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted after teardown", flush=True)
"""


@pytest.mark.cluster
@pytest.mark.parametrize(
    "how", [pytest.param(signal.SIGINT, id="Ctrl-C"), pytest.param(signal.SIGKILL, id="crash")]
)
async def test_no_component_outlives_its_parent(
    control_plane_binaries: ControlPlaneBinaries, tmp_path: Path, how: signal.Signals
) -> None:
    b = control_plane_binaries
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(tmp_path),
        str(b.kube_apiserver),
        str(b.kube_controller_manager),
        str(b.kube_scheduler),
        str(b.etcd),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), 120)
    pids = json.loads(line)
    assert len(pids) == 4 and all(pid_alive(p) for p in pids.values())

    parent.send_signal(how)
    rest = (await asyncio.wait_for(parent.stdout.read(), 60)).decode()
    await parent.wait()
    if how == signal.SIGINT:
        assert "interrupted after teardown" in rest
    # On a crash the kernel's parent-death signal kills them; allow it a moment to land.
    await eventually(
        lambda: _true(not any(pid_alive(p) for p in pids.values())),
        timeout_s=15,
        what=f"no component left after {how.name}",
    )
