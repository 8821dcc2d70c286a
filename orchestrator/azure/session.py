"""Credentials, subscription and SDK clients.

An AzureSession is what the provisioner, teardown and preflight talk to. Which ARM answers (real
Azure, or the emulator behind a transport) is the target's business (orchestrator/targets/): this
module knows nothing of the emulator.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.azure.polling import make_polling, schedule_for
from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import CredentialsError


@dataclass
class AzureSession:
    subscription_id: str
    credential: Any
    clock: Clock = field(default_factory=SystemClock)
    transport: Any = None  # None: azure-core's default HTTP transport
    poll_scale: float = 1.0
    # Told about every retry azure-core makes ("Azure answered 500 to PUT ...; retry 3 of 10"), so a
    # throttling or 5xx storm is seen as it happens, not as minutes of silence.
    on_retry: Callable[[str], None] | None = None
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _client(self, name: str) -> Any:
        with self._lock:
            if name not in self._clients:
                self._clients[name] = self._build(name)
            return self._clients[name]

    def _build(self, name: str) -> Any:
        # azure-core retries 429/5xx and honours Retry-After; its default of 3 status retries gives up
        # too early in a throttling storm for an unattended nightly job.
        kwargs: dict[str, Any] = {
            "retry_policy": _reporting_retry_policy(
                lambda text: self.on_retry(text) if self.on_retry is not None else None,
                retry_total=RETRIES,
                retry_status=RETRIES,
                retry_backoff_factor=0.8,
                retry_backoff_max=60,
            )
        }
        if self.transport is not None:
            kwargs["transport"] = self.transport
        if name == "resource":
            from azure.mgmt.resource.resources import ResourceManagementClient

            return _without_auto_registration(ResourceManagementClient(self.credential, self.subscription_id, **kwargs))
        if name == "compute":
            from azure.mgmt.compute import ComputeManagementClient

            return _without_auto_registration(ComputeManagementClient(self.credential, self.subscription_id, **kwargs))
        from azure.mgmt.network import NetworkManagementClient

        return _without_auto_registration(NetworkManagementClient(self.credential, self.subscription_id, **kwargs))

    def prefetch(self, *names: str) -> None:
        """Build these clients ("resource", "compute", "network") in a background thread, in order,
        while the caller waits on ARM anyway: the network SDK alone takes ~0.3 s to import, and
        provisioning needs it right after the group is made. Each client is still built once, under
        the lock: one the caller asks for meanwhile waits for the build under way. A failed build is
        left to the caller's own, which says why."""

        def build() -> None:
            for name in names:
                with contextlib.suppress(Exception):
                    self._client(name)

        # Not a daemon: a command that ends early waits for the import under way rather than
        # finalizing the interpreter while another thread holds an import lock.
        threading.Thread(target=build, name="sdk-clients").start()

    @property
    def resources(self) -> Any:
        return self._client("resource")

    @property
    def compute(self) -> Any:
        return self._client("compute")

    @property
    def network(self) -> Any:
        return self._client("network")

    def polling(self, kind: str) -> Any:
        """A fresh poller strategy for one LRO of `kind` (an ARM type, 'delete' or 'group-delete')."""
        return make_polling(schedule_for(kind, self.poll_scale), self.clock)


RETRIES = 10


def _without_auto_registration(client: Any) -> Any:
    """The client with azure-mgmt-core's ARMAutoResourceProviderRegistrationPolicy taken out of its pipeline.

    On a 409 MissingSubscriptionRegistration that policy POSTs .../providers/{ns}/register itself and
    then polls the provider with real 10-second sleeps and no limit, silently; the generated clients
    put it in their policy list unconditionally and offer no setting to leave it out. The preflight
    (orchestrator/azure/preflight.py) registers the providers explicitly, bounded and said aloud, and
    any other 409 MissingSubscriptionRegistration is classified (azure/errors.py) and shown as is.
    The pipeline is rebuilt from the client's own policies, in order, minus that one.
    """
    from azure.core.pipeline import Pipeline
    from azure.mgmt.core.policies import ARMAutoResourceProviderRegistrationPolicy

    pipeline_client = client._client  # the generated client's ARMPipelineClient
    pipeline = pipeline_client._pipeline
    kept = [p for p in pipeline._impl_policies if not isinstance(p, ARMAutoResourceProviderRegistrationPolicy)]
    if len(kept) != len(pipeline._impl_policies):
        pipeline_client._pipeline = Pipeline(pipeline._transport, kept)
    return client


def _reporting_retry_policy(tell: Callable[[str], None], **settings: Any) -> Any:
    """azure-core's RetryPolicy (408/429/5xx, Retry-After honoured), saying each retry it makes."""
    from azure.core.pipeline import PipelineResponse
    from azure.core.pipeline.policies import RetryPolicy

    class ReportingRetryPolicy(RetryPolicy):  # type: ignore[misc,type-arg]
        def increment(self, settings: dict[str, Any], response: Any = None, error: Any = None) -> bool:
            more = bool(super().increment(settings, response=response, error=error))
            if more:
                done = RETRIES - settings["total"]
                request = getattr(response, "http_request", None)
                path = request.url.split("?")[0].split("/") if request else []
                what = f"{request.method} {'/'.join(path[-2:])}" if request else "a request"
                if isinstance(response, PipelineResponse):
                    cause = f"Azure answered {response.http_response.status_code}"
                else:
                    cause = f"the request failed ({type(error).__name__})"
                tell(f"{cause} to {what}; retry {done} of {RETRIES}")
            return more

    return ReportingRetryPolicy(**settings)


def resolve_subscription(flag: str | None) -> str:
    """--subscription, then AZURE_SUBSCRIPTION_ID, then the az CLI's default subscription."""
    if flag:
        return flag
    env = os.environ.get("AZURE_SUBSCRIPTION_ID", "").strip()
    if env:
        return env
    az = shutil.which("az")
    if az:
        try:
            out = subprocess.run(
                [az, "account", "show", "--query", "id", "-o", "tsv"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    raise CredentialsError(
        "No Azure subscription found: pass --subscription ID, set AZURE_SUBSCRIPTION_ID, or run `az login` "
        "(and `az account set -s ID`). Without Azure: `orchestrator run JOB --dry-run` shows a plan, and "
        "--target local runs the whole cycle on this machine."
    )


def azure_session(subscription: str | None) -> AzureSession:
    from azure.identity import DefaultAzureCredential

    sub = resolve_subscription(subscription)
    credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return AzureSession(subscription_id=sub, credential=credential)
