"""A Server-Sent Events reader (the WHATWG event-stream format), enough for the job stream:
`id`, `event`, `data` (multi-line), `retry` ignored, comments (keep-alives) surfaced as None so
a reader can check its deadline while the stream is idle."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None


def events(lines: Iterable[str]) -> Iterator[Event | None]:
    """Events from the stream's lines; None for each comment line."""
    kind, data, last_id = "message", [], None
    for line in lines:
        line = line.rstrip("\r")
        if line == "":
            if data:
                yield Event(kind, "\n".join(data), last_id)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
