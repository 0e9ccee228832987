"""API keys: the key file, authentication, roles, headers and the key command."""

from __future__ import annotations

import hashlib
import os
import runpy
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optiinfra.auth import (
    KEY_PREFIX,
    AgentPin,
    ApiKeyFileError,
    ApiKeys,
    Permission,
    Principal,
    Role,
    credential_from_headers,
    generate,
    main,
)

ALICE_KEY = "oik_alice-test-key"
BOB_KEY = "oik_bob-test-key"


def hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def keys_text() -> str:
    return (
        "# orchestrator keys\n"
        "\n"
        f"alice operator {hashed(ALICE_KEY)}\n"
        f"  bob\tagent   {hashed(BOB_KEY)}  \n"
    )


@pytest.fixture
def keys() -> ApiKeys:
    return ApiKeys.parse(keys_text(), "keys.txt")


# The key file


def test_parse_reads_every_entry_skipping_comments_and_blanks(keys: ApiKeys) -> None:
    assert keys.source == "keys.txt"
    assert [(e.name, e.role, e.line) for e in keys.entries] == [
        ("alice", Role.OPERATOR, 3),
        ("bob", Role.AGENT, 4),
    ]
    assert keys.entries[0].digest == hashlib.sha256(ALICE_KEY.encode()).digest()


def test_parse_accepts_crlf_and_upper_case_hex() -> None:
    line = f"carol viewer sha256:{hashlib.sha256(b'oik_c').hexdigest().upper()}\r\n"
    keys = ApiKeys.parse("# keys\r\n" + line, "k")
    assert keys.authenticate("oik_c") == Principal("carol", Role.VIEWER)


def test_repr_shows_no_hashes(keys: ApiKeys) -> None:
    digest = hashed(ALICE_KEY).removeprefix("sha256:")
    assert digest not in repr(keys)
    assert digest not in repr(keys.entries[0])


GOOD = hashed("oik_good")
OTHER = hashed("oik_other")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("alice operator\n", 1, "got 2 field(s)"),
        (f"# c\nalice operator {GOOD} extra\n", 2, "only agent keys may be pinned"),
        (f"alice agent {GOOD} extra\n", 1, "bad pin 'extra'"),
        (f"alice agent {GOOD} agent_type=robot\n", 1, "unknown agent type 'robot'"),
        (f"alice agent {GOOD} agents=a,,b\n", 1, "bad agent id ''"),
        (f"alice agent {GOOD} agents=a b\n", 1, "got 5 field(s)"),
        (f"alice operator {GOOD} # inline comment\n", 1, "got 6 field(s)"),
        (f"\n\n-alice operator {GOOD}\n", 3, "bad name '-alice'"),
        (f"{'a' * 65} operator {GOOD}\n", 1, "bad name"),
        (f"al/ice operator {GOOD}\n", 1, "bad name 'al/ice'"),
        (f"alice admin {GOOD}\n", 1, "unknown role 'admin'"),
        (f"alice Operator {GOOD}\n", 1, "expected agent, operator, viewer"),
        ("alice viewer md5:" + "0" * 32 + "\n", 1, "bad hash"),
        ("alice viewer sha256:" + "0" * 63 + "\n", 1, "64 hex digits"),
        ("alice viewer sha256:" + "0" * 65 + "\n", 1, "bad hash"),
        ("alice viewer sha256:" + "g" * 64 + "\n", 1, "bad hash"),
        ("alice viewer " + "0" * 64 + "\n", 1, "bad hash"),
        ("alice viewer sha256" + "0" * 64 + "\n", 1, "bad hash"),
        (f"alice viewer {GOOD}\nalice agent {OTHER}\n", 2, "duplicate name 'alice'"),
        (f"alice viewer {GOOD}\n#\nbob agent {GOOD}\n", 3, "same key as line 1"),
    ],
)
def test_each_error_names_the_file_and_the_line(
    text: str, line: int, fragment: str
) -> None:
    with pytest.raises(ApiKeyFileError) as raised:
        ApiKeys.parse(text, "/etc/optiinfra/keys")
    error = raised.value
    assert error.source == "/etc/optiinfra/keys"
    assert error.line == line
    assert fragment in error.reason
    assert str(error).startswith(f"API key file /etc/optiinfra/keys, line {line}: ")


