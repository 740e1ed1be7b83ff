"""Server-sent events survive every character a model can generate: U+2028, U+2029 and NEL are line ends for
Python's str.splitlines (and so for clients that split lines with it, as httpx's aiter_lines has), so inside an
event's JSON they are written escaped. Found by the replica test: a random model's stream cut in two."""

from __future__ import annotations

import json

from llmasos.server.streaming import ChunkFormat, sse

TRICKY = "a\u2028b\u2029c\x85d\x1ce\x0bf\rg\nh é 日本 🙂"


def test_events_are_one_line_for_every_line_splitter_and_round_trip():
    events = [sse({"text": TRICKY}), ChunkFormat({"id": "x", "model": TRICKY})({"index": 0, "text": TRICKY})]
    for event in events:
        assert event.endswith("\n\n")
        body = event[:-2]
        assert len(body.splitlines()) == 1 and "\r" not in body and "\n" not in body
    assert json.loads(events[0][6:-2])["text"] == TRICKY
    chunk = json.loads(events[1][6:-2])
    assert chunk["model"] == TRICKY and chunk["choices"][0]["text"] == TRICKY
    assert "é 日本 🙂" in sse({"text": TRICKY})  # other characters stay UTF-8, unescaped
