"""The Target interface: SSH sources per target, the dry-run's honest rules, loopback-only local VMs."""

from __future__ import annotations

import http.server
import ipaddress
import json
import threading
from pathlib import Path

import pytest

from orchestrator.errors import UserInputError
from orchestrator.targets import open_target, opens_to_internet
from orchestrator.targets.dryrun import DETECTED_PLACEHOLDER, DryRunTarget
from orchestrator.targets.localvm.addresses import AddressBook, loopback_for


@pytest.mark.parametrize(
    "cidrs",
    [["0.0.0.0/0"], ["::/0"], ["0.0.0.0/1", "128.0.0.0/1"], ["*"], ["Internet"], ["10.0.0.0/8", "0.0.0.0/0"]],
)
def test_every_way_of_opening_port_22_to_the_internet_is_recognised(cidrs: list[str]) -> None:
    assert opens_to_internet(cidrs)


def test_narrow_sources_are_not_the_internet() -> None:
    assert not opens_to_internet(["203.0.113.7/32", "0.0.0.0/1"])


def test_azure_refuses_an_empty_or_open_source_list_unless_any_is_written(tmp_path: Path) -> None:
    azure = open_target("azure", tmp_path)
    said: list[str] = []
    with pytest.raises(UserInputError, match="allowed_cidrs is empty"):
        azure.ssh_sources([], "job.yaml", said.append)
    with pytest.raises(UserInputError, match="opens port 22 to the whole Internet"):
        azure.ssh_sources(["0.0.0.0/1", "128.0.0.0/1"], "job.yaml", said.append)
    assert azure.ssh_sources(["any"], "job.yaml", said.append).cidrs == ["any"]
    assert "open to the whole Internet" in said[-1]


def test_azure_auto_detects_the_users_address_from_a_loopback_echo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"203.0.113.9\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ORCH_IP_ECHO_URL", f"http://127.0.0.1:{server.server_port}/")
    try:
        sources = open_target("azure", tmp_path).ssh_sources(["auto", "198.51.100.0/24"], "job.yaml", print)
    finally:
        server.shutdown()
    assert sources.cidrs == ["198.51.100.0/24", "203.0.113.9/32"]
    assert sources.labels["203.0.113.9/32"].startswith("your address")


def test_the_dry_run_shows_the_rule_a_real_run_would_create_and_warns_where_it_would_refuse(tmp_path: Path) -> None:
    dry = DryRunTarget(tmp_path, of="azure")
    auto = dry.ssh_sources(["auto"], "job.yaml", print)
    assert auto.cidrs == [DETECTED_PLACEHOLDER] and auto.labels[DETECTED_PLACEHOLDER] == (
        "your address, detected at run time"
    )
    assert not auto.warnings, "auto opens SSH to one address: nothing to warn about"
    open_ = dry.ssh_sources(["0.0.0.0/0"], "job.yaml", print)
    assert open_.cidrs == ["any"] and "a real run would refuse" in open_.warnings[0]
    assert "a real run would refuse" in dry.ssh_sources([], "job.yaml", print).warnings[0]
    assert DryRunTarget(tmp_path, of="local").ssh_sources([], "job.yaml", print).cidrs == ["127.0.0.1/32"]


def test_each_run_gets_its_own_loopback_block_and_blocks_are_reused_when_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_LOCAL_ADDRESSES", str(tmp_path / "machine" / "addresses.json"))
    book = AddressBook(tmp_path)
    a = book.block_of("orch-a", set())
    b = book.block_of("orch-b", {"orch-a"})
    assert a != b and book.block_of("orch-a", {"orch-a", "orch-b"}) == a
    addresses = [loopback_for(a, "10.42.0.4"), loopback_for(a, "10.42.0.5"), loopback_for(b, "10.42.0.4")]
    assert len(set(addresses)) == 3
    assert all(ipaddress.ip_address(x).is_loopback for x in addresses)
    assert book.block_of("orch-c", {"orch-b"}) == a, "orch-a has no VM left: its block is free again"


def test_two_state_directories_never_share_a_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table is the machine's, not the state directory's: a second checkout (or a parallel test
    worker) with a group of the same name gets another block while the first one's VM lives."""
    monkeypatch.setenv("ORCH_LOCAL_ADDRESSES", str(tmp_path / "machine" / "addresses.json"))
    first, second = tmp_path / "one" / "vms", tmp_path / "two" / "vms"
    vm = first / "orch-same-vm0"
    vm.mkdir(parents=True)
    (vm / "vm.json").write_text(json.dumps({"resource_group": "orch-same"}))
    a = AddressBook(first).block_of("orch-same", {"orch-same"})
    b = AddressBook(second).block_of("orch-same", set())
    assert a != b
    (vm / "vm.json").unlink()  # the first one's VM is gone: its block may be handed out again
    assert AddressBook(second).block_of("orch-other", {"orch-same"}) == a
