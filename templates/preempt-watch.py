"""The VM side of spot eviction recovery, started by the job wrapper on a spot VM.

Polls the metadata service's scheduled events once a second; when a Preempt names this VM (its
`Resources`, checked against the instance metadata's compute.name; Azure
gives about 30 s), writes the marker (argv[1]) the watching orchestrator waits on, so it copies the
checkpoints home before the VM goes. On Azure the service is http://169.254.169.254; elsewhere (the
local target) ORCH_IMDS_ENDPOINT names it. Standard library only; never through a proxy.
"""

import contextlib
import json
import os
import sys
import time
import urllib.request

API = "2020-07-01"
HEADERS = {"Metadata": "true"}


def main() -> None:
    marker = sys.argv[1]
    with contextlib.suppress(OSError):  # a marker from before a restart on the same disk is old news
        os.remove(marker)
    endpoint = (os.environ.get("ORCH_IMDS_ENDPOINT") or "http://169.254.169.254").rstrip("/")
    url = f"{endpoint}/metadata/scheduledevents?api-version={API}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    me = None  # this VM's name, from the instance metadata: an event lists the VMs it is about
    while True:
        try:
            if me is None:
                ask = urllib.request.Request(f"{endpoint}/metadata/instance?api-version=2021-02-01", headers=HEADERS)
                with opener.open(ask, timeout=5) as r:
                    me = str(json.load(r).get("compute", {}).get("name", "")).lower()
            with opener.open(urllib.request.Request(url, headers=HEADERS), timeout=5) as r:
                doc = json.load(r)
            preempts = [
                e
                for e in doc.get("Events", [])
                if e.get("EventType") == "Preempt"
                and (not e.get("Resources") or me in {str(x).lower() for x in e["Resources"]})
            ]
            if preempts:
                tmp = marker + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(preempts[0], f)
                os.replace(tmp, marker)
                return
        except (OSError, ValueError):
            pass  # not answering yet, or a blip: ask again
        time.sleep(1)


if __name__ == "__main__":
    main()
