"""The schema: the DDL of every version and the migrations from one to the next, written once for both
backends in their own column types (`real`, `boolean`, `serial`), which `migrations` takes; a backend runs
`migrations(...)[v - 1]` to reach version v (`SqlStore.migrate`), one statement at a time (`statements`).
"""

from __future__ import annotations


def _ddl_request_log(real: str, boolean: str) -> str:
    return f"""CREATE TABLE request_log (
  request_id TEXT PRIMARY KEY, client_request_id TEXT, key_id TEXT, method TEXT NOT NULL, path TEXT NOT NULL,
  model TEXT, stream {boolean} NOT NULL, status INTEGER NOT NULL, outcome TEXT NOT NULL, error_code TEXT,
  prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, cached_tokens INTEGER,
  usage_source TEXT NOT NULL, upstream_status INTEGER, ttft_ms {real}, latency_ms {real} NOT NULL,
  bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL, chunks INTEGER NOT NULL,
  started_at {real} NOT NULL, finished_at {real} NOT NULL);
CREATE INDEX request_log_started ON request_log (started_at);
CREATE INDEX request_log_key_started ON request_log (key_id, started_at)"""


def schema_v1(real: str, boolean: str, serial: str) -> str:
    """Version 1 of the schema, in a backend's types: `real` (floats), `boolean`, `serial` (an id column)."""
    return f"""CREATE TABLE api_keys (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL, created_at {real} NOT NULL,
  expires_at {real}, revoked_at {real}, concurrency INTEGER, rpm INTEGER, tpm BIGINT, models TEXT, audit TEXT,
  updated_at {real} NOT NULL);
CREATE TABLE admin_audit_log (
  id {serial}, at {real} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT,
  changes TEXT NOT NULL, request_id TEXT);
{_ddl_request_log(real, boolean)};
CREATE TABLE audit_records (
  request_id TEXT PRIMARY KEY, key_id TEXT, emitted_at {real} NOT NULL, record TEXT NOT NULL);
CREATE INDEX audit_records_emitted ON audit_records (emitted_at)"""


SCHEMA_V3 = """ALTER TABLE api_keys ADD COLUMN budget_tokens BIGINT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT"""
"""Version 3: a key's token budget per period."""


MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


def statements(migration: str) -> list[str]:
    """A migration's statements (separated by `;` at a line's end)."""
    return [part.strip() for part in migration.split(";\n") if part.strip()]


def schema_v4(real: str) -> str:
    """Version 4: balances replicas borrow from (a key's budget per period), one row per key, kind, bucket."""
    return f"""CREATE TABLE limit_balances (
  key_id TEXT NOT NULL, dim TEXT NOT NULL, bucket TEXT NOT NULL, level {real} NOT NULL, granted {real} NOT NULL,
  updated_at {real} NOT NULL, PRIMARY KEY (key_id, dim, bucket))"""


def schema_v5(real: str) -> str:
    """Version 5: concurrency slots each replica holds for a key, until `expires_at` unless renewed."""
    return f"""CREATE TABLE limit_slots (
  key_id TEXT NOT NULL, replica TEXT NOT NULL, slots INTEGER NOT NULL, expires_at {real} NOT NULL,
  PRIMARY KEY (key_id, replica))"""


def schema_v2(real: str) -> str:
    """Version 2: named settings of the deployment (the pepper's fingerprint), one row each."""
    return f"CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {real} NOT NULL)"


def schema_v6(real: str) -> str:
    """Version 6: what each replica holds of a budget balance, until `expires_at` unless renewed (a killed
    replica's goes back to the balance then), and each balance's period, so that a stored row is charged to
    the balance of the period it started in."""
    return f"""ALTER TABLE limit_balances ADD COLUMN starts_at {real};
ALTER TABLE limit_balances ADD COLUMN ends_at {real};
CREATE TABLE limit_holders (
  key_id TEXT NOT NULL, dim TEXT NOT NULL, bucket TEXT NOT NULL, replica TEXT NOT NULL, outstanding {real} NOT NULL,
  expires_at {real} NOT NULL, PRIMARY KEY (key_id, dim, bucket, replica));
CREATE INDEX limit_holders_expires ON limit_holders (expires_at);
CREATE INDEX limit_holders_replica ON limit_holders (replica)"""


