"""Chaos scenarios against a real cluster: explicit targets, `--yes`, SSH or command kill methods.

Owns: turning a scenario into a plan for a real cluster (the scenario's node names mapped, in
order of appearance, to the nodes named with `--target`; only power-offs, the one fault a kill
method can inflict), the refusals (no kubeconfig, no kill method or template, SSH without
pinned host keys, a fault it cannot inflict, fewer or more targets than the scenario names, a
target the cluster does not have, no `--yes`: exit 2, having printed the plan), the boot-id
check (before the first kill and again before each one, the machine the kill method reaches must
report the boot id the target's Node reports in `status.nodeInfo.bootID`; otherwise nothing more
is killed: a stale inventory, a DNS name or address now owned by another host, or a template
that names the wrong host would otherwise power off a machine the operator did not name),
killing nodes (a local command, or a command over asyncssh with `known_hosts` pinned — a host
that dies mid-command returns no exit status, which is expected; death is confirmed through
the API), and
measuring from what the API shows (Node Ready and the watchdog's phase annotation, launcher pods
vanishing, VMIs Running on another node) and the controllers' /metrics before and after.

Without a ledger there is no ground truth on a real cluster: split-brain and false resets cannot
be measured from the API (a partitioned node's VM still runs whatever the API says); the report
says so instead of printing zeros. Lost VMs: restarting VMs without a Running VMI at the end.

Must not: act before the plan is printed and confirmed, or touch any node not named.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from chaos.harness import probe, report
from chaos.harness.measure import RunResult, VmTimeline, counts, verdict
from chaos.harness.recorder import Recorder
from chaos.harness.runner import ScenarioResult
from chaos.harness.scenario import Scenario
from chaos.sim.informer import NODES, PODS, VMIS, VMS, Informer, Kube, Obj
from chaos.sim.ledger import RESTARTING_STRATEGIES, Ledger

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUPPORTED = frozenset({"poweroff"})
KILL_TIMEOUT_S = 60.0
BOOT_ID_TIMEOUT_S = 20.0


class Refused(Exception):
    """The harness will not act; the message says why."""


@dataclass
class Step:
    at_s: float
    node: str  # the real node
    scenario_node: str
    action: str


def plan(sc: Scenario, targets: list[str]) -> list[Step]:
    """The scenario's faults on the named real nodes; Refused when it cannot be done."""
    names: list[str] = []
    for i, f in enumerate(sc.faults):
        if f.action not in SUPPORTED:
            raise Refused(
                f"faults[{i}].action: {f.action!r} cannot be inflicted on a real cluster by a "
                f"kill method (supported: {', '.join(sorted(SUPPORTED))})"
            )
        if f.duration_s is not None:
            raise Refused(
                f"faults[{i}].duration_s: powering a real node back on is not automated; "
                "remove duration_s and power it on yourself"
            )
        for n in f.targets():
            if n not in names:
                names.append(n)
    if not targets:
        raise Refused(
            f"no --target: name the real node for each node the scenario kills "
            f"({', '.join(names)}), in that order"
        )
    if len(targets) != len(names):
        raise Refused(
            f"the scenario kills {len(names)} node(s) ({', '.join(names)}) but "
            f"{len(targets)} --target were named ({', '.join(targets)})"
        )
    if len(set(targets)) != len(targets):
        raise Refused("a --target is named twice")
    mapping = dict(zip(names, targets, strict=True))
    return sorted(
        (
            Step(t, mapping[n], n, f.action)
            for f in sc.faults
            for t in f.times()
            for n in f.targets()
        ),
        key=lambda s: s.at_s,
    )


