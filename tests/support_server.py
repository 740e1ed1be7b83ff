"""Start LLMasOS's own OpenAI-compatible server on 127.0.0.1 for end-to-end tests of its clients (eval, SDK)."""

from __future__ import annotations

import atexit
from pathlib import Path

from llmasos.server.serving import Service, free_port, load_served_model
from llmasos.server.state import ServerSettings

_services: dict[Path, Service] = {}


def start_test_server(model_dir: Path) -> str:
    """Serve `model_dir` (float32, under the model id "test-model") on a free loopback port in a background thread;
    return the base URL once /health answers. One server per checkpoint, stopped when the test process exits."""
    model_dir = Path(model_dir)
    service = _services.get(model_dir)
    if service is None:
        served = load_served_model(model_dir, "test-model", dtype="float32")
        service = Service({served.id: served}, ServerSettings(host="127.0.0.1", port=free_port())).start()
        _services[model_dir] = service
        atexit.register(service.stop)
    return service.base_url
