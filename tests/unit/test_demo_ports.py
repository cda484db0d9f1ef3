"""``pacs-agent demo`` starts ``serve``, which refuses to start when its API port is taken:
the demo moves its API to a free port rather than fail (tests run it beside other agents)."""

from __future__ import annotations

import socket

from pacs_agent.config import Settings
from pacs_agent.demo.run import api_port_for_demo


def _settings(port: int, enabled: bool = True) -> Settings:
    return Settings(api={"host": "127.0.0.1", "port": port, "enabled": enabled})


def test_the_demo_keeps_a_free_api_port_and_moves_off_a_taken_one() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        moved = api_port_for_demo(_settings(taken))
        assert moved is not None and moved != taken
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", moved))  # really free
    # Released: the configured port is kept.
    assert api_port_for_demo(_settings(taken)) == taken
    assert api_port_for_demo(_settings(taken, enabled=False)) is None
