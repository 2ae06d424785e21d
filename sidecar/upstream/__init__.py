"""Upstream: the one model server behind the proxy. `server.Upstream` (its URL, routes, health and own pages,
and `send`), over `pool.ConnectionPool` (keep-alive HTTP/1.1 connections of our own) whose answers are
`response.UpstreamResponse` (and its failures), and `deadline` (first byte, idle and total limits on one
ticker), and `models` (the model list: names and context lengths). Its face: `server`, `response`, `deadline`,
`models`.
"""

__all__ = ["deadline", "models", "response", "server"]
