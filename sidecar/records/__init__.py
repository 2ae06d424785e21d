"""Records: the usage row path. Every proxied request ends in exactly one `record.RequestRecord`; the
`writer.BatchWriter` takes its row off the response path into the store in batches, journaled by `spool` (a
line per row, `rows` says how) so nothing accepted is lost; `retention.Retention` deletes rows past their age.
Its face: `record`, `writer`, `retention`.
"""

__all__ = ["record", "retention", "writer"]