class Killer:
    """Runs the kill method for one node."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.kill_method is None:
            raise Refused("--kill-method ssh|command is required on a real cluster")
        if args.kill_method == "command":
            if not args.kill_command:
                raise Refused("--kill-method command needs --kill-command TEMPLATE with {node}")
            if "{node}" not in args.kill_command and "{address}" not in args.kill_command:
                raise Refused("--kill-command must name the node: {node} or {address}")
            boot = args.boot_id_command
            if not boot:
                raise Refused(
                    "--kill-method command needs --boot-id-command TEMPLATE with {node}: it "
                    "prints the boot id of the machine the kill command reaches, checked "
                    "against the Node's before every kill"
                )
            if "{node}" not in boot and "{address}" not in boot:
                raise Refused("--boot-id-command must name the node: {node} or {address}")
        else:
            kh = args.ssh_known_hosts
            if kh is None:
                raise Refused(
                    "--kill-method ssh needs --ssh-known-hosts FILE: host keys are pinned, never "
                    "trusted on first use"
                )
            if not Path(kh).is_file():
                raise Refused(f"--ssh-known-hosts {kh}: no such file")
            try:
                import asyncssh  # noqa: F401
            except ImportError:
                raise Refused(
                    "--kill-method ssh needs asyncssh: pip install 'kubevirt-node-watchdog[real]'"
                ) from None
        templates = {
            "--kill-command": args.kill_command,
            "--boot-id-command": args.boot_id_command,
            "--ssh-address": args.ssh_address,
        }
        for flag, template in templates.items():
            if template is None:
                continue
            try:
                template.format(node="n", address="a")
            except (KeyError, IndexError, ValueError) as e:
                raise Refused(
                    f"{flag} {template!r}: {type(e).__name__} {e}: only {{node}} and "
                    "{address} are replaced; write other braces twice ({{ }})"
                ) from None

    def describe(self, node: str) -> str:
        a = self.args
        q = shlex.quote(node)
        if a.kill_method == "command":
            kill = a.kill_command.format(node=q, address="<InternalIP>")
            check = a.boot_id_command.format(node=q, address="<InternalIP>")
            return f"run locally: {kill} (after checking the machine with: {check})"
        host = a.ssh_address.format(node=node, address="<InternalIP>")
        return (
            f"ssh {a.ssh_user}@{host} (pinned keys {a.ssh_known_hosts}): {a.ssh_command} "
            f"(after checking the machine with: {a.ssh_boot_id_command})"
        )

    async def boot_id(self, node: str, address: str) -> tuple[str | None, str]:
        """The boot id of the machine the kill method reaches for `node`, and how it was read
        (or why it could not be)."""
        a = self.args
        if a.kill_method == "command":
            cmd, code, out, err = await _run_local(
                a.boot_id_command, node, address, BOOT_ID_TIMEOUT_S
            )
            if code is None:
                return None, f"`{cmd}` did not finish within {BOOT_ID_TIMEOUT_S:.0f}s"
            if code != 0:
                detail = err.strip().splitlines()
                return None, f"`{cmd}` exited {code}" + (f": {detail[-1]}" if detail else "")
            return parse_boot_id(out), f"`{cmd}`"
        import asyncssh

        host = a.ssh_address.format(node=node, address=address or node)
        try:
            async with self._ssh(host) as conn:
                result = await asyncio.wait_for(
                    conn.run(a.ssh_boot_id_command, check=False), BOOT_ID_TIMEOUT_S
                )
        except (OSError, asyncssh.Error, TimeoutError) as e:
            return None, f"ssh {host}: {type(e).__name__}: {e}"
        if result.exit_status != 0:
            return None, f"ssh {host}: `{a.ssh_boot_id_command}` exited {result.exit_status}"
        return parse_boot_id(str(result.stdout or "")), f"ssh {host}"

    def _ssh(self, host: str):  # type: ignore[no-untyped-def]
        import asyncssh

        a = self.args
        return asyncssh.connect(
            host,
            username=a.ssh_user,
            known_hosts=str(a.ssh_known_hosts),
            client_keys=[str(a.ssh_key)] if a.ssh_key else (),
            connect_timeout=15,
        )

    async def kill(self, node: str, address: str) -> str:
        a = self.args
        if a.kill_method == "command":
            cmd, code, out, err = await _run_local(a.kill_command, node, address, KILL_TIMEOUT_S)
            if code is None:
                return f"`{cmd}` did not finish within {KILL_TIMEOUT_S:.0f}s (killed)"
            text = (out + err).strip().splitlines()
            return f"`{cmd}` exited {code}" + (f": {text[-1]}" if text else "")
        import asyncssh

        host = a.ssh_address.format(node=node, address=address or node)
        try:
            async with self._ssh(host) as conn:
                result = await asyncio.wait_for(conn.run(a.ssh_command, check=False), 20)
        except (OSError, asyncssh.Error, TimeoutError) as e:
            return f"ssh {host}: {type(e).__name__}: {e} (a dying host may drop the session)"
        if result.exit_status is None:
            return f"ssh {host}: session ended without exit status (the host went down)"
        return f"ssh {host}: exit {result.exit_status}"


async def _run_local(
    template: str, node: str, address: str, timeout_s: float
) -> tuple[str, int | None, str, str]:
    """Run `template` ({node}, {address} shell-quoted) through the shell in its own process
    group: (the command, its exit code or None when it outlived `timeout_s` and was killed
    with its children, stdout, stderr)."""
    cmd = template.format(node=shlex.quote(node), address=shlex.quote(address or node))
    proc = await asyncio.create_subprocess_shell(
        cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return cmd, None, "", ""
    return cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def parse_boot_id(text: str) -> str | None:
    """The boot id in a command's output (its last non-empty line), None when there is none."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def node_identity(node: Obj | None) -> tuple[str | None, str | None]:
    """(boot id, system UUID) the Node reports in `status.nodeInfo`."""
    info = ((node or {}).get("status") or {}).get("nodeInfo") or {}
    if not isinstance(info, dict):
        return None, None
    found = (info.get("bootID"), info.get("systemUUID"))
    return tuple(v if isinstance(v, str) and v else None for v in found)  # type: ignore[return-value]