SCHEMA_V7 = """ALTER TABLE request_log ADD COLUMN cache_write_tokens INTEGER;
ALTER TABLE request_log ADD COLUMN reasoning_tokens INTEGER"""
"""Version 7: the usage details a row was missing: prompt tokens written to a cache, output tokens of reasoning."""


def schema_v8(real: str) -> str:
    """Version 8: a key's weight and priority class in the dispatch queue, and its prefix-cache group."""
    return f"""ALTER TABLE api_keys ADD COLUMN weight {real};
ALTER TABLE api_keys ADD COLUMN priority TEXT;
ALTER TABLE api_keys ADD COLUMN cache_group TEXT"""


def _export_cursors(real: str) -> str:
    return f"""CREATE TABLE export_cursors (
  name TEXT PRIMARY KEY, position TEXT NOT NULL, holder TEXT, lease_until {real}, updated_at {real} NOT NULL)"""


_V8_COLUMNS = (
    "request_id, client_request_id, key_id, method, path, model, stream, status, outcome, error_code, prompt_tokens, "
    "completion_tokens, total_tokens, cached_tokens, usage_source, upstream_status, ttft_ms, latency_ms, bytes_in, "
    "bytes_out, chunks, started_at, finished_at, cache_write_tokens, reasoning_tokens"
)  # request_log's columns at version 8, as they were (a later column is not there yet to copy)

SCHEMA_V9_SQLITE = f"""CREATE TABLE request_log_v9 (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, client_request_id TEXT, key_id TEXT,
  method TEXT NOT NULL, path TEXT NOT NULL, model TEXT, stream INTEGER NOT NULL, status INTEGER NOT NULL,
  outcome TEXT NOT NULL, error_code TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
  cached_tokens INTEGER, usage_source TEXT NOT NULL, upstream_status INTEGER, ttft_ms REAL, latency_ms REAL NOT NULL,
  bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL, chunks INTEGER NOT NULL, started_at REAL NOT NULL,
  finished_at REAL NOT NULL, cache_write_tokens INTEGER, reasoning_tokens INTEGER);
INSERT INTO request_log_v9 ({_V8_COLUMNS}) SELECT {_V8_COLUMNS} FROM request_log ORDER BY rowid;
DROP TABLE request_log;
ALTER TABLE request_log_v9 RENAME TO request_log;
CREATE INDEX request_log_started ON request_log (started_at);
CREATE INDEX request_log_key_started ON request_log (key_id, started_at);
{_export_cursors("REAL")}"""
"""Version 9 on SQLite: `request_log` rebuilt around `seq`, its insertion sequence (the usage export's cursor,
`sidecar/records/export.py`): an AUTOINCREMENT rowid is never reused (a plain rowid is, once the newest row is
deleted) nor renumbered by VACUUM, and is taken under SQLite's one write lock, so in commit order. The rows
kept keep their order."""

SCHEMA_V9_POSTGRES = f"""ALTER TABLE request_log ADD COLUMN xact BIGINT NOT NULL DEFAULT 0;
ALTER TABLE request_log ALTER COLUMN xact SET DEFAULT txid_current();
CREATE INDEX request_log_xact ON request_log (xact, request_id);
{_export_cursors("DOUBLE PRECISION")}"""
"""Version 9 on PostgreSQL: each row's inserting transaction (`xact`, the usage export's cursor with the request
id, `sidecar/records/export.py`). A constant default first: the rows already there read 0 without the table
being rewritten; rows inserted later get their transaction's id."""


def migrations(real: str, boolean: str, serial: str, v9: str) -> tuple[str, ...]:
    """Every version of the schema in a backend's types, oldest first (`schema_migrations` counts them); `v9`
    is the backend's own (`SCHEMA_V9_SQLITE`, `SCHEMA_V9_POSTGRES`)."""
    return (
        schema_v1(real, boolean, serial), schema_v2(real), SCHEMA_V3, schema_v4(real), schema_v5(real),
        schema_v6(real), SCHEMA_V7, schema_v8(real), v9,
    )  # fmt: skip
