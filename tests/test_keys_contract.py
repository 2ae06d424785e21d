"""keys.py with exact values: the key format and its checksum, the secret's hash, the pepper's rules, admin input
validation (the message, param and code of every refused input), KeyAdmin's rows and admin audit rows on a real
SQLite store, the static keys file (good and bad lines, reload on change), durations and the key listing."""

from __future__ import annotations

import os
import re
import stat
import time
import zlib

import orjson
import pytest

from sidecar.config import ConfigError
from sidecar.errors import BadRequest, NotFound
from sidecar.keys.format import KEY_LEN, format_key, hash_secret, new_key, parse_key
from sidecar.keys.pepper import load_pepper
from sidecar.keys.service import KeyAdmin, listing, parse_duration, validate
from sidecar.keys.static import StaticKeys, load_static_keys
from sidecar.store import open_store
from sidecar.store.base import KeyRow

PEPPER = b"q" * 32
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SAMPLE_ID, SAMPLE_SECRET = "0123456789ab", "0123456789ABCDEFGHIJKLMNOPQRSTUV"
SAMPLE_KEY = "sk-sc-0123456789ab-0123456789ABCDEFGHIJKLMNOPQRSTUV3mSiAY"


@pytest.fixture
async def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    await store.open()
    await store.migrate()
    yield store
    await store.close()


