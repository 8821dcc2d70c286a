"""azure/errors.py classifies on ARM's error code and details, using the bodies Azure really sends.

Each body goes through the real SDK (ComputeManagementClient over an azure-core transport that
answers from this file), so the exception, its `.error` and its response are what a real call gets.
Sources of the bodies:
- MissingSubscriptionRegistration: Azure/msrestazure-for-python#53 and Azure/azure-sdk-for-node#2305
  (target names the namespace), nforgeio/neonKUBE#1670 (409 Conflict, Microsoft.Compute).
- OperationNotAllowed, disk: skypilot-org/skypilot#2219, Azure/azure-sdk-for-python#23051 (409, target
  osDisk.diskSizeGB).
- OperationNotAllowed, quota: the emulator's message, in Azure's documented wording.
- RequestDisallowedByPolicy: azure-docs automation/enforce-job-execution-hybrid-worker.md (403, top-level
  additionalInfo of type PolicyViolation) and the Azure Resource Manager troubleshooting article.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from orchestrator.azure.errors import (
    DiskTooSmallError,
    PolicyDeniedError,
    ProviderNotRegisteredError,
    QuotaExceededError,
    classify,
)
from orchestrator.errors import EXIT_AZURE_REFUSED, CloudError

SUB = "22222222-2222-2222-2222-222222222222"

MISSING_REGISTRATION: dict[str, Any] = {
    "error": {
        "code": "MissingSubscriptionRegistration",
        "message": "The subscription is not registered to use namespace 'Microsoft.Compute'. See "
        "https://aka.ms/rps-not-found for how to register subscriptions.",
        "details": [
            {
                "code": "MissingSubscriptionRegistration",
                "target": "Microsoft.Compute",
                "message": "The subscription is not registered to use namespace 'Microsoft.Compute'. See "
                "https://aka.ms/rps-not-found for how to register subscriptions.",
            }
        ],
    }
}

DISK_TOO_SMALL = {
    "error": {
        "code": "OperationNotAllowed",
        "message": "The specified disk size 50 GB is smaller than the size of the corresponding disk in the VM "
        "image: 64 GB. This is not allowed. Please choose equal or greater size or do not specify an explicit size.",
        "target": "osDisk.diskSizeGB",
    }
}

QUOTA = {
    "error": {
        "code": "OperationNotAllowed",
        "message": "Operation could not be completed as it results in exceeding approved standardNCASv3_T4Family "
        "Cores quota. Additional details - Deployment Model: Resource Manager, Location: eastus, Current Limit: 8, "
        "Current Usage: 4, Additional Required: 8, (Minimum) New Limit Required: 12. Submit a request for Quota "
        "increase at https://aka.ms/ProdportalCRP/#blade/Microsoft_Azure_Capacity/UsageAndQuota.ReactView",
    }
}

OTHER_NOT_ALLOWED = {
    "error": {
        "code": "OperationNotAllowed",
        "message": "Operation 'start' is not allowed on VM 'demo-0' since the VM is marked for deletion. You can "
        "only retry the Delete operation (or wait for an ongoing one to complete).",
    }
}

_ASSIGNMENT = f"/subscriptions/{SUB}/providers/Microsoft.Authorization/policyAssignments/b7f2d1c0e4a94f6c9a1e0c3d"
_DEFINITION = "/providers/Microsoft.Authorization/policyDefinitions/cccc23c7-8427-4f53-ad12-b6a63eb452b3"
POLICY = {
    "error": {
        "code": "RequestDisallowedByPolicy",
        "target": "demo-abc123-0",
        "message": "Resource 'demo-abc123-0' was disallowed by policy. Policy identifiers: "
        + json.dumps(
            [
                {
                    "policyAssignment": {"name": "Allowed VM sizes (prod)", "id": _ASSIGNMENT},
                    "policyDefinition": {"name": "Allowed virtual machine size SKUs", "id": _DEFINITION},
                }
            ]
        )
        + ".",
        "additionalInfo": [
            {
                "type": "PolicyViolation",
                "info": {
                    "policyDefinitionDisplayName": "Allowed virtual machine size SKUs",
                    "evaluationDetails": {
                        "evaluatedExpressions": [
                            {
                                "result": "False",
                                "expressionKind": "Field",
                                "expression": "Microsoft.Compute/virtualMachines/sku.name",
                                "path": "properties.hardwareProfile.vmSize",
                                "expressionValue": "Standard_NC4as_T4_v3",
                                "targetValue": ["Standard_D2s_v5", "Standard_D4s_v5"],
                                "operator": "In",
                            }
                        ]
                    },
                    "policyDefinitionId": _DEFINITION,
                    "policyDefinitionName": "cccc23c7-8427-4f53-ad12-b6a63eb452b3",
                    "policyDefinitionEffect": "Deny",
                    "policyAssignmentId": _ASSIGNMENT,
                    "policyAssignmentName": "b7f2d1c0e4a94f6c9a1e0c3d",
                    "policyAssignmentDisplayName": "Allowed VM sizes (prod)",
                    "policyAssignmentScope": f"/subscriptions/{SUB}",
                    "policyAssignmentParameters": {
                        "listOfAllowedSKUs": {"value": ["Standard_D2s_v5", "Standard_D4s_v5"]}
                    },
                },
            }
        ],
    }
}


class _Credential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("token", 2_000_000_000)


class _Canned(BaseAdapter):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        data = json.dumps(self.body).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(data))}
        response = requests.Response()
        response.status_code = self.status
        response.headers = CaseInsensitiveDict(headers)
        response.raw = HTTPResponse(
            body=io.BytesIO(data), headers=headers, status=self.status, preload_content=False, decode_content=False
        )
        response.url = request.url or ""
        response.request = request
        response.reason = {403: "Forbidden", 409: "Conflict"}.get(self.status, "Error")
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass


def sdk_error(status: int, body: dict[str, Any]) -> BaseException:
    """The exception the real SDK raises when a VM PUT is answered with `status` and `body`."""
    from azure.mgmt.compute import ComputeManagementClient

    session = requests.Session()
    session.mount("https://", _Canned(status, body))
    client = ComputeManagementClient(
        _Credential(), SUB, transport=RequestsTransport(session=session, session_owner=False), retry_total=0
    )
    vm: Any = {"location": "eastus", "properties": {"hardwareProfile": {"vmSize": "Standard_NC4as_T4_v3"}}}
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as info:
        client.virtual_machines.begin_create_or_update("orch-demo-abc123", "demo-abc123-0", vm)
    return info.value


def test_missing_registration_names_the_namespace_and_the_command() -> None:
    err = classify(sdk_error(409, MISSING_REGISTRATION), resource="virtualMachines demo-abc123-0")
    assert isinstance(err, ProviderNotRegisteredError)
    assert err.namespace == "Microsoft.Compute" and err.code == "MissingSubscriptionRegistration"
    assert "az provider register --namespace Microsoft.Compute" in str(err)
    assert err.exit_code == EXIT_AZURE_REFUSED
    assert "quota" not in str(err).lower()


def test_missing_registration_without_details_reads_the_namespace_from_the_message() -> None:
    body = {"error": {**MISSING_REGISTRATION["error"], "details": []}}
    body["error"]["message"] = body["error"]["message"].replace("Microsoft.Compute", "Microsoft.DevTestLab")
    err = classify(sdk_error(409, body))
    assert isinstance(err, ProviderNotRegisteredError) and err.namespace == "Microsoft.DevTestLab"
    assert "az provider register --namespace Microsoft.DevTestLab" in str(err)


def test_a_disk_smaller_than_the_image_is_not_a_quota_problem() -> None:
    err = classify(sdk_error(409, DISK_TOO_SMALL), resource="virtualMachines demo-abc123-0")
    assert isinstance(err, DiskTooSmallError) and not isinstance(err, QuotaExceededError)
    assert (err.requested_gb, err.image_gb) == (50, 64)
    assert "resources.disk_gb to at least 64" in str(err) and "quota" not in str(err).lower()
    assert err.exit_code == EXIT_AZURE_REFUSED


def test_the_quota_family_of_operation_not_allowed_is_still_parsed() -> None:
    err = classify(sdk_error(409, QUOTA))
    assert isinstance(err, QuotaExceededError)
    assert (err.family, err.region, err.limit, err.usage, err.required) == (
        "standardNCASv3_T4Family",
        "eastus",
        8,
        4,
        8,
    )
    assert "limit 8, in use 4, this run needs 8 more" in str(err)


def test_any_other_operation_not_allowed_is_reported_as_is() -> None:
    err = classify(sdk_error(409, OTHER_NOT_ALLOWED))
    assert type(err) is CloudError and err.code == "OperationNotAllowed"
    assert "marked for deletion" in str(err) and "quota" not in str(err).lower()
    assert err.exit_code == EXIT_AZURE_REFUSED


def test_a_policy_denial_says_which_policy_denied_what() -> None:
    err = classify(sdk_error(403, POLICY), resource="virtualMachines demo-abc123-0")
    assert isinstance(err, PolicyDeniedError) and err.code == "RequestDisallowedByPolicy"
    text = str(err)
    assert "'Allowed virtual machine size SKUs'" in text
    assert "cccc23c7-8427-4f53-ad12-b6a63eb452b3" in text  # policyDefinitionName
    assert "'Allowed VM sizes (prod)'" in text and "b7f2d1c0e4a94f6c9a1e0c3d" in text  # the assignment
    assert "virtualMachines demo-abc123-0" in text
    assert err.policies[0]["policyDefinitionEffect"] == "Deny"
    assert err.exit_code == EXIT_AZURE_REFUSED


def test_a_policy_violation_nested_in_details_is_found() -> None:
    inner = {**POLICY["error"]}
    body = {"error": {"code": "RequestDisallowedByPolicy", "message": "Denied.", "details": [inner]}}
    err = classify(sdk_error(403, body))
    assert isinstance(err, PolicyDeniedError) and err.policies
    assert "'Allowed virtual machine size SKUs'" in str(err)


def test_a_policy_denial_without_additional_info_keeps_the_message() -> None:
    body = {
        "error": {
            "code": "RequestDisallowedByPolicy",
            "message": "The resource action 'Microsoft.Network/publicIpAddresses/write' is disallowed by one or more "
            "policies. Policy identifier(s): '/subscriptions/x/providers/Microsoft.Authorization/policyDefinitions/p'.",
        }
    }
    err = classify(sdk_error(403, body))
    assert isinstance(err, PolicyDeniedError) and "publicIpAddresses/write" in str(err)
