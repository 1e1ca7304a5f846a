"""Fixtures: a tiny model served through a minimal OpenAI-compatible HTTP server.

The server (stdlib ``ThreadingHTTPServer`` on a loopback port) implements just
enough of ``POST /v1/chat/completions`` for the plugin: it turns the body into a
:class:`~caikit_core.records.GenerationRequest` and answers it with caikit's
bundled ``hf`` generator on a tiny random Llama, so the plugin's output can be
compared with the ``hf`` generator's own. It mimics vLLM where servers differ
(``continue_final_message``, ``stop_reason``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from caikit_core.records import GenerationRequest, Message, SamplingParams

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "skipped": "length"}


@dataclass
class FakeOpenAI:
    """Serves ``generator`` over HTTP; records what it receives."""

    generator: Any
    #: when set, requests without ``Authorization: Bearer <expected_key>`` get HTTP 401
    expected_key: str | None = None
    #: canned ``(status, body)`` answers, used (first first) before serving normally
    failures: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: return the choices in reverse order (clients must sort by ``index``)
    reverse_choices: bool = False
    #: ``(headers, body)`` of every request received
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    def reset(self) -> None:
        """Forget settings and history between tests."""
        self.expected_key = None
        self.failures.clear()
        self.reverse_choices = False
        self.received.clear()

    def answer(self, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for one chat-completions request."""
        with self.lock:
            self.received.append((headers, body))
            authorization = headers.get("authorization")
            if self.expected_key is not None and authorization != f"Bearer {self.expected_key}":
                return 401, {"error": {"message": "Incorrect API key provided"}}
            if self.failures:
                return self.failures.pop(0)
            messages = [Message(m["role"], m["content"]) for m in body["messages"]]
            prefix = ""
            if body.get("continue_final_message") and messages[-1].role == "assistant":
                prefix = messages[-1].content
                messages = messages[:-1]
            stop = body.get("stop") or ()
            stop = (stop,) if isinstance(stop, str) else tuple(stop)
            request = GenerationRequest(
                "served",
                tuple(messages),
                SamplingParams(
                    max_new_tokens=body.get("max_tokens", 16),
                    temperature=float(body.get("temperature", 1.0)),
                    top_p=float(body.get("top_p", 1.0)),
                    stop=stop,
                ),
                n=body.get("n", 1),
                seed=body.get("seed", 0),
                response_prefix=prefix,
            )
            generation = self.generator.generate([request])[0]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": _FINISH[reason],
                "stop_reason": stop[0] if reason == "stop" else None,
            }
            for i, (text, reason) in enumerate(
                zip(generation.texts, generation.finish_reasons, strict=True)
            )
        ]
        if self.reverse_choices:
            choices.reverse()
        return 200, {"object": "chat.completion", "model": body.get("model"), "choices": choices}


def _handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            if self.path != "/v1/chat/completions":
                status, payload = 404, {"error": {"message": f"no route {self.path}"}}
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, payload = server.answer(headers, body)
                except Exception as exc:  # report it to the client, as a server would
                    status, payload = 500, {"error": {"message": repr(exc)}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint folder."""
    import torch
    from caikit_core.testing.tiny_models import build_tiny_llama

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def hf(tiny_model: Path) -> Any:
    """caikit's bundled ``hf`` generator on the tiny model."""
    from caikit_hf.plugin import HFGeneratorConfig, build_generator

    return build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_model))


@pytest.fixture(scope="session")
def _server(hf: Any) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(hf)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_server: FakeOpenAI) -> FakeOpenAI:
    """The running fake server, with its settings and history cleared."""
    _server.reset()
    return _server