def boot_mismatch(node: str, node_obj: Obj | None, remote: str | None, how: str) -> str | None:
    """Why `node` must not be killed through the machine `how` reached, or None when that
    machine is the Node's: it printed the Node's current boot id, or its system UUID (what a
    BMC or a hypervisor can tell about a machine, e.g. `virsh domuuid`). Pure: the whole safety
    rule of the check."""
    if node_obj is None:
        return f"--target {node}: no such Node in this cluster"
    boot, uuid = node_identity(node_obj)
    if boot is None and uuid is None:
        return (
            f"--target {node}: its Node reports neither status.nodeInfo.bootID nor systemUUID "
            "to check against"
        )
    if remote is None:
        return f"--target {node}: could not read the identity of the machine it names ({how})"
    if remote == boot or (uuid is not None and remote.lower() == uuid.lower()):
        return None
    return (
        f"--target {node}: the machine reached by {how} printed {remote}; the Node reports "
        f"boot id {boot or '-'}, system UUID {uuid or '-'}: not the same machine (or it "
        "rebooted since the Node said so)"
    )


async def _check_boot(killer: Killer, node: str, node_obj: Obj | None, killed: list[str]) -> None:
    """Refused unless the machine the kill method reaches for `node` is the Node's boot."""
    address = _address(node_obj)
    remote, how = await killer.boot_id(node, address)
    why = boot_mismatch(node, node_obj, remote, how)
    if why is not None:
        done = f"; already killed: {', '.join(killed)}" if killed else "; nothing was killed"
        raise Refused(why + done)
    where = address or "no InternalIP"
    print(f"  boot id of {node} ({where}) read by {how}: {remote}, as its Node reports")


