"""Records: the usage row path. Every proxied request ends in exactly one `record.RequestRecord`; the
`writer.BatchWriter` takes its row off the response path into the store in batches, journaled by `spool` (a
line per row, `rows` says how) so nothing accepted is lost; `retention.Retention` deletes rows past their age;
`export.Exporter` pushes stored rows out as CloudEvents from a cursor in the store. Its face: `record`, `writer`,
`retention`, `export`.
"""

__all__ = ["export", "record", "retention", "writer"]
