"""A small HTTP client of the gateway, behind the CLI's client commands (`metalora adapt | jobs | adapters |
complete | download | upload`). Only httpx and pydantic-settings: it runs on any machine that can reach a
gateway, with none of the server's or trainer's dependencies loaded."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.settings import Settings

POLL_INTERVAL_S = 0.5
BAR_WIDTH = 30


class ClientSettings(BaseSettings):
    """Where the CLI's client commands send requests: METALORA_URL and METALORA_API_KEY."""

    model_config = SettingsConfigDict(env_prefix="METALORA_", extra="ignore")

    # Unset: the local gateway, on METALORA_PORT (the port `metalora serve` listens on).
    url: str | None = None
    # Sent as `Authorization: Bearer <key>` (from `metalora keys create`); unneeded when the gateway runs open.
    api_key: str | None = None

    def base_url(self) -> str:
        return (self.url or f"http://127.0.0.1:{Settings().port}").rstrip("/")


class ClientError(Exception):
    """The gateway answered with an error (its message and code), or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class MetaloraClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    @classmethod
    def from_env(cls) -> "MetaloraClient":
        settings = ClientSettings()
        return cls(settings.base_url(), settings.api_key)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "MetaloraClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the gateway at {self.http.base_url}: {type(exc).__name__}: {exc}"
                              ) from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    # ------------------------------------------------------------ jobs
    def adapt(self, adapter: str, examples: list[dict], options: dict[str, Any]) -> dict:
        return self.request("POST", "/adapt", json={"adapter": adapter, "examples": examples, **options}).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/adapt/{job_id}").json()

    def jobs(self, limit: int = 20, adapter: str | None = None, status: str | None = None) -> list[dict]:
        params = {k: v for k, v in {"limit": limit, "adapter": adapter, "status": status}.items() if v is not None}
        return self.request("GET", "/adapt", params=params).json()["data"]

    def wait(self, job_id: str, on_update=None, poll_s: float = POLL_INTERVAL_S) -> dict:
        """Poll the job until it ends; `on_update(job)` on every poll."""
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(poll_s)

    # ------------------------------------------------------------ init families
    def create_init(self, name: str, tasks: list[dict], options: dict[str, Any]) -> dict:
        """Queue an init family's meta-training: `tasks` = [{"name", "examples"}]; the job, followed like any."""
        return self.request("POST", "/v1/inits", json={"name": name, "tasks": tasks, **options}).json()

    def inits(self) -> list[dict]:
        return self.request("GET", "/v1/inits").json()["data"]

    # ------------------------------------------------------------ adapters and inference
    def adapters(self) -> list[dict]:
        return self.request("GET", "/v1/adapters").json()["data"]

    def base_model(self) -> str:
        return self.request("GET", "/v1/models").json()["data"][0]["id"]

    def complete(self, prompt: str, adapter: str | None = None, **sampling) -> Iterator[str]:
        """The completion's text, streamed chunk by chunk."""
        body = {"prompt": prompt, "stream": True, **sampling}
        if adapter:
            body["adapter"] = adapter
        else:
            body["model"] = self.base_model()
        try:
            with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    payload = line[5:].strip() if line.startswith("data:") else ""
                    if not payload or payload == "[DONE]":
                        continue
                    data = json.loads(payload)
                    if "error" in data:
                        raise ClientError(data["error"].get("message", "stream failed"))
                    for choice in data.get("choices") or []:
                        if choice.get("text"):
                            yield choice["text"]
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the gateway at {self.http.base_url}: {type(exc).__name__}") from None

    def download(self, name: str, out: Path, version: int | None = None) -> Path:
        params = {"version": version} if version else {}
        response = self.request("GET", f"/v1/adapters/{name}/download", params=params)
        out.write_bytes(response.content)
        return out

    def upload(self, name: str, paths: list[Path]) -> dict:
        """Upload an adapter folder, its two files, or one zip/tar archive of them as a new version of `name`."""
        if len(paths) == 1 and paths[0].is_dir():
            paths = [p for p in sorted(paths[0].iterdir()) if p.is_file()]
        files = [("files", (p.name, p.read_bytes())) for p in paths]
        return self.request("POST", f"/v1/adapters/{name}/versions", files=files).json()


def _error(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
        return ClientError(error["message"], response.status_code, error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ClientError(f"{response.status_code}: {response.text[:300]}", response.status_code)


def read_examples(path: Path) -> list[dict]:
    """One JSON object per line: {"prompt", "completion"} or {"messages": [...]}; blank lines are skipped."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as exc:
                raise ClientError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(example, dict):
                raise ClientError(f"{path}:{number}: not a JSON object")
            examples.append(example)
    return examples


class ProgressBar:
    """One line, rewritten in place on a terminal (a line per change elsewhere): step, total, loss, status."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stderr
        self.last = None

    def __call__(self, job: dict) -> None:
        total, step = job.get("total_steps") or 0, job.get("step") or 0
        filled = int(BAR_WIDTH * step / total) if total else 0
        loss = f" loss {job['loss']:.4f}" if job.get("loss") is not None else ""
        line = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] step {step}/{total or '?'}{loss} {job['status']}"
        if line == self.last:
            return
        self.last = line
        if self.out.isatty():
            self.out.write("\r" + line + ("\n" if job["status"] not in ("queued", "running") else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()
