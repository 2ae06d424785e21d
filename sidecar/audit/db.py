"""The `db` audit sink: records into the store's `audit_records` table through a BatchWriter of its own."""

from __future__ import annotations

from typing import Any

from sidecar.records.writer import BatchWriter


class DbSink:
    name = "db"

    def __init__(self, writer: BatchWriter, queue_size: int) -> None:
        self.writer = writer
        self.queue_size = queue_size
        self.dropped = 0

    def offer(self, line: bytes, record: dict[str, Any]) -> bool:
        if self.writer.queued() >= self.queue_size:
            self.dropped += 1
            return False
        self.writer.put(
            {
                "request_id": record["request_id"],
                "key_id": record.get("key_id"),
                "emitted_at": record["emitted_at"],
                "record": line.rstrip(b"\n").decode(),
            }
        )
        return True

    async def start(self) -> None:
        await self.writer.start()

    async def close(self, timeout: float) -> None:
        await self.writer.close()

    def results(self) -> dict[str, int]:
        return {"written": self.writer.written, "failed": self.writer.dead, "dropped": self.dropped}
