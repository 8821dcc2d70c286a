"""The local VM's metadata service answers as Azure's IMDS does: the Metadata header rule, the
instance document from the VM's record, scheduled events and their early approval."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bootstrap import TEMPLATES
from orchestrator.remote.autostop import RESOURCE as ARM_AUDIENCE  # a token's audience: a name, never dialled
from orchestrator.targets.localvm.imds import Imds, ImdsRequest, ImdsResponse

RECORD = {
    "id": "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/orch-r1/providers/"
    "Microsoft.Compute/virtualMachines/r1-0",
    "name": "r1-0",
    "type": "Microsoft.Compute/virtualMachines",
    "location": "eastus",
    "zones": ["2"],
    "tags": {"orchestrator-run": "r1"},
    "properties": {
        "vmId": "3f1c0b7e-0000-4000-8000-000000000001",
        "hardwareProfile": {"vmSize": "Standard_NC4as_T4_v3"},
        "priority": "Spot",
        "evictionPolicy": "Delete",
    },
}


class Served:
    def __init__(self, imds: Imds, loop: asyncio.AbstractEventLoop, url: str) -> None:
        self.imds, self.loop, self.url = imds, loop, url

    def call(self, path: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        try:
            with opener.open(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture
def served() -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    imds = Imds(lambda: RECORD)
    port = asyncio.run_coroutine_threadsafe(imds.start("127.0.0.1"), loop).result(5)
    yield Served(imds, loop, f"http://127.0.0.1:{port}")
    asyncio.run_coroutine_threadsafe(_shut(imds), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


META = {"Metadata": "true"}


def test_without_the_metadata_header_every_route_is_refused(served: Served) -> None:
    for path in ("/metadata/instance?api-version=2021-02-01", "/metadata/scheduledevents?api-version=2020-07-01"):
        status, body = served.call(path)
        assert status == 400 and body == {"error": "Bad request. Required metadata header not specified"}
    status, body = served.call("/metadata/instance?api-version=2021-02-01", headers={"Metadata": "false"})
    assert status == 400
    status, body = served.call("/metadata/instance", headers=META)
    assert status == 400 and "api-version" in body["error"]
    status, _ = served.call("/metadata/nothing?api-version=2021-02-01", headers=META)
    assert status == 404
    proxied = {**META, "X-Forwarded-For": "10.0.0.1"}
    assert served.call("/metadata/instance?api-version=2021-02-01", headers=proxied)[0] == 400


def test_the_instance_document_comes_from_the_vm_record(served: Served) -> None:
    status, body = served.call("/metadata/instance?api-version=2021-02-01", headers=META)
    assert status == 200
    compute = body["compute"]
    assert {k: compute[k] for k in ("name", "vmId", "resourceGroupName", "subscriptionId", "location")} == {
        "name": "r1-0",
        "vmId": "3f1c0b7e-0000-4000-8000-000000000001",
        "resourceGroupName": "orch-r1",
        "subscriptionId": "11111111-1111-1111-1111-111111111111",
        "location": "eastus",
    }
    assert (compute["zone"], compute["vmSize"], compute["priority"], compute["evictionPolicy"]) == (
        "2",
        "Standard_NC4as_T4_v3",
        "Spot",
        "Delete",
    )


def test_a_preempt_is_announced_and_a_start_request_approves_it(served: Served) -> None:
    status, empty = served.call("/metadata/scheduledevents?api-version=2020-07-01", headers=META)
    assert status == 200 and empty["Events"] == []
    not_before = time.time() + 30
    event = asyncio.run_coroutine_threadsafe(_schedule(served.imds, not_before), served.loop).result(5)
    status, doc = served.call("/metadata/scheduledevents?api-version=2020-07-01", headers=META)
    assert doc["DocumentIncarnation"] > empty["DocumentIncarnation"]
    (announced,) = doc["Events"]
    assert announced["EventId"] == event
    assert (announced["EventType"], announced["EventStatus"], announced["EventSource"]) == (
        "Preempt",
        "Scheduled",
        "Platform",
    )
    assert (announced["ResourceType"], announced["Resources"]) == ("VirtualMachine", ["r1-0"])
    assert announced["NotBefore"].endswith(" GMT")
    assert abs(parsedate_to_datetime(announced["NotBefore"]).timestamp() - not_before) < 1
    waiting = asyncio.run_coroutine_threadsafe(served.imds.events.due(served.imds.events.events[0]), served.loop)
    status, _ = served.call(
        "/metadata/scheduledevents?api-version=2020-07-01",
        method="POST",
        body={"StartRequests": [{"EventId": event}]},
        headers=META,
    )
    assert status == 200
    waiting.result(5)  # approved: due long before NotBefore
    status, _ = served.call("/metadata/scheduledevents?api-version=2020-07-01", method="POST", body=[1], headers=META)
    assert status == 400


def test_another_module_registers_a_route(served: Served) -> None:
    def token(request: ImdsRequest) -> ImdsResponse:
        return ImdsResponse(200, {"resource": request.query.get("resource")})

    served.imds.add_route("/metadata/identity/oauth2/token", token)
    status, body = served.call(
        f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM_AUDIENCE}", headers=META
    )
    assert (status, body) == (200, {"resource": ARM_AUDIENCE})


async def _schedule(imds: Imds, not_before: float, vm: str = "r1-0") -> str:
    return imds.events.schedule("Preempt", vm, not_before).event_id


async def _shut(imds: Imds) -> None:
    imds.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)  # the last connection's close


def test_the_vm_side_watcher_reads_the_endpoint_from_the_environment(served: Served, tmp_path: Path) -> None:
    """templates/preempt-watch.py asks ORCH_IMDS_ENDPOINT (never Azure's link-local address here) and leaves the
    marker the watching orchestrator waits on once a Preempt is scheduled."""
    marker = tmp_path / "preempted"
    marker.write_text("{}")  # left by the run before a restart on the same disk: old news
    env = {**os.environ, "ORCH_IMDS_ENDPOINT": served.url}
    watcher = subprocess.Popen([sys.executable, str(TEMPLATES / "preempt-watch.py"), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 10
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not marker.exists(), "the old marker is taken away at start"
        # A Preempt about another VM (the event lists the VMs it is about) is not this VM's.
        seen: list[int] = []  # the document incarnations the watcher was served
        serve = served.imds.routes["/metadata/scheduledevents"]["GET"]

        def counting(request: ImdsRequest) -> Any:
            seen.append(served.imds.events.incarnation)
            return serve(request)

        served.imds.add_route("/metadata/scheduledevents", counting)
        others = asyncio.run_coroutine_threadsafe(_schedule(served.imds, time.time() + 30, "r1-1"), served.loop)
        others.result(5)
        newer = served.imds.events.incarnation
        deadline = time.monotonic() + 10
        while seen.count(newer) < 2 and time.monotonic() < deadline:  # read it, then once more after
            time.sleep(0.05)
        assert seen.count(newer) >= 2
        assert watcher.poll() is None and not marker.exists()
        event = asyncio.run_coroutine_threadsafe(_schedule(served.imds, time.time() + 30), served.loop).result(5)
        assert watcher.wait(timeout=20) == 0
    finally:
        watcher.kill()
    written = json.loads(marker.read_text())
    assert (written["EventId"], written["EventType"]) == (event, "Preempt")
