"""One error type for every kind of bad input.

Every loader in simmoe raises :class:`InputError` with the file (or other source), the field
and a short message. The CLI prints ``error: <file>: <field>: <message>`` on one line and
exits with status 2; nothing else in the code base catches it.
"""
from __future__ import annotations


class InputError(Exception):
    """Bad user input: a scenario, trace, profile, sweep file or CLI value."""

    def __init__(self, source: str, field: str, message: str):
        # one line, whatever a parser's message or a file name holds
        self.source, self.field, self.message = (" ".join(str(x).splitlines()) for x in (source, field, message))
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.field) if p]
        return ": ".join(parts + [self.message])