def kubeconfig_context(path: Path) -> str:
    """`context <name>, server <url>` of the kubeconfig's current context, for the plan."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        return f"unreadable kubeconfig ({e})"
    name = doc.get("current-context") if isinstance(doc, dict) else None
    if not name:
        return "no current-context in the kubeconfig"
    ctx = next((c for c in doc.get("contexts") or [] if c.get("name") == name), None)
    cluster_name = ((ctx or {}).get("context") or {}).get("cluster")
    cluster = next((c for c in doc.get("clusters") or [] if c.get("name") == cluster_name), None)
    server = ((cluster or {}).get("cluster") or {}).get("server", "no server")
    return f"context {name}, server {server}"


def _address(node: Obj | None) -> str:
    for a in (node or {}).get("status", {}).get("addresses") or ():
        if a.get("type") == "InternalIP":
            return str(a.get("address"))
    return ""


def cmd_real(args: argparse.Namespace, sc: Scenario, source: str) -> int:
    """`watchdog-chaos run SCENARIO --kubeconfig FILE --kill-method ...`."""
    try:
        if args.kubeconfig is None:
            raise Refused("--kubeconfig FILE is required to act on a real cluster")
        if not Path(args.kubeconfig).is_file():
            raise Refused(f"--kubeconfig {args.kubeconfig}: no such file")
        killer = Killer(args)
        steps = plan(sc, list(args.target))
    except Refused as e:
        print(f"watchdog-chaos run: refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"Plan for the real cluster of {args.kubeconfig} (scenario {sc.name}, real time):")
    print(f"  cluster: {kubeconfig_context(Path(args.kubeconfig))}")
    for s in steps:
        print(
            f"  at +{s.at_s:g}s: power off {s.node} (the scenario's {s.scenario_node}) — "
            f"{killer.describe(s.node)}"
        )
    print(
        "  before the first kill and again before each: the machine the kill method reaches "
        "must report the boot id its Node reports (status.nodeInfo.bootID), else nothing more "
        "is killed"
    )
    print(
        f"  then watch its VMs until they run on other nodes (at most {sc.timeout_s:g}s), "
        f"settle {sc.settle_s:g}s; read {len(args.metrics_url)} controller /metrics"
    )
    if not args.yes:
        print("watchdog-chaos run: refused: nothing done; add --yes to do this", file=sys.stderr)
        return EXIT_USAGE
    sc = sc.model_copy(update={"systems": ["watchdog"], "time_scale": 1.0})
    directory = (
        args.report or Path("chaos-reports") / f"{sc.name}-real-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        result = asyncio.run(_run(args, sc, source, steps, killer))
    except Refused as e:
        print(f"watchdog-chaos run: refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    v = report.write(result, Path(directory))
    print(report.side_by_side(result))
    for line in report.invariant_lines(result):
        print(line)
    print(f"{'PASS' if v.ok else 'FAIL'}; report: {directory}/report.md")
    for f in v.failures:
        print(f"  - {f}")
    return EXIT_OK if v.ok else EXIT_FAILED


async def _run(
    args: argparse.Namespace, sc: Scenario, source: str, steps: list[Step], killer: Killer
) -> ScenarioResult:
    kube = await Kube.from_kubeconfig(Path(args.kubeconfig))
    informers = {
        "nodes": Informer(kube, NODES),
        "pods": Informer(kube, PODS, label_selector="kubevirt.io=virt-launcher"),
        "vmis": Informer(kube, VMIS),
        "vms": Informer(kube, VMS),
    }
    tasks = [asyncio.create_task(i.run(), name=f"informer {n}") for n, i in informers.items()]
    result = ScenarioResult(
        scenario=sc, source=source, started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    run = RunResult(system="watchdog", repetition=1, time_scale=1.0, started_at=result.started_at)
    result.runs.append(run)
    t_start = time.monotonic()
    try:
        async with asyncio.timeout(60):
            for i in informers.values():
                await i.synced.wait()
        missing = [s.node for s in steps if informers["nodes"].get(s.node) is None]
        if missing:
            raise Refused(f"--target {', '.join(missing)}: no such Node in this cluster")
        for node in dict.fromkeys(s.node for s in steps):
            await _check_boot(killer, node, informers["nodes"].get(node), killed=[])
        namespaces = set(args.vm_namespace)
        vmi_seen: dict[str, list[tuple[float, str, str]]] = {}  # key → (t, phase, node)

        def on_vmi(key: str, new: Obj | None, old: Obj | None) -> None:
            if new is not None:
                st = new.get("status") or {}
                vmi_seen.setdefault(key, []).append(
                    (time.monotonic(), st.get("phase") or "", st.get("nodeName") or "")
                )

        informers["vmis"].add_handler(on_vmi)
        rec = Recorder(
            on_line=lambda line: print(f"  {time.monotonic() - t_start:+7.1f}s {line}", flush=True)
        )
        rec.attach(informers["nodes"], informers["pods"])
        before = {u: await probe.scrape(u, 3.0) for u in args.metrics_url}
        incidents: list[tuple[Step, float, list[tuple[str, str]]]] = []
        t0 = time.monotonic()
        for step in steps:
            await asyncio.sleep(max(0.0, t0 + step.at_s - time.monotonic()))
            vmis = [
                (key, _strategy(informers["vms"].get(key)))
                for key, v in informers["vmis"].items.items()
                if (v.get("status") or {}).get("nodeName") == step.node
                and (v.get("status") or {}).get("phase") == "Running"
                and (not namespaces or key.split("/", 1)[0] in namespaces)
            ]
            node_obj = informers["nodes"].get(step.node)
            try:
                await _check_boot(
                    killer, step.node, node_obj, killed=[s.node for s, _, _ in incidents]
                )
            except Refused as e:
                if not incidents:
                    raise
                # Nodes are down already: kill nothing more, but measure what was done and
                # fail the run (its report says why it stopped).
                print(f"  {time.monotonic() - t_start:+7.1f}s STOPPED: {e}", flush=True)
                run.error = f"stopped before killing {step.node}: {e}"
                break
            t = time.monotonic()
            incidents.append((step, t, vmis))
            print(f"  {t - t_start:+7.1f}s FAULT power off {step.node} ({len(vmis)} VMs there)")
            outcome = await killer.kill(step.node, _address(node_obj))
            run.faults.append(
                {"action": step.action, "node": step.node, "t": round(t - t0, 3), "result": outcome}
            )
            print(f"  {time.monotonic() - t_start:+7.1f}s {outcome}")

        def elsewhere(key: str, node: str, after: float) -> float | None:
            for t, phase, where in vmi_seen.get(key, ()):
                if t > after and phase == "Running" and where and where != node:
                    return t
            return None

        def recovered() -> bool:
            return all(
                elsewhere(k, s.node, t) is not None
                for s, t, vmis in incidents
                for k, strategy in vmis
                if strategy in RESTARTING_STRATEGIES
            )

        first = incidents[0][1] if incidents else time.monotonic()
        settled: float | None = None
        while time.monotonic() - first < sc.timeout_s:
            await asyncio.sleep(0.5)
            if recovered():
                settled = settled or time.monotonic()
                if time.monotonic() - settled >= sc.settle_s:
                    break
            else:
                settled = None
        run.observed_s = round(time.monotonic() - first, 2)
        run.timed_out = not recovered()
        for step, t, vmis in incidents:
            phase_t = rec.first(
                step.node,
                "phase",
                frozenset({"Unreachable", "Fencing", "Resetting", "Reset", "Degraded"}),
                t,
            )
            ready_t = rec.first_not_ready(step.node, t)
            det = phase_t if phase_t is not None else ready_t
            for key, strategy in vmis:
                tl = VmTimeline(key, step.node, step.action, strategy, round(t - t0, 3))
                tl.detection_s = None if det is None else round(det - t, 3)
                pods = [
                    p
                    for p in rec.pods.values()
                    if p.vm == key and p.node == step.node and p.deleted_at and p.deleted_at >= t
                ]
                if pods:
                    tl.reset_s = round(min(p.deleted_at or 0.0 for p in pods) - t, 3)
                again = elsewhere(key, step.node, t)
                if again is not None:
                    tl.running_s = round(again - t, 3)
                    tl.running_node = next((w for tt, ph, w in vmi_seen[key] if tt == again), None)
                run.vms.append(tl)
        lost = sorted(
            k
            for k, vm in informers["vms"].items.items()
            if _strategy(vm) in RESTARTING_STRATEGIES
            and ((informers["vmis"].get(k) or {}).get("status") or {}).get("phase") != "Running"
            and (not namespaces or k.split("/", 1)[0] in namespaces)
        )
        run.invariants = {
            "ground_truth": False,
            "split_brain_s": None,
            "split_brain_vms": [],
            "lost": len(lost),
            "lost_vms": lost,
            "false_resets": None,
            "false_reset_vms": [],
            "running": sum(
                1
                for v in informers["vmis"].values()
                if (v.get("status") or {}).get("phase") == "Running"
            ),
            "vms": len(informers["vms"].items),
        }
        run.counts = counts(Ledger(), rec, [], first)
        after = {u: await probe.scrape(u, 3.0) for u in args.metrics_url}
        run.watchdog = {
            "replicas": {
                u: {
                    "before": probe.summary(b) if b else None,
                    "after": probe.summary(a) if a else None,
                }
                for u, b, a in ((u, before[u], after[u]) for u in args.metrics_url)
            }
        }
        run.notes.append(
            f"real cluster {args.kubeconfig}: measured from API watches only (no ground truth)"
        )
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await kube.close()
        result.wall_s = round(time.monotonic() - t_start, 2)
    run.failures = verdict(run, sc.expect)
    return result


def _strategy(vm: Obj | None) -> str:
    spec = (vm or {}).get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    if "running" in spec:
        return "Always" if spec["running"] else "Halted"
    return "RerunOnFailure"
