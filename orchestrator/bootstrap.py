"""What a VM is told at boot: the cloud-init document rendered from templates/, as custom data.

Pure (no I/O beyond reading the template), so tests can parse what a VM would receive.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@cache
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # YAML and shell, not HTML
    )


def render(template: str, **values: Any) -> str:
    return str(_environment().get_template(template).render(**values))


def cloud_init(
    *,
    run_id: str,
    vm_name: str,
    rank: int,
    host_private_key: str,
    host_public_key: str,
    user: str = "azureuser",
    max_duration: int = 4 * 3600,
    gpu: bool = False,
) -> str:
    return render(
        "cloud-init.yaml.j2",
        run_id=run_id,
        vm_name=vm_name,
        rank=rank,
        host_private_key=host_private_key.strip(),
        host_public_key=host_public_key,
        user=user,
        max_duration=int(max_duration),
        gpu=gpu,
    )


def as_custom_data(document: str) -> str:
    return base64.b64encode(document.encode()).decode()
