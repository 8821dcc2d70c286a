"""Custom data as cloud-init reads it: the VM RP refuses a VM whose cloud-config would not parse."""

from __future__ import annotations

import base64
from typing import Any

import yaml


class CloudInitError(ValueError):
    pass


def parse_cloud_init(custom_data: str) -> dict[str, Any]:
    """Decode a VM's custom data the way cloud-init would; malformed documents raise CloudInitError."""
    try:
        text = base64.b64decode(custom_data, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise CloudInitError("custom data is not base64 of UTF-8 text") from None
    if not text.startswith("#cloud-config"):
        raise CloudInitError("custom data does not start with #cloud-config")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CloudInitError(f"cloud-config is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise CloudInitError("cloud-config must be a mapping")
    keys = doc.get("ssh_keys")
    if keys is not None and (not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values())):
        raise CloudInitError("ssh_keys must map key names to PEM or public key text")
    return doc
