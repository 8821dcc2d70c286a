"""Microsoft.DevTestLab: a VM's daily auto-shutdown schedule (a deallocation, which stops the bill).
The DevTestLab RP writes schedules synchronously: there is no operation to poll."""

from __future__ import annotations

import copy
import re

from orchestrator.emulator import validation as v
from orchestrator.emulator.store import T_SCHEDULE, T_VM, base
from orchestrator.emulator.typed import TypedResources, Write, Written
from orchestrator.emulator.validation import ArmFault


class DevTestLabRP(TypedResources):
    def _put_schedule(self, w: Write) -> Written:
        """A VM auto-shutdown schedule, validated as the DevTestLab RP does."""
        props = v.require(w.body, "properties", dict)
        if props.get("taskType") != "ComputeVmShutdownTask":
            raise v.invalid("The schedule's taskType must be ComputeVmShutdownTask.")
        if props.get("status", "Enabled") not in {"Enabled", "Disabled"}:
            raise v.invalid("The schedule's status must be Enabled or Disabled.")
        hhmm = str(v.require(props, "dailyRecurrence.time", str))
        if not re.fullmatch(r"([01]\d|2[0-3])[0-5]\d", hhmm):
            raise v.invalid(f"The value {hhmm} for dailyRecurrence.time is invalid; use HHmm.")
        v.require(props, "timeZoneId", str)
        target = str(v.require(props, "targetResourceId", str))
        vm = self.store.resources.get(target.lower())
        if vm is None or vm["type"] != T_VM:
            raise ArmFault(400, "InvalidResourceReference", f"Resource {target} referenced by {w.rid} was not found.")
        if w.name.lower() != f"shutdown-computevm-{vm['name']}".lower():
            raise v.invalid(f"A VM's auto-shutdown schedule must be named shutdown-computevm-{vm['name']}.")
        self._fault("PUT", T_SCHEDULE, w.rec, location=w.location)
        res = base(w.rid, w.name, T_SCHEDULE, w.location, w.body)
        res["properties"] = copy.deepcopy(props)
        return Written(res, [], None)
