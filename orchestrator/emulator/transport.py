"""The azure-core transport that serves the real SDK from an in-process Emulator.

A RequestsTransport with a requests adapter mounted on https://management.azure.com: the SDK builds
its real URLs, runs its real pipeline (auth, retry, polling), and the adapter answers from the
emulator instead of the network. `sleep` goes to the emulator's clock, so the SDK's retry back-off
and LRO polling wait in emulated time.
"""

from __future__ import annotations

from typing import Any

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from orchestrator.emulator.arm import Emulator
from orchestrator.emulator.store import HOST


class _EmulatorAdapter(BaseAdapter):
    def __init__(self, emulator: Emulator) -> None:
        super().__init__()
        self.emulator = emulator

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        body = request.body
        if isinstance(body, str):
            body = body.encode()
        elif body is not None and not isinstance(body, bytes):
            body = b"".join(body)  # type: ignore[arg-type]
        result = self.emulator.handle(request.method or "GET", request.url or "", dict(request.headers), body)
        raw = HTTPResponse(
            body=_Body(result.body),  # type: ignore[arg-type]
            headers=result.headers,
            status=result.status,
            preload_content=False,
            decode_content=False,
        )
        response = requests.Response()
        response.status_code = result.status
        response.headers = CaseInsensitiveDict(result.headers)
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        response.reason = "OK" if result.status < 400 else "Error"
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass


class _Body:
    """A minimal file object for urllib3 that yields the emulator's bytes once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.closed = False

    def read(self, amt: int | None = None, *_: Any, **__: Any) -> bytes:
        end = len(self._data) if amt is None or amt < 0 else self._pos + amt
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


class EmulatorTransport(RequestsTransport):  # type: ignore[misc]
    def __init__(self, emulator: Emulator) -> None:
        session = requests.Session()
        session.mount(HOST, _EmulatorAdapter(emulator))
        super().__init__(session=session, session_owner=False)
        self.emulator = emulator

    def sleep(self, duration: float) -> None:
        self.emulator.clock.sleep(duration)


class EmulatorCredential:
    """Hands out a token the emulator accepts; stands in for DefaultAzureCredential offline."""

    def __init__(self, token: str = "emulator-token") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, 4_102_444_800)  # 2100-01-01: never refreshed

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        return AccessTokenInfo(self.token, 4_102_444_800)
