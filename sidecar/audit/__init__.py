"""Audit: opt-in capture of whole requests and answers, off the hot path. `capture.Auditor` decides what is
captured and folds it into an audit record (`aggregate` folds a stream into the answer the client would have
got: `chat` a chat stream, imported with msgspec only once one is audited, `responses` a Responses-API stream
into its `response` object); `bus.AuditBus` hands records to the sinks:
`db.DbSink` (through its own writer), `files.JsonlSink` and `files.StderrSink`. Its face is every module but
`aggregate`'s internals: `capture`, `aggregate`, `bus`, `db`, `files`.
"""

__all__ = ["aggregate", "bus", "capture", "db", "files"]
