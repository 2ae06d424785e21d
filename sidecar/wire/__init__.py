"""Wire: the OpenAI-compatible wire format, pure (no I/O, no clock, no state): which routes exist and what they
are (`routes`), a request body read as a call (`body`), the headers that cross and who the client is
(`headers`), the SSE stream scanned for usage (`sse`), usage as each API says it (`usage`) and a prompt's token
estimate (`tokens`). Every module is its face: the pipeline, limits, audit and ops read the wire through them.
"""

__all__ = ["body", "headers", "routes", "sse", "tokens", "usage"]