def test_a_duplicate_name_names_the_first_line_too() -> None:
    text = f"alice viewer {GOOD}\n\nalice agent {OTHER}\n"
    with pytest.raises(ApiKeyFileError, match=r"line 3: .*first on line 1"):
        ApiKeys.parse(text, "k")


@pytest.mark.parametrize(
    "text",
    [
        f"alice viewer {ALICE_KEY}\n",
        f"alice {ALICE_KEY} {GOOD}\n",
        f"{ALICE_KEY} viewer {GOOD}\n",
    ],
)
def test_a_key_pasted_in_clear_is_not_repeated(text: str) -> None:
    with pytest.raises(ApiKeyFileError) as raised:
        ApiKeys.parse(text, "k")
    assert ALICE_KEY not in str(raised.value)
    assert "in clear" in str(raised.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# nobody yet\n\n   # really\n"])
def test_a_file_without_keys_is_an_error(text: str) -> None:
    with pytest.raises(ApiKeyFileError, match=r"^API key file k: no keys") as raised:
        ApiKeys.parse(text, "k")
    assert raised.value.line is None


def test_load_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(keys_text())
    keys = ApiKeys.load(path)
    assert keys.source == str(path)
    assert keys.authenticate(BOB_KEY) == Principal("bob", Role.AGENT)


def test_load_ignores_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_bytes(b"\xef\xbb\xbf" + keys_text().encode())
    assert ApiKeys.load(path).authenticate(ALICE_KEY) is not None


def test_load_names_the_file_in_parse_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("alice nobody x\n")
    with pytest.raises(ApiKeyFileError, match=rf"^API key file {path}, line 1: "):
        ApiKeys.load(path)


def test_load_of_a_missing_file_is_an_api_key_file_error(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with pytest.raises(ApiKeyFileError, match="cannot read: No such file") as raised:
        ApiKeys.load(path)
    assert raised.value.source == str(path)
    assert raised.value.line is None


def test_load_of_binary_is_an_api_key_file_error(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_bytes(b"alice viewer \xff\xfe\n")
    with pytest.raises(ApiKeyFileError, match="not UTF-8 text"):
        ApiKeys.load(path)


# Authentication


def test_the_right_key_authenticates(keys: ApiKeys) -> None:
    assert keys.authenticate(ALICE_KEY) == Principal("alice", Role.OPERATOR)
    assert keys.authenticate(BOB_KEY) == Principal("bob", Role.AGENT)


@pytest.mark.parametrize(
    "presented",
    [
        None,
        "",
        "oik_wrong",
        hashed(ALICE_KEY),
        hashed(ALICE_KEY).removeprefix("sha256:"),
        ALICE_KEY + " ",
        " " + ALICE_KEY,
        ALICE_KEY[:-1],
        ALICE_KEY + "x",
        ALICE_KEY.upper(),
        ALICE_KEY.replace("a", "\u0430"),  # Cyrillic a: non-ASCII
        "\udcff",  # a lone surrogate cannot even be encoded
    ],
)
def test_anything_else_does_not(keys: ApiKeys, presented: str | None) -> None:
    assert keys.authenticate(presented) is None


@pytest.mark.parametrize("position", range(len(ALICE_KEY)))
def test_a_key_differing_in_one_character_does_not(
    keys: ApiKeys, position: int
) -> None:
    changed = "x" if ALICE_KEY[position] != "x" else "y"
    presented = ALICE_KEY[:position] + changed + ALICE_KEY[position + 1 :]
    assert keys.authenticate(presented) is None


def test_principal_holds_no_key(keys: ApiKeys) -> None:
    principal = keys.authenticate(ALICE_KEY)
    assert principal is not None
    assert ALICE_KEY not in repr(principal)
    assert [field.name for field in attrs.fields(Principal)] == ["name", "role", "pin"]


# Roles

READ, READ_AGENTS, AGENT_WRITE, OPERATE = (
    Permission.READ,
    Permission.READ_AGENTS,
    Permission.AGENT_WRITE,
    Permission.OPERATE,
)

GRANTS = {
    Role.OPERATOR: {READ, READ_AGENTS, AGENT_WRITE, OPERATE},
    Role.VIEWER: {READ, READ_AGENTS},
    Role.AGENT: {READ_AGENTS, AGENT_WRITE},
}


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("permission", list(Permission))
def test_role_permissions_table(role: Role, permission: Permission) -> None:
    expected = permission in GRANTS[role]
    assert role.allows(permission) is expected
    assert Principal("someone", role).allows(permission) is expected


def test_role_values_are_the_key_file_spelling() -> None:
    assert {role.value for role in Role} == {"agent", "operator", "viewer"}


# Headers


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (b"Bearer oik_abc", None, "oik_abc"),
        (b"bearer oik_abc", None, "oik_abc"),
        (b"BEARER oik_abc", None, "oik_abc"),
        (b"  Bearer \t oik_abc  ", None, "oik_abc"),
        (b"Bearer oik_a-b_c.d~e+f/g==", None, "oik_a-b_c.d~e+f/g=="),
        (None, b"oik_abc", "oik_abc"),
        (None, b"  oik_abc \t", "oik_abc"),
        (b"Bearer oik_abc", b"oik_abc", "oik_abc"),
        (None, None, None),
        (b"Bearer oik_abc", b"oik_xyz", None),
        (b"", None, None),
        (b"   ", None, None),
        (b"Bearer", None, None),
        (b"Bearer ", None, None),
        (b"Bearer oik_abc extra", None, None),
        (b"Basic b2lrX2FiYzo=", None, None),
        (b"Token oik_abc", None, None),
        (b"oik_abc", None, None),
        (b"Bearer oik_a=bc", None, None),
        (b"Bearer oik_\xc3\xa9", None, None),
        (b"Bearer oik_a\x00", None, None),
        (None, b"", None),
        (None, b"   ", None),
        (None, b"oik_a bc", None),
        (None, b"oik_\xc3\xa9", None),
        (None, b"oik_\x7f", None),
        (b"Basic b2lrX2FiYzo=", b"oik_abc", None),
        (b"Bearer oik_abc", b"", None),
    ],
)
def test_credential_from_headers(
    authorization: bytes | None, x_api_key: bytes | None, expected: str | None
) -> None:
    assert credential_from_headers(authorization, x_api_key) == expected


@given(st.one_of(st.none(), st.binary()), st.one_of(st.none(), st.binary()))
def test_any_header_bytes_give_an_ascii_key_or_none(
    authorization: bytes | None, x_api_key: bytes | None
) -> None:
    key = credential_from_headers(authorization, x_api_key)
    assert key is None or (key.isascii() and key and key.isprintable())


# Generating keys


def test_generate_makes_a_random_prefixed_key_and_its_line() -> None:
    key, line = generate("agent-7", Role.AGENT)
    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 43  # 32 bytes of URL-safe base64
    assert line == f"agent-7 agent {hashed(key)}"
    assert key not in line
    assert generate("agent-7", Role.AGENT)[0] != key


def test_pins_round_trip_from_the_command_line_to_the_principal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    for name, option in (
        ("cost-1", "--agents=cost-1,cost-2"),
        ("costs", "--agent-type=cost"),
    ):
        assert main(["new", name, "agent", option, "--file", str(path)]) == 0
    text = path.read_text()
    assert " agents=cost-1,cost-2\n" in text
    assert " agent_type=cost\n" in text
    [first, second] = ApiKeys.load(path).entries
    assert first.pin == AgentPin(agent_ids=frozenset({"cost-1", "cost-2"}))
    assert second.pin == AgentPin(agent_type="cost")
    assert first.pin.refusal("cost-2", "cost") is None
    assert first.pin.refusal("cost-3", "cost") == (
        "agent_id",
        "this key is pinned to the agent ids cost-1, cost-2, not cost-3",
    )
    assert second.pin.refusal("x", "resource") == (
        "agent_type",
        "this key is pinned to cost agents, not resource",
    )
    assert main(["new", "ops", "operator", "--agent-type=cost"]) == 2


@pytest.mark.parametrize("role", list(Role))
def test_generate_round_trips_through_parse(role: Role) -> None:
    key, line = generate("ops@example.com", role)
    keys = ApiKeys.parse(line + "\n", "k")
    assert keys.authenticate(key) == Principal("ops@example.com", role)
    assert credential_from_headers(b"Bearer " + key.encode(), None) == key
    assert credential_from_headers(None, key.encode()) == key


@pytest.mark.parametrize(
    "name", ["", "two words", "-x", "a/b", "a" * 65, "é", "oik_abc", ALICE_KEY]
)
def test_generate_refuses_a_name_the_file_cannot_hold(name: str) -> None:
    with pytest.raises(ValueError, match="bad name") as raised:
        generate(name, Role.VIEWER)
    assert ALICE_KEY not in str(raised.value)


# The command line


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would make a new file read-only, to show it is overridden."""
    previous = os.umask(0o277)
    yield
    os.umask(previous)


def test_new_prints_the_key_alone_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "alice", "operator"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert out == key + "\n"
    assert key.startswith(KEY_PREFIX)
    assert "only this once" in err
    assert key not in err
    [line] = [line for line in err.splitlines() if line.startswith("alice ")]
    assert ApiKeys.parse(line, "k").authenticate(key) == Principal(
        "alice", Role.OPERATOR
    )


@pytest.mark.usefixtures("umask")
def test_new_with_file_creates_it_0600_without_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    assert main(["new", "agent-1", "agent", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    assert key not in content
    assert content == f"agent-1 agent {hashed(key)}\n"
    assert "only this once" in err
    assert str(path) in err
    assert key not in err
    assert ApiKeys.load(path).authenticate(key) == Principal("agent-1", Role.AGENT)


def test_new_with_file_appends_and_keeps_what_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text("# keys\n" + f"old viewer {GOOD}")  # no final newline
    path.chmod(0o640)
    assert main(["new", "a", "viewer", "--file", str(path)]) == 0
    key_a = capsys.readouterr().out.strip()
    assert main(["new", "b", "operator", "--file", str(path)]) == 0
    key_b = capsys.readouterr().out.strip()
    keys = ApiKeys.load(path)
    assert [e.name for e in keys.entries] == ["old", "a", "b"]
    assert keys.authenticate(key_a) == Principal("a", Role.VIEWER)
    assert keys.authenticate(key_b) == Principal("b", Role.OPERATOR)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # left as the owner set it


def test_new_with_file_accepts_an_empty_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text("")
    assert main(["new", "a", "viewer", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert ApiKeys.load(path).authenticate(key) == Principal("a", Role.VIEWER)


def test_new_refuses_a_duplicate_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    assert main(["new", "alice", "viewer", "--file", str(path)]) == 0
    capsys.readouterr()
    before = path.read_bytes()
    assert main(["new", "alice", "operator", "--file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "line 1: name 'alice' is already taken" in err
    assert path.read_bytes() == before


def test_new_refuses_to_add_to_a_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice viewer {GOOD}\nbob root {OTHER}\n")
    before = path.read_bytes()
    assert main(["new", "carol", "viewer", "--file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: API key file {path}, line 2: unknown role 'root'" in err
    assert path.read_bytes() == before


def test_new_refuses_a_binary_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_bytes(b"\xff\xfe\n")
    assert main(["new", "carol", "viewer", "--file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "not UTF-8 text" in err
    assert path.read_bytes() == b"\xff\xfe\n"


def test_new_reports_a_file_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new", "carol", "viewer", "--file", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: API key file {tmp_path}: cannot write" in err


def test_new_refuses_a_bad_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    assert main(["new", "a/b", "viewer", "--file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "bad name 'a/b'" in err
    assert not path.exists()


@pytest.mark.parametrize(
    "argv", [[], ["new"], ["new", "alice"], ["new", "alice", "root"], ["old"]]
)
def test_usage_errors_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert capsys.readouterr().out == ""


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_runs_as_a_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["optiinfra.auth", "new", "v", "viewer"])
    with pytest.raises(SystemExit) as raised:
        runpy.run_module("optiinfra.auth", run_name="__main__")
    assert raised.value.code == 0
    assert capsys.readouterr().out.startswith(KEY_PREFIX)
