"""Autostop: the VM role's actions, the emulator's managed identities, role assignments and power
actions (a VM's token may deallocate a VM of its own group only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.azure import selfstop
from orchestrator.azure.session import AzureSession
from orchestrator.emulator import Emulator, VmEvent
from orchestrator.emulator.store import HOST
from orchestrator.remote.autostop import RESOURCE as ARM_AUDIENCE  # a token's audience: a name, never dialled
from orchestrator.targets.localvm.manager import processes_in
from tests.conftest import SUB, make_plan
from tests.test_emulator import call

AUTHZ = "2022-04-01"


def vm_role() -> dict[str, Any]:
    return dict(json.loads(selfstop.VM_ROLE_FILE.read_text()))


def test_the_vm_role_allows_only_reading_deallocating_and_deleting_vms_and_deleting_the_group() -> None:
    role = vm_role()
    assert sorted(role["Actions"]) == sorted(
        [
            "Microsoft.Compute/virtualMachines/read",
            "Microsoft.Compute/virtualMachines/deallocate/action",
            "Microsoft.Compute/virtualMachines/delete",
            "Microsoft.Resources/subscriptions/resourceGroups/delete",
        ]
    )
    assert role["NotActions"] == role["DataActions"] == role["NotDataActions"] == []
    assert role["Name"] == selfstop.VM_ROLE_NAME
    # The assigner may assign roles only under its condition: that one role, to service principals.
    assigner = json.loads(selfstop.ASSIGNER_ROLE_FILE.read_text())
    assert "Microsoft.Authorization/roleAssignments/write" in assigner["Actions"]
    assert not [a for a in assigner["Actions"] if not a.startswith("Microsoft.Authorization/")]
    condition = selfstop.assigner_condition("5e467623-bb1f-42f4-a55d-6e525e11384b")
    assert "{vmRoleId}" not in condition
    # Both branches, write and delete, hold to that one role and to service principals.
    write, delete = condition.split("roleAssignments/delete")
    for branch, side in ((write, "@Request"), (delete, "@Resource")):
        assert f"{side}[Microsoft.Authorization/roleAssignments:RoleDefinitionId]" in branch
        assert "GuidEquals {5e467623-bb1f-42f4-a55d-6e525e11384b}" in branch
        assert f"{side}[Microsoft.Authorization/roleAssignments:PrincipalType]" in branch
        assert "{'ServicePrincipal'}" in branch


def make_group(emu: Emulator, run_id: str) -> str:
    """A run's group with its network and one VM with a system-assigned identity; the VM's URL."""
    plan = make_plan(run_id=run_id, identity=True)
    rg = f"{HOST}/subscriptions/{SUB}/resourcegroups/{plan.resource_group}"
    net = f"{HOST}/subscriptions/{SUB}/resourceGroups/{plan.resource_group}/providers/Microsoft.Network"
    assert call(emu, "PUT", rg, {"location": "eastus", "tags": plan.tags}).status == 201
    _, vnet, nsg, vm = plan.resources[:4]
    assert call(emu, "PUT", f"{net}/virtualNetworks/{vnet.name}", vnet.body).status == 201
    assert call(emu, "PUT", f"{net}/networkSecurityGroups/{nsg.name}", nsg.body).status == 201
    assert vm.body["identity"] == {"type": "SystemAssigned"}
    url = f"{net.replace('Microsoft.Network', 'Microsoft.Compute')}/virtualMachines/{vm.name}"
    assert call(emu, "PUT", url, vm.body).status == 201
    return url


def assign(emu: Emulator, vm_url: str, role_id: str) -> Any:
    vm = call(emu, "GET", vm_url).json()
    scope = vm_url.split("/providers/")[0]
    name = "0b6f1b53-8b2e-4d2a-9c1e-5a0f0c1d2e3f" if "first" in vm_url else "1c7f2c64-9c3f-4e3b-8d2f-6b1f1d2e3f40"
    body = {"properties": {"roleDefinitionId": role_id, "principalId": vm["identity"]["principalId"],
                           "principalType": "ServicePrincipal"}}  # fmt: skip
    return call(emu, "PUT", f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}", body, api=AUTHZ)


def test_a_vms_identity_deallocates_its_own_vm_and_nothing_in_another_group(emu: Emulator) -> None:
    role_id = emu.define_role(vm_role(), SUB)
    first, second = make_group(emu, "first-aaa111"), make_group(emu, "second-bbb222")
    got = call(emu, "GET", first).json()
    assert (
        got["identity"]["type"] == "SystemAssigned" and got["identity"]["principalId"] and got["identity"]["tenantId"]
    )
    listed = call(emu, "GET", f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions"
                  f"?$filter=roleName eq '{selfstop.VM_ROLE_NAME}'", api=AUTHZ).json()  # fmt: skip
    assert [r["id"] for r in listed["value"]] == [role_id]
    assert assign(emu, first, role_id).status == 201
    assert assign(emu, second, role_id).status == 201
    token, principal = emu.identity_token(got["id"]) or ("", "")
    assert principal == got["identity"]["principalId"]
    mine = {"Authorization": f"Bearer {token}"}
    # Another group's VM: 403, as ARM words it, and that VM keeps running.
    refused = call(emu, "POST", f"{second}/deallocate", headers=mine)
    assert refused.status == 403 and refused.json()["error"]["code"] == "AuthorizationFailed"
    assert "Microsoft.Compute/virtualMachines/deallocate/action" in refused.json()["error"]["message"]
    assert power(emu, second) == "PowerState/running"
    # Nor anything its role does not grant in its own group (writing a VM).
    vm = call(emu, "GET", first).json()
    assert call(emu, "PUT", first, {"location": "eastus", "properties": vm["properties"]}, headers=mine).status == 403
    forged = {"Authorization": f"Bearer {token[:-4]}0000"}
    assert call(emu, "POST", f"{first}/deallocate", headers=forged).status == 401
    heard: list[VmEvent] = []
    emu.add_vm_listener(heard.append, replay=False)
    accepted = call(emu, "POST", f"{first}/deallocate", headers=mine)
    assert accepted.status == 202 and "Azure-AsyncOperation" in accepted.headers
    assert power(emu, first) == "PowerState/deallocated"
    assert [(e.kind, e.name) for e in heard] == [("deallocated", got["name"])]
    replayed: list[VmEvent] = []
    emu.add_vm_listener(replayed.append)  # a deallocated VM has no host to start
    assert [e.name for e in replayed] == [call(emu, "GET", second).json()["name"]]
    # The tool (its own credential) starts it again: the host hears "running".
    assert call(emu, "POST", f"{first}/start").status == 202
    assert power(emu, first) == "PowerState/running"
    assert heard[-1].kind == "running" and heard[-1].name == got["name"]


def test_a_group_delete_takes_its_role_assignments_with_it(emu: Emulator) -> None:
    role_id = emu.define_role(vm_role(), SUB)
    first = make_group(emu, "first-aaa111")
    assert assign(emu, first, role_id).status == 201
    assert [r for r in emu.store.roles.values() if r["type"].endswith("roleAssignments")]
    assert call(emu, "DELETE", first.split("/providers/")[0]).status == 202
    emu.live_resources()
    assert not [r for r in emu.store.roles.values() if r["type"].endswith("roleAssignments")]


def power(emu: Emulator, vm_url: str) -> str:
    view = call(emu, "GET", f"{vm_url}/instanceView").json()
    return str(next(s["code"] for s in view["statuses"] if s["code"].startswith("PowerState/")))


# ------------------------------------------------------------------------------ the VM's identity endpoint


def test_the_metadata_service_hands_the_vm_its_identity_token_and_arm_accepts_it(tmp_path: Path) -> None:
    import asyncio

    from orchestrator.clock import SystemClock
    from orchestrator.emulator.persist import StoreFile
    from orchestrator.targets.localvm.identity import TOKEN_PATH, VmArm
    from orchestrator.targets.localvm.imds import Imds, ImdsRequest

    store = tmp_path / "store.json"
    emu = Emulator("instant", clock=SystemClock(), backing=StoreFile(store))
    role_id = emu.define_role(vm_role(), SUB)
    vm_url = make_group(emu, "first-aaa111")
    assert assign(emu, vm_url, role_id).status == 201
    vm_id = vm_url.removeprefix(HOST)
    arm = VmArm(store, vm_id)
    imds = Imds(lambda: None)
    imds.add_route(TOKEN_PATH, arm.token)
    query = {"api-version": "2018-02-01", "resource": ARM_AUDIENCE}

    def ask(headers: dict[str, str], q: dict[str, str] = query) -> Any:
        return asyncio.run(imds.handle(ImdsRequest("GET", TOKEN_PATH, q, headers)))

    assert ask({}).status == 400, "IMDS answers only requests with Metadata: true"
    missing = ask({"metadata": "true"}, {"api-version": "2018-02-01"})
    assert (missing.status, missing.body["error"]) == (400, "invalid_request")
    got = ask({"metadata": "true"})
    assert got.status == 200 and got.body["token_type"] == "Bearer"
    assert got.body["resource"] == ARM_AUDIENCE and int(got.body["expires_on"]) > 0
    headers = {"Authorization": f"Bearer {got.body['access_token']}"}
    # What the agent does with it: through the VM's ARM endpoint (the same store), deallocate itself.
    assert arm.emulator().handle("POST", f"{vm_url}/deallocate?api-version=2026-04-01", headers, None).status == 202
    assert (StoreFile(store).resource(vm_id.lower()) or {}).get("_power") == "deallocated"
    # A VM without an identity gets none.
    plain = VmArm(store, vm_id.replace("first-aaa111-0", "nope-0"))
    assert asyncio.run(plain.token(ImdsRequest("GET", TOKEN_PATH, query, {}))).body["error_description"] == (
        "Identity not found"
    )


# ------------------------------------------------------------------------------ whole cycles (slow)


def _until_stopped(state: list[str], run_id: str) -> dict[str, Any]:
    """`status RUN --json` until the run is stopped (its VMs deallocate themselves after 2 s idle;
    the deadline only bounds a broken agent)."""
    from tests.test_cli import cli

    deadline = time.monotonic() + 60
    while True:
        record = dict(json.loads(cli(*state, "--json", "status", run_id).stdout))
        if record["state"] == "stopped" or time.monotonic() > deadline:
            return record
        time.sleep(0.5)


def _vm_folders(state_dir: Path) -> list[Path]:
    return sorted(p for p in (state_dir / "vms").glob("*") if p.is_dir())


@pytest.mark.slow
def test_a_provisioned_vm_left_idle_deallocates_itself_and_collect_brings_its_outputs_home(tmp_path: Path) -> None:
    from tests.test_cli import cli, store_of

    state_dir = tmp_path / "state"
    state = ["--target", "local", "--state-dir", str(state_dir)]
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text("name: idle\nrun: 'true'\n")
    provisioned = cli(*state, "--json", "provision", str(job / "job.yaml"), "--autostop", "2s")
    assert provisioned.returncode == 0, provisioned.stderr  # the provisioning process has exited
    run_id = json.loads(cli(*state, "--json", "ls").stdout)["runs"][0]["run_id"]
    wrote = cli(*state, "exec", run_id, "--", "mkdir -p ../outputs && echo kept > ../outputs/note.txt")
    assert wrote.returncode == 0, wrote.stderr
    record = _until_stopped(state, run_id)
    assert record["state"] == "stopped" and not record["torn_down"] and record["autostop"] == 2
    (vm,) = _vm_folders(state_dir)
    deadline = time.monotonic() + 30  # the host notices within its 1 s watch; this bounds a broken one
    while (processes_in(vm) or (vm / "host.json").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (vm / "host.json").exists() and processes_in(vm) == [], "its host process stopped with it"
    assert not (vm / "mnt").exists(), "the temporary disk is wiped"
    assert (vm / "home" / "orch" / run_id / "outputs" / "note.txt").read_text() == "kept\n", "moved to the OS disk"
    assert "no compute billed" in cli(*state, "status").stdout
    (cost,) = json.loads(cli(*state, "--json", "cost", run_id).stdout)["runs"]
    assert cost["state"] == "stopped" and cost["usd_per_hour_now"] == 0 and cost["ended"] is not None
    assert cost["ended"] <= time.time() and cost["hours"] < 0.1, "compute ends when the VM deallocated"
    assert cli(*state, "gc").returncode == 0
    assert json.loads(cli(*state, "--json", "status", run_id).stdout)["state"] == "stopped", "not expired yet"
    refused = cli(*state, "exec", run_id, "--", "true")
    assert refused.returncode == 2 and f"orchestrator collect {run_id}" in refused.stderr
    refused = cli(*state, "ssh", run_id, "--", "true")  # a VM that is off is not dialled until a timeout
    assert refused.returncode == 2 and f"run {run_id} is stopped" in refused.stderr
    collected = cli(*state, "collect", run_id)
    assert collected.returncode == 0, collected.stderr
    assert (state_dir / "runs" / run_id / "artifacts" / "note.txt").read_text() == "kept\n"
    assert "Nothing running" in cli(*state, "status").stdout
    assert store_of(state_dir)["groups"] == {} and _vm_folders(state_dir) == []


@pytest.mark.slow
def test_train_on_a_stopped_run_leaves_it_able_to_stop_itself_again(tmp_path: Path) -> None:
    """`train` starts a stopped run's VM and leaves it up: the agent that deallocated it ended with
    it, so a new one must watch it, or the VM would run (and bill) with nothing to stop it."""
    from tests.test_cli import cli

    state_dir = tmp_path / "state"
    state = ["--target", "local", "--state-dir", str(state_dir)]
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text("name: again\nrun: 'echo trained > $ORCH_OUTPUT_DIR/out.txt'\n")
    assert cli(*state, "--json", "provision", str(job / "job.yaml"), "--autostop", "2s").returncode == 0
    run_id = json.loads(cli(*state, "--json", "ls").stdout)["runs"][0]["run_id"]
    assert _until_stopped(state, run_id)["state"] == "stopped"
    trained = cli(*state, "train", run_id)
    assert trained.returncode == 0, trained.stderr
    assert "starting 1 stopped VM(s)" in trained.stdout + trained.stderr
    assert json.loads(cli(*state, "--json", "status", run_id).stdout)["state"] == "kept"
    assert _until_stopped(state, run_id)["state"] == "stopped", "stopped itself again after train"
    assert cli(*state, "down", run_id).returncode == 0


@pytest.mark.slow
def test_a_detached_run_whose_job_ends_unwatched_deallocates_and_attach_finishes_it(tmp_path: Path) -> None:
    from tests.test_cli import cli, store_of

    state_dir = tmp_path / "state"
    state = ["--target", "local", "--state-dir", str(state_dir)]
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text(
        "name: unwatched\nrun: |\n  echo done\n  echo '{\"acc\": 0.9}' > $ORCH_OUTPUT_DIR/metrics.json\n"
        "expect: {acc: '>= 0.5'}\n"
    )
    started = cli(*state, "--json", "run", str(job / "job.yaml"), "--detach", "--autostop", "2s")
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout.splitlines()[-1])["run_id"]
    assert _until_stopped(state, run_id)["state"] == "stopped"
    attached = cli(*state, "--json", "attach", run_id)
    assert attached.returncode == 0, attached.stderr
    result = json.loads(attached.stdout.splitlines()[-1])
    assert result["verdict"] == "succeeded" and result["torn_down"] and result["metrics"] == {"acc": 0.9}
    assert store_of(state_dir)["groups"] == {} and _vm_folders(state_dir) == []


@pytest.mark.slow
def test_a_kept_run_stops_itself_and_gc_deletes_it_once_expired(tmp_path: Path) -> None:
    from orchestrator.state import open_store
    from tests.test_cli import cli, store_of

    state_dir = tmp_path / "state"
    state = ["--target", "local", "--state-dir", str(state_dir)]
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text("name: expiring\nrun: 'true'\n")
    kept = cli(*state, "--json", "run", str(job / "job.yaml"), "--keep", "--autostop", "1s")
    assert kept.returncode == 0, kept.stderr
    events = [json.loads(line) for line in kept.stdout.splitlines()]
    assert any("autostop: each VM deallocates itself after 1 s" in e.get("message", "") for e in events)
    result = events[-1]  # arming autostop is said before the result, which stays the last event
    assert result["event"] == "result" and result["verdict"] == "succeeded" and result["kept"]
    run_id = result["run_id"]
    record = _until_stopped(state, run_id)
    assert record["state"] == "stopped"
    assert record["expires"] - time.time() > 6 * 24 * 3600, "kept for a week after it stopped"
    open_store(state_dir).update(run_id, expires=time.time() - 1)  # a week later
    swept = cli(*state, "--json", "gc")
    assert swept.returncode == 0, swept.stderr
    assert json.loads(cli(*state, "--json", "status", run_id).stdout)["torn_down"]
    assert store_of(state_dir)["groups"] == {} and _vm_folders(state_dir) == []


def test_granting_the_role_needs_only_the_assigner_role_and_without_it_the_run_is_told(
    emu: Emulator, session: AzureSession
) -> None:
    from orchestrator.azure.permissions import required_actions, role_actions
    from orchestrator.azure.preflight import check_autostop
    from orchestrator.azure.provision import Provisioner

    emu.define_role(vm_role(), SUB)
    plan = make_plan(identity=True)
    Provisioner(session).provision(plan)
    vms = [n.vm_name for n in plan.nodes]
    before = len(emu.requests())
    assert selfstop.grant(session, plan.resource_group, vms).granted
    runner = set(role_actions())
    assigner = set(json.loads(selfstop.ASSIGNER_ROLE_FILE.read_text())["Actions"])
    needed = required_actions(emu.requests()[before:])
    assert needed - runner == {"Microsoft.Authorization/roleDefinitions/read", selfstop.ASSIGN_ACTION}
    assert needed - runner <= assigner
    # A caller with the runner role only: the grant is refused, the run goes on and says why; check says so.
    emu.set_permissions(sorted(runner))
    refused = selfstop.grant(session, plan.resource_group, vms)
    assert not refused.granted and refused.reason == (
        f"your identity may not assign roles in {plan.resource_group} ({selfstop.ASSIGN_ACTION})"
    )
    scope = f"/subscriptions/{SUB}"
    without = check_autostop([{"actions": sorted(runner), "notActions": []}], scope)
    assert without.details == {"can_assign": False} and "README, 'Autostop'" in without.message
    assert check_autostop([{"actions": ["*"], "notActions": []}], scope).details == {"can_assign": True}


def test_the_agent_sees_ssh_sessions_on_its_address_and_port_and_keeps_outputs_on_the_os_disk(tmp_path: Path) -> None:
    import socket

    from orchestrator.remote import autostop as agent

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    assert agent.ssh_sessions(port, "127.0.0.1") == 0
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        assert agent.ssh_sessions(port, "127.0.0.1") == 1
        assert agent.ssh_sessions(port, "127.0.0.2") == 0, "another local VM's address"
    finally:
        for s in (client, accepted, server):
            s.close()
    temp = tmp_path / "mnt" / "orch"
    (temp / "run1" / "outputs").mkdir(parents=True)
    (temp / "run1" / "outputs" / "model.pt").write_bytes(b"weights")
    home = tmp_path / "home"
    home.mkdir()
    (home / "orch").symlink_to(temp)
    agent.keep_outputs(home)
    assert not (home / "orch").is_symlink()
    assert (home / "orch" / "run1" / "outputs" / "model.pt").read_bytes() == b"weights"


def test_a_role_assignment_is_held_to_microsofts_spec(emu: Emulator) -> None:
    role_id = emu.define_role(vm_role(), SUB)
    scope = make_group(emu, "first-aaa111").split("/providers/")[0]
    url = f"{scope}/providers/Microsoft.Authorization/roleAssignments/2c7f2c64-9c3f-4e3b-8d2f-6b1f1d2e3f40"
    refused = call(emu, "PUT", url, {"properties": {"roleDefinitionId": role_id}}, api=AUTHZ)
    assert refused.status == 400 and "principalId" in refused.json()["error"]["message"]
    assert call(emu, "PUT", url, {"properties": {"roleDefinitionId": role_id}}, api="2015-07-01").status == 400


def test_a_stopped_runs_compute_ends_when_its_vms_deallocated_not_when_it_is_noticed(
    emu: Emulator, session: AzureSession, clock: Any
) -> None:
    from orchestrator.azure.provision import Provisioner

    plan = make_plan(identity=True)
    Provisioner(session).provision(plan)
    vms = [n.vm_name for n in plan.nodes]
    clock.advance(1800)
    deallocated = clock.now()
    selfstop.deallocate(session, plan.resource_group, vms)
    clock.advance(3 * 86400)  # nobody looks for three days
    assert selfstop.power_states(session, plan.resource_group, vms) == {vms[0]: "deallocated"}
    assert abs((selfstop.stopped_at(session, plan.resource_group, vms) or 0) - deallocated) < 1


def test_the_agent_asks_the_metadata_service_directly_never_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure's metadata service refuses proxied requests: with http_proxy set on the VM, the token
    request must still go straight to it (ARM's may use the proxy)."""
    import http.server
    import socket
    import threading
    import urllib.error

    from orchestrator.remote import autostop as agent

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"access_token": "t"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as closed:  # a proxy address nothing listens on
        closed.bind(("127.0.0.1", 0))
        proxy_port = closed.getsockname()[1]
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = f"http://127.0.0.1:{server.server_port}/metadata/identity/oauth2/token"
    try:
        assert agent.request("GET", url, {"Metadata": "true"}, timeout=5, direct=True) == (
            200,
            b'{"access_token": "t"}',
        )
        with pytest.raises(urllib.error.URLError):  # what the agent did before: through the dead proxy
            agent.request("GET", url, {"Metadata": "true"}, timeout=5)
    finally:
        server.shutdown()
