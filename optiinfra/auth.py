"""
API keys: who may call the orchestrator, and with which role.

The key file (C{API_KEYS_FILE}) holds one key per line as
C{<name> <role> sha256:<hex digest> [<pin>]}; C{#} starts a comment line and
blank lines are ignored.  An C{agent} key may be pinned (L{AgentPin}) to some
agent ids (C{agents=cost-1,cost-2}) or to one agent type (C{agent_type=cost}).
It holds hashes only, so reading it does not reveal a usable key;
the key itself is shown once, by C{python -m optiinfra.auth new NAME ROLE}, and
never stored.  Nothing here logs or returns a presented key.

Keys are C{oik_} followed by 32 random bytes (C{secrets.token_urlsafe}), so a
plain SHA-256 is enough: a slow KDF protects guessable passwords, and a 256-bit
random key cannot be guessed however fast the hash.
"""

from __future__ import annotations

import argparse
import enum
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from optiinfra.registry.model import AGENT_TYPES
from optiinfra.validation import TOKEN

#: Marks an orchestrator key, so a leaked one is recognisable (and greppable).
KEY_PREFIX: Final = "oik_"
#: The only hash scheme of the key file, as written before the colon.
HASH_SCHEME: Final = "sha256"

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_HEX_DIGEST: Final = re.compile(r"[0-9a-fA-F]{64}")
#: RFC 6750's b64token: what may follow C{Bearer }.
_BEARER_TOKEN: Final = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
#: An X-API-Key value: visible ASCII, no spaces.
_HEADER_KEY: Final = re.compile(rb"[\x21-\x7e]+")
_LINE_FORMAT: Final = (
    f"<name> <role> {HASH_SCHEME}:<64 hex digits> [agents=<id>,... | agent_type=<type>]"
)

_NAME_RULE: Final = (
    "expected up to 64 letters, digits, '.', '_', '@', '+' or '-', starting with "
    f"a letter or digit and not with {KEY_PREFIX!r}"
)


class Permission(enum.Enum):
    """
    What a request needs.  The HTTP layer picks one per route:

      - C{READ_AGENTS}: GET of C{/agents} and C{/agents/{id}}.
      - C{READ}: every other GET (tasks, plans).
      - C{AGENT_WRITE}: register, heartbeat and unregister an agent.
      - C{OPERATE}: everything else (create and cancel tasks, coordinate,
        approve and reject, execute plans).

    Reading agents is separate from reading the rest so that an agent's key can
    see the registry without seeing tasks and plans.
    """

    READ_AGENTS = "read-agents"
    READ = "read"
    AGENT_WRITE = "agent-write"
    OPERATE = "operate"


class Role(enum.Enum):
    """The role a key grants; its value is how the key file spells it."""

    AGENT = "agent"
    OPERATOR = "operator"
    VIEWER = "viewer"

    def allows(self, permission: Permission) -> bool:
        """
        Whether this role grants C{permission}.

        An operator may do everything.  A viewer may read everything and change
        nothing.  An agent may write agent records and read the agent registry
        (to see whether it is still registered after a restart or a missed
        heartbeat), but not read tasks and plans: least privilege for a key that
        lives on every worker host.  That an agent writes only the records its key
        registered is the registry's rule (L{optiinfra.registry.ownership}).
        """
        return permission in _GRANTS[self]


_GRANTS: Final[Mapping[Role, frozenset[Permission]]] = {
    Role.OPERATOR: frozenset(Permission),
    Role.VIEWER: frozenset({Permission.READ, Permission.READ_AGENTS}),
    Role.AGENT: frozenset({Permission.AGENT_WRITE, Permission.READ_AGENTS}),
}