def check(body: str) -> str:
    """The checksum, computed independently: CRC-32 of the body in 6 base62 digits, most significant first."""
    n = zlib.crc32(body.encode())
    return "".join(B62[n // 62**i % 62] for i in range(5, -1, -1))


def refused(fn, *args, **kwargs) -> BadRequest:
    with pytest.raises(BadRequest) as raised:
        fn(*args, **kwargs)
    return raised.value


# --- format, checksum, hash ------------------------------------------------------------------------------------
def test_format_key_is_prefix_id_secret_and_a_base62_crc32():
    assert format_key(SAMPLE_ID, SAMPLE_SECRET) == SAMPLE_KEY
    body = "sk-sc-zzzzzzzzzzzz-" + "z" * 32
    assert format_key("zzzzzzzzzzzz", "z" * 32) == body + check(body) == body + "2WkjKI"
    assert check(SAMPLE_KEY[:-6]) == "3mSiAY" and len(SAMPLE_KEY) == KEY_LEN == 57


def test_parse_key_accepts_a_valid_key_and_refuses_the_rest():
    assert parse_key(SAMPLE_KEY) == (SAMPLE_ID, SAMPLE_SECRET)
    assert parse_key(SAMPLE_KEY[:-1] + "Z") is None  # wrong checksum
    assert parse_key(SAMPLE_KEY[:-6] + "000000") is None
    assert parse_key(SAMPLE_KEY + "A") is None and parse_key(SAMPLE_KEY[:-1]) is None  # wrong length
    assert parse_key("") is None
    upper = format_key("0123456789AB", SAMPLE_SECRET)  # the id is lowercase only
    assert len(upper) == KEY_LEN and parse_key(upper) is None
    dashed = format_key(SAMPLE_ID, SAMPLE_SECRET[:-1] + "-")  # the secret is base62 only
    assert parse_key(dashed) is None
    other_prefix = "sk-xx" + SAMPLE_KEY[5:]
    assert parse_key(other_prefix[:-6] + check(other_prefix[:-6])) is None


def test_new_keys_use_their_alphabets_and_lengths():
    ids, secrets_ = set(), set()
    for _ in range(40):
        key, kid, secret = new_key()
        assert re.fullmatch(r"[0-9a-z]{12}", kid) and re.fullmatch(r"[0-9A-Za-z]{32}", secret)
        assert key == f"sk-sc-{kid}-{secret}" + check(f"sk-sc-{kid}-{secret}") and parse_key(key) == (kid, secret)
        ids.add(kid)
        secrets_.add(secret)
    assert len(ids) == 40 and len(secrets_) == 40
    assert any(c.isupper() for s in secrets_ for c in s)  # the secret draws from base62, not the id alphabet


def test_hash_secret_is_hmac_sha256_hex():
    assert hash_secret(b"pepper-pepper-16", "secret") == (
        "629fef0e3ba0c49df2c51526893da55bfaff737dae84fcdf255de610a46b1fba"
    )
    assert hash_secret(b"pepper-pepper-17", "secret") != hash_secret(b"pepper-pepper-16", "secret")


# --- pepper ----------------------------------------------------------------------------------------------------
def test_pepper_from_a_file_wins_and_is_stripped(tmp_path):
    path = tmp_path / "pepper.txt"
    path.write_text("0123456789abcdef\n")
    assert load_pepper("inline-pepper-ignored", str(path), str(tmp_path / "data")) == b"0123456789abcdef"
    assert not (tmp_path / "data").exists()  # nothing generated


def test_a_short_pepper_file_is_refused_with_its_length(tmp_path):
    path = tmp_path / "pepper.txt"
    path.write_text("0123456789abcde\n")  # 15 characters
    with pytest.raises(ConfigError) as raised:
        load_pepper("", str(path), str(tmp_path))
    assert str(raised.value) == (
        "auth.pepper_file: the pepper is 15 characters; at least 16 are required (e.g. `openssl rand -hex 32`)"
    )
    with pytest.raises(ConfigError) as raised:
        load_pepper("", str(tmp_path / "missing"), str(tmp_path))
    assert str(raised.value).startswith(f"auth.pepper_file: cannot read {tmp_path / 'missing'}: ")


def test_an_inline_pepper_of_16_characters_or_more(tmp_path):
    assert load_pepper("0123456789abcdef", "", str(tmp_path)) == b"0123456789abcdef"
    assert load_pepper("x" * 40, "", str(tmp_path)) == b"x" * 40
    with pytest.raises(ConfigError) as raised:
        load_pepper("short", "", str(tmp_path))
    assert str(raised.value) == (
        "auth.pepper: the pepper is 5 characters; at least 16 are required (e.g. `openssl rand -hex 32`)"
    )
    assert not (tmp_path / "pepper").exists()


def test_a_generated_pepper_is_written_once_private_and_read_back(tmp_path, log_catcher):
    data = tmp_path / "a" / "b"  # parents created
    with pytest.raises(ConfigError, match="only `sidecar serve` generates one"):
        load_pepper("", "", str(data))  # a CLI command: never a pepper of its own
    assert not data.exists()
    pepper = load_pepper("", "", str(data), create=True)
    assert re.fullmatch(rb"[0-9a-f]{64}", pepper)
    stored = data / "pepper"
    assert stored.read_text() == pepper.decode() + "\n"
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert [p.name for p in data.iterdir()] == ["pepper"]  # written beside and linked into place; nothing left
    assert load_pepper("", "", str(data)) == pepper  # read back, newline stripped
    warned = [line for line in log_catcher.lines if "generated one" in line]
    assert warned == [
        f"auth.pepper is not set: generated one into {stored}; replicas sharing a store need the same pepper "
        "(set auth.pepper_file)None"
    ]
    other = load_pepper("", "", str(tmp_path), create=True)  # an existing data directory
    assert other != pepper and (tmp_path / "pepper").read_text() == other.decode() + "\n"


def test_a_short_stored_pepper_is_refused(tmp_path):
    (tmp_path / "pepper").write_text("tiny\n")
    with pytest.raises(ConfigError) as raised:
        load_pepper("", "", str(tmp_path))
    assert str(raised.value) == (
        f"the pepper in {tmp_path / 'pepper'}: the pepper is 4 characters; at least 16 are required "
        "(e.g. `openssl rand -hex 32`)"
    )


# --- durations -------------------------------------------------------------------------------------------------
def test_parse_duration_values_and_errors():
    assert parse_duration("45s") == 45.0 and parse_duration("15m") == 900.0 and parse_duration("12h") == 43200.0
    assert parse_duration("30d") == 2592000.0 and parse_duration("2w") == 1209600.0
    assert isinstance(parse_duration("1s"), float)
    err = refused(parse_duration, "soon")
    assert err.message == "Invalid duration 'soon': use e.g. 30d, 12h, 15m (at most a century)."
    assert err.param == "expires_in" and err.code is None and err.status == 400
    assert refused(parse_duration, "1y", param="retention").param == "retention"
    long = "9" * 50
    assert refused(parse_duration, long).message == f"Invalid duration {'9' * 40!r}: use e.g. 30d, 12h, 15m " + (
        "(at most a century)."
    )
    assert refused(parse_duration, "100000000d").param == "expires_in"  # past a century


# --- validate --------------------------------------------------------------------------------------------------
def test_validate_returns_the_fields_to_set():
    assert validate({}, creating=False) == {}
    out = validate(
        {"name": "n", "concurrency": 0, "rpm": None, "tpm": 7, "models": ["a", "b"], "audit": "on", "expires_at": 5},
        creating=True,
    )
    assert out == {"name": "n", "concurrency": 0, "rpm": None, "tpm": 7, "models": ("a", "b"), "audit": "on",
                   "expires_at": 5}  # fmt: skip
    assert validate({"models": ("x",)}, creating=False) == {"models": ("x",)}
    assert validate({"models": []}, creating=False) == {"models": ()}
    assert validate({"models": None, "audit": None}, creating=False) == {"models": None, "audit": None}
    assert validate({"audit": "off"}, creating=False) == {"audit": "off"}
    assert validate({"expires_at": 1.5}, creating=False) == {"expires_at": 1.5}
    assert validate({"expires_at": None}, creating=False) == {"expires_at": None}
    assert validate({"expires_in": None}, creating=False) == {"expires_at": None}
    assert validate({"name": "a"}, creating=True) == {"name": "a"}
    assert validate({"name": "x" * 200}, creating=False) == {"name": "x" * 200}
    before = time.time()
    at = validate({"expires_in": "1h"}, creating=False)["expires_at"]
    assert before + 3600 <= at <= time.time() + 3600


def test_validate_refuses_unknown_fields_and_a_missing_name():
    err = refused(validate, {"name": "n", "bogus": 1}, creating=True)
    assert (err.message, err.param, err.code, err.status) == ("Unknown field 'bogus'.", "bogus", "unknown_field", 400)
    assert refused(validate, {"hash": "x"}, creating=False).param == "hash"
    err = refused(validate, {"rpm": 1}, creating=True)
    assert (err.message, err.param, err.code) == ("`name` is required.", "name", None)


@pytest.mark.parametrize("value", [None, 5, "", "x" * 201, ["n"]])
def test_validate_refuses_a_bad_name(value):
    err = refused(validate, {"name": value}, creating=False)
    assert (err.message, err.param, err.code) == ("`name` must be a string of 1-200 characters.", "name", None)


@pytest.mark.parametrize("field", ["concurrency", "rpm", "tpm"])
@pytest.mark.parametrize("value", [True, False, -1, 1.5, "3"])
def test_validate_refuses_a_bad_limit(field, value):
    err = refused(validate, {field: value}, creating=False)
    assert (err.message, err.param, err.code) == (f"`{field}` must be a non-negative integer or null.", field, None)


@pytest.mark.parametrize("field", ["concurrency", "rpm", "tpm"])
def test_validate_takes_a_limit_of_zero_or_null(field):
    assert validate({field: 0}, creating=False) == {field: 0}
    assert validate({field: 12}, creating=False) == {field: 12}
    assert validate({field: None}, creating=False) == {field: None}


@pytest.mark.parametrize("value", ["abc", [""], [1], ["a", None], {"a": 1}, 3])
def test_validate_refuses_bad_models(value):
    err = refused(validate, {"models": value}, creating=False)
    assert (err.message, err.param, err.code) == ("`models` must be a list of model names or null.", "models", None)


@pytest.mark.parametrize("value", ["yes", "", "ON", True, 1])
def test_validate_refuses_a_bad_audit(value):
    err = refused(validate, {"audit": value}, creating=False)
    assert (err.message, err.param, err.code) == ('`audit` must be "on", "off" or null.', "audit", None)


@pytest.mark.parametrize("value", [True, False, "5", [1]])
def test_validate_refuses_a_bad_expires_at(value):
    err = refused(validate, {"expires_at": value}, creating=False)
    assert (err.message, err.param, err.code) == ("`expires_at` must be epoch seconds or null.", "expires_at", None)


def test_validate_refuses_a_bad_expires_in():
    err = refused(validate, {"expires_in": 3600}, creating=False)  # no unit
    assert (err.message, err.param) == ("Invalid duration '3600': use e.g. 30d, 12h, 15m (at most a century).",
                                        "expires_in")  # fmt: skip


# --- KeyAdmin --------------------------------------------------------------------------------------------------
async def test_create_stores_the_row_and_its_audit_row(store):
    before = time.time()
    created = await KeyAdmin(store, PEPPER).create(
        {"name": "alice", "rpm": 3, "models": ["m"], "audit": "off"}, actor="cli", request_id="rid-1"
    )
    after = time.time()
    kid, secret = parse_key(created.key)
    row = created.row
    assert row.id == kid and row.name == "alice" and row.hash == hash_secret(PEPPER, secret)
    assert (row.rpm, row.models, row.audit, row.concurrency, row.tpm) == (3, ("m",), "off", None, None)
    assert before <= row.created_at == row.updated_at <= after and row.revoked_at is None and row.expires_at is None
    assert await store.get_key(kid) == row
    events = await store.admin_events()
    assert len(events) == 1
    event = events[0]
    assert (event["actor"], event["action"], event["target"], event["at"], event["request_id"]) == (
        "cli", "key.create", kid, row.created_at, "rid-1",
    )  # fmt: skip
    assert event["changes"] == row.public() and "hash" not in event["changes"]
    await KeyAdmin(store, PEPPER).create({"name": "bob"}, actor="api")
    assert (await store.admin_events())[0]["request_id"] is None
    with pytest.raises(BadRequest) as raised:
        await KeyAdmin(store, PEPPER).create({"rpm": 1}, actor="api")
    assert raised.value.message == "`name` is required."


async def test_update_stores_the_new_row_and_only_what_changed(store):
    admin = KeyAdmin(store, PEPPER)
    created = await admin.create({"name": "alice", "rpm": 3}, actor="cli")
    kid = created.row.id
    time.sleep(0.01)
    new = await admin.update(kid, {"name": "alice", "rpm": 5, "models": ["a", "b"]}, actor="ops", request_id="r2")
    assert (new.id, new.name, new.rpm, new.models, new.hash) == (kid, "alice", 5, ("a", "b"), created.row.hash)
    assert new.created_at == created.row.created_at and new.updated_at > created.row.updated_at
    assert await store.get_key(kid) == new
    event = (await store.admin_events())[0]
    assert (event["actor"], event["action"], event["target"], event["at"], event["request_id"]) == (
        "ops", "key.update", kid, new.updated_at, "r2",
    )  # fmt: skip
    assert event["changes"] == {"rpm": 5, "models": ["a", "b"]}
    assert len(await store.admin_events()) == 2
    await admin.update(kid, {}, actor="ops")
    event = (await store.admin_events())[0]
    assert event["changes"] == {} and event["request_id"] is None and event["action"] == "key.update"


async def test_revoke_stores_the_revocation_once(store):
    admin = KeyAdmin(store, PEPPER)
    created = await admin.create({"name": "alice"}, actor="cli")
    kid = created.row.id
    revoked = await admin.revoke(kid, actor="ops", request_id="r3")
    assert revoked.revoked_at is not None and revoked.revoked_at == revoked.updated_at >= created.row.created_at
    assert revoked.name == "alice" and revoked.hash == created.row.hash
    assert await store.get_key(kid) == revoked
    event = (await store.admin_events())[0]
    assert (event["actor"], event["action"], event["target"], event["at"], event["request_id"]) == (
        "ops", "key.revoke", kid, revoked.revoked_at, "r3",
    )  # fmt: skip
    assert event["changes"] == {"revoked_at": revoked.revoked_at}
    again = await admin.revoke(kid, actor="ops")
    assert again == revoked and len(await store.admin_events()) == 2  # no second revocation, no audit row
    await admin.revoke((await admin.create({"name": "b"}, actor="cli")).row.id, actor="x")
    assert (await store.admin_events())[0]["request_id"] is None


async def test_update_and_revoke_of_an_unknown_key_are_404s(store):
    admin = KeyAdmin(store, PEPPER)
    for call in (admin.update("nope", {"rpm": 1}, actor="a"), admin.revoke("nope", actor="a")):
        with pytest.raises(NotFound) as raised:
            await call
        err = raised.value
        assert (err.message, err.code, err.status, err.param) == ("No key with id 'nope'.", "key_not_found", 404, None)
    assert await store.admin_events() == []


# --- static keys -----------------------------------------------------------------------------------------------
def line(kid: str, **extra) -> str:
    return orjson.dumps({"id": kid, "name": f"n-{kid}", "hash": "h" + kid, "created_at": 1.0, **extra}).decode()


def test_load_static_keys_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text(
        "\n".join(
            [
                "",
                "   ",
                "# a comment",
                "   # an indented comment",
                line("a", models=["m1", "m2"], rpm=5, audit="on"),
                line("b", created_at=2.5, expires_at=9.0),
                line("a", name="later"),
            ]
        )
        + "\n"
    )
    keys = load_static_keys(str(path))
    assert list(keys) == ["a", "b"]
    assert keys["a"] == KeyRow(id="a", name="later", hash="ha", created_at=1.0)
    assert keys["b"] == KeyRow(id="b", name="n-b", hash="hb", created_at=2.5, expires_at=9.0)
    path.write_text(line("c", models=["m1", "m2"], rpm=5, audit="on"))
    assert load_static_keys(str(path))["c"] == KeyRow(
        id="c", name="n-c", hash="hc", created_at=1.0, rpm=5, models=("m1", "m2"), audit="on"
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("[1, 2]", "(a line must be a JSON object)"),
        ('"text"', "(a line must be a JSON object)"),
        ("{not json", "("),
        ('{"id": "x"}', "(KeyRow.__init__() missing"),
        ('{"id": "x", "name": "n", "hash": "h", "created_at": 1, "colour": 1}', "(KeyRow.__init__() got an unexp"),
    ],
)
def test_load_static_keys_names_the_bad_line(tmp_path, bad, reason):
    path = tmp_path / "keys.jsonl"
    path.write_text(f"# keys\n\n{line('a')}\n{bad}\n{line('b')}\n")
    with pytest.raises(ValueError) as raised:
        load_static_keys(str(path))
    assert str(raised.value).startswith(f"{path}:4: not a key line {reason}") and str(raised.value).endswith(")")


def test_static_keys_without_a_file():
    empty = StaticKeys("")
    assert empty.keys == {} and empty.get("a") is None and empty.rows() == []


def test_static_keys_get_and_rows_in_creation_order(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text("\n".join([line("c", created_at=2.0), line("b", created_at=2.0), line("a", created_at=3.0)]))
    keys = StaticKeys(str(path))
    assert keys.get("a") == KeyRow(id="a", name="n-a", hash="ha", created_at=3.0) and keys.get("zz") is None
    assert [r.id for r in keys.rows()] == ["b", "c", "a"]


def test_static_keys_reload_at_most_once_a_second_and_keep_the_last_good_version(tmp_path, log_catcher):
    path = tmp_path / "keys.jsonl"
    path.write_text(line("a"))
    keys = StaticKeys(str(path))
    path.write_text(line("a") + "\n" + line("b"))
    assert keys.get("b") is None  # checked less than a second ago
    time.sleep(1.1)
    assert keys.get("b") is not None and [r.id for r in keys.rows()] == ["a", "b"]
    reloaded = [x for x in log_catcher.lines if "reloaded" in x]
    assert reloaded == ["auth.static_keys_file reloaded{'keys': 2}"]
    path.write_text(line("c"))
    assert keys.get("c") is None and keys.get("b") is not None  # just checked: not again within a second
    time.sleep(1.1)
    assert keys.get("c") is not None and keys.get("b") is None
    # a version that does not parse: the keys before stay, and it is reported once
    path.write_text(orjson.dumps({"id": "d", "name": "n", "hash": "h", "created_at": 1, "x" * 400: 1}).decode())
    time.sleep(1.1)
    assert keys.get("c") is not None and keys.get("d") is None
    errors = [x for x in log_catcher.lines if "cannot be read" in x]
    assert len(errors) == 1
    message, fields = errors[0].split("{", 1)
    assert message == "auth.static_keys_file changed but cannot be read; keeping the keys loaded before"
    error = eval("{" + fields)["error"]  # the repr of the fields dict
    assert len(error) == 300 and error.startswith(f"{path}:1: not a key line (KeyRow.__init__() got an unexp")
    time.sleep(1.1)
    assert keys.get("c") is not None
    assert len([x for x in log_catcher.lines if "cannot be read" in x]) == 1
    os.unlink(path)  # gone: reported, the keys before stay
    time.sleep(1.1)
    assert [r.id for r in keys.rows()] == ["c"]
    errors = [x for x in log_catcher.lines if "cannot be read" in x]
    assert len(errors) == 2 and "No such file" in errors[1]
    assert len([x for x in log_catcher.lines if "reloaded" in x]) == 2


def test_listing_shows_stored_then_static_keys():
    stored = KeyRow(id="s", name="st", hash="h1", created_at=1.0, models=("m",))
    static = KeyRow(id="t", name="sta", hash="h2", created_at=2.0)
    assert listing([stored], [static]) == [
        {**stored.public(), "source": "store"},
        {**static.public(), "source": "static"},
    ]
    assert listing([stored], [])[0]["models"] == ["m"] and listing([], []) == []
    assert [k["source"] for k in listing([stored, stored], [static])] == ["store", "store", "static"]
