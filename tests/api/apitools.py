"""Constants and the server handle shared by the API tests (a plain module: conftest is not importable by name)."""
from __future__ import annotations

from dataclasses import dataclass

API_KEY = "test-key-7f3a9c2e5b"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
MODEL_ID = f"{DEFAULT_NAME}@transformers"



@dataclass
class ApiServer:
    ctx: object
    demo: object
    api: object          # webui.api.OpenAIApi: its queue records what each request did
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, key: str | None = API_KEY, **kwargs):
        from openai import OpenAI
        kwargs.setdefault("timeout", 120)
        return OpenAI(base_url=self.base_url, api_key=key or "none", max_retries=0, **kwargs)

    def headers(self, **extra) -> dict:
        return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **extra}