class ApiKeyFileError(ValueError):
    """The key file cannot be used; the message names the file and the line."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = source if line is None else f"{source}, line {line}"
        super().__init__(f"API key file {where}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


@attrs.frozen
class AgentPin:
    """
    What one agent key may register and act for: these agent ids, or agents of
    this one type.  A leaked key pinned this way cannot pose as another agent.
    """

    agent_ids: frozenset[str] = frozenset()
    agent_type: str | None = None

    def refusal(
        self, agent_id: str | None, agent_type: str | None
    ) -> tuple[str, str] | None:
        """
        Why this pin forbids acting for the agent, as (field, reason); None
        when it allows it.
        """
        if self.agent_ids and agent_id not in self.agent_ids:
            shown = "an id the orchestrator chooses" if agent_id is None else agent_id
            allowed = ", ".join(sorted(self.agent_ids))
            return (
                "agent_id",
                f"this key is pinned to the agent ids {allowed}, not {shown}",
            )
        if self.agent_type is not None and agent_type not in (None, self.agent_type):
            return (
                "agent_type",
                f"this key is pinned to {self.agent_type} agents, not {agent_type}",
            )
        return None

    def text(self) -> str:
        """How the key file spells it."""
        if self.agent_ids:
            return "agents=" + ",".join(sorted(self.agent_ids))
        return f"agent_type={self.agent_type}"


def parse_pin(text: str) -> AgentPin:
    """
    A key-file pin: C{agents=<id>[,<id>...]} or C{agent_type=<type>}.

    @raise ValueError: with what is wrong, for the caller to place.
    """
    kind, equals, value = text.partition("=")
    if kind == "agents" and equals:
        ids = value.split(",")
        bad = [i for i in ids if not TOKEN.fullmatch(i)]
        if bad or not ids:
            raise ValueError(f"bad agent id {_shown(bad[0] if bad else value)}")
        return AgentPin(agent_ids=frozenset(ids))
    if kind == "agent_type" and equals:
        if value not in AGENT_TYPES:
            raise ValueError(
                f"unknown agent type {_shown(value)}: expected {', '.join(AGENT_TYPES)}"
            )
        return AgentPin(agent_type=value)
    raise ValueError(
        f"bad pin {_shown(text)}: expected agents=<id>,... or agent_type=<type>"
    )


@attrs.frozen
class Principal:
    """Who made an authenticated request: the key's name and role, never the key."""

    name: str
    role: Role
    #: For agent keys: the agents it may act for, beyond those it registered.
    pin: AgentPin | None = None

    def allows(self, permission: Permission) -> bool:
        return self.role.allows(permission)


@attrs.frozen
class KeyEntry:
    """One line of the key file."""

    name: str
    role: Role
    digest: bytes = attrs.field(repr=False)
    line: int
    pin: AgentPin | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("ascii")).digest()


def _valid_name(name: str) -> bool:
    """Whether C{name} fits the key file, and cannot be a key pasted by mistake."""
    return bool(_NAME.fullmatch(name)) and not name.startswith(KEY_PREFIX)


def _shown(field: str) -> str:
    """A field for an error message, unless it looks like a key pasted in clear."""
    if field.startswith(KEY_PREFIX):
        return "(a value that looks like a key in clear)"
    return repr(field)


def _parse_line_pin(
    fields: list[str], role: Role, source: str, number: int
) -> AgentPin | None:
    """The optional fourth field of a key-file line: an agent key's pin."""
    if len(fields) < 4:
        return None
    if role is not Role.AGENT:
        raise ApiKeyFileError(
            source, number, f"only agent keys may be pinned, not {role.value} keys"
        )
    try:
        return parse_pin(fields[3])
    except ValueError as error:
        raise ApiKeyFileError(source, number, str(error)) from None


def _parse_line(fields: list[str], source: str, number: int) -> KeyEntry:
    if len(fields) not in (3, 4):
        raise ApiKeyFileError(
            source, number, f"expected {_LINE_FORMAT}, got {len(fields)} field(s)"
        )
    name, role_text, hashed = fields[:3]
    if not _valid_name(name):
        raise ApiKeyFileError(source, number, f"bad name {_shown(name)}: {_NAME_RULE}")
    try:
        role = Role(role_text)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise ApiKeyFileError(
            source, number, f"unknown role {_shown(role_text)}: expected {choices}"
        ) from None
    scheme, colon, hex_digest = hashed.partition(":")
    if not colon or scheme != HASH_SCHEME or not _HEX_DIGEST.fullmatch(hex_digest):
        hint = (
            " (it looks like a key in clear)" if hashed.startswith(KEY_PREFIX) else ""
        )
        raise ApiKeyFileError(
            source,
            number,
            f"bad hash{hint}: expected {HASH_SCHEME}:<64 hex digits>; "
            "the file holds key hashes, never keys",
        )
    pin = _parse_line_pin(fields, role, source, number)
    return KeyEntry(name, role, bytes.fromhex(hex_digest), number, pin)


def _parse_entries(text: str, source: str) -> tuple[KeyEntry, ...]:
    """Every entry of C{text}, checked line by line; an empty result is allowed."""
    entries: list[KeyEntry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entry = _parse_line(stripped.split(), source, number)
        if entry.name in names:
            raise ApiKeyFileError(
                source,
                number,
                f"duplicate name {entry.name!r} (first on line {names[entry.name]})",
            )
        if entry.digest in digests:
            raise ApiKeyFileError(
                source,
                number,
                f"duplicate hash: the same key as line {digests[entry.digest]}",
            )
        names[entry.name] = digests[entry.digest] = number
        entries.append(entry)
    return tuple(entries)


@attrs.frozen
class ApiKeys:
    """The keys the orchestrator accepts, as read from one key file."""

    source: str
    entries: tuple[KeyEntry, ...] = attrs.field(repr=False)

    @classmethod
    def parse(cls, text: str, source: str) -> ApiKeys:
        """
        Read the key file's C{text}; C{source} names it in error messages.

        @raise ApiKeyFileError: for the first bad line, or when there are no keys:
            a configured file without keys would lock everyone out, so it is
            taken for a mistake rather than for "nobody may call".
        """
        entries = _parse_entries(text, source)
        if not entries:
            raise ApiKeyFileError(source, None, "no keys (only blank or comment lines)")
        return cls(source, entries)

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """
        Read and parse the key file at C{path}.

        @raise ApiKeyFileError: also when the file cannot be read or decoded,
            or when its mode lets anyone but its owner write it.
        """
        source = str(path)
        try:
            with path.open("rb") as file:
                refuse_unsafe_mode(source, os.fstat(file.fileno()).st_mode)
                text = file.read().decode("utf-8-sig")
        except OSError as e:
            raise ApiKeyFileError(source, None, f"cannot read: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ApiKeyFileError(source, None, f"not UTF-8 text: {e.reason}") from e
        return cls.parse(text, source)

    def authenticate(self, presented: str | None) -> Principal | None:
        """
        The principal whose key is C{presented}, or C{None}.

        The presented key's hash is compared with every entry's by
        C{hmac.compare_digest}, without stopping at a match, so the time taken
        depends on the number of keys only.
        """
        if not presented or not presented.isascii():
            return None
        digest = _digest(presented)
        found: KeyEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return None if found is None else Principal(found.name, found.role, found.pin)


def refuse_unsafe_mode(source: str, mode: int) -> None:
    """
    Refuse a key file that its group or others may write: whoever can write
    it can give themselves an operator key.  (Reading it reveals no key.)

    @raise ApiKeyFileError: naming the file and its mode.
    """
    writers = [
        who
        for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
        if mode & bit
    ]
    if writers:
        raise ApiKeyFileError(
            source,
            None,
            f"mode {stat.S_IMODE(mode):04o} lets {' and '.join(writers)} write it,"
            " and so add a key; make it writable by its owner only (chmod go-w)",
        )


@attrs.frozen
class KeyChanges:
    """How a reloaded key file differs from the one in use, by key name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    #: Names kept with another key or another role.
    changed: tuple[str, ...]

    @classmethod
    def between(cls, old: ApiKeys | None, new: ApiKeys) -> KeyChanges:
        before = {e.name: e for e in old.entries} if old is not None else {}
        after = {e.name: e for e in new.entries}
        return cls(
            added=tuple(sorted(after.keys() - before.keys())),
            removed=tuple(sorted(before.keys() - after.keys())),
            changed=tuple(
                sorted(
                    name
                    for name in after.keys() & before.keys()
                    if (after[name].role, after[name].digest)
                    != (before[name].role, before[name].digest)
                )
            ),
        )


def credential_from_headers(
    authorization: bytes | None, x_api_key: bytes | None
) -> str | None:
    """
    The key a request presents, from C{Authorization: Bearer <key>} (any case of
    C{Bearer}) or C{X-API-Key: <key>}; C{None} when there is none.

    A header that is present but unusable (another scheme, extra words, an empty
    value, non-ASCII) gives C{None} rather than falling back to the other one,
    and so do two headers with different keys: an ambiguous request is refused,
    not guessed at.
    """
    keys: list[bytes] = []
    if authorization is not None:
        parts = authorization.split()
        if (
            len(parts) != 2
            or parts[0].lower() != b"bearer"
            or not _BEARER_TOKEN.fullmatch(parts[1])
        ):
            return None
        keys.append(parts[1])
    if x_api_key is not None:
        value = x_api_key.strip()
        if not _HEADER_KEY.fullmatch(value):
            return None
        keys.append(value)
    if not keys or any(key != keys[0] for key in keys):
        return None
    return keys[0].decode("ascii")


def generate(name: str, role: Role, pin: AgentPin | None = None) -> tuple[str, str]:
    """
    A new key, and its key-file line (without a newline): C{(key, line)}.

    @raise ValueError: if C{name} cannot be written in the key file, or a pin
        is asked for a key that is not an agent's.
    """
    if not _valid_name(name):
        raise ValueError(f"bad name {_shown(name)}: {_NAME_RULE}")
    if pin is not None and role is not Role.AGENT:
        raise ValueError(f"only agent keys may be pinned, not {role.value} keys")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    line = f"{name} {role.value} {HASH_SCHEME}:{_digest(key).hex()}"
    return key, line if pin is None else f"{line} {pin.text()}"


def _append(path: Path, name: str, line: str) -> None:
    """
    Append C{line} to the key file at C{path}, creating it with mode 0600.

    The file is locked while it is checked and written, so two concurrent runs
    cannot both add the same name.

    @raise ApiKeyFileError: if the file is broken, already has C{name}, or
        cannot be written.
    """
    source = str(path)
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, flags)
        else:
            os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "r+b", buffering=0) as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            content = file.read().decode("utf-8-sig")
            entries = _parse_entries(content, source)
            for entry in entries:
                if entry.name == name:
                    raise ApiKeyFileError(
                        source, entry.line, f"name {name!r} is already taken"
                    )
            separator = "\n" if content and not content.endswith("\n") else ""
            file.write(f"{separator}{line}\n".encode())
            os.fsync(file.fileno())
    except OSError as e:
        raise ApiKeyFileError(source, None, f"cannot write: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ApiKeyFileError(source, None, f"not UTF-8 text: {e.reason}") from e


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m optiinfra.auth", description="Manage orchestrator API keys."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser(
        "new",
        help="generate a key",
        description="Generate a key: the key goes to stdout, everything else "
        "to stderr.",
    )
    new.add_argument("name", help="who the key is for, e.g. an agent's id")
    new.add_argument("role", choices=[role.value for role in Role])
    pinned = new.add_mutually_exclusive_group()
    pinned.add_argument(
        "--agents",
        metavar="ID[,ID...]",
        help="pin an agent key to these agent ids",
    )
    pinned.add_argument(
        "--agent-type",
        choices=AGENT_TYPES,
        help="pin an agent key to agents of this type",
    )
    new.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="append the key's line to this key file (created with mode 0600)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m optiinfra.auth new NAME ROLE [--file PATH]}.

    Only the key goes to stdout, so C{key=$(python -m optiinfra.auth ...)} works;
    the key-file line and notes go to stderr.  With C{--file}, the key is printed
    only once its line is in the file.
    """
    args = _parser().parse_args(argv)
    try:
        pin = (
            parse_pin(f"agents={args.agents}")
            if args.agents
            else parse_pin(f"agent_type={args.agent_type}")
            if args.agent_type
            else None
        )
        key, line = generate(args.name, Role(args.role), pin)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.file is None:
        print("Add this line to the API key file:", file=sys.stderr)
        print(line, file=sys.stderr)
    else:
        try:
            _append(args.file, args.name, line)
        except ApiKeyFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"Added {args.name!r} ({args.role}) to {args.file}.", file=sys.stderr)
    print("The key is shown only this once; it is not stored.", file=sys.stderr)
    print(key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
