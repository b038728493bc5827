"""The UI's users, sessions and login throttle (docs/design.md §12).

Users live in `<data_dir>/users.sqlite3` (mode 0600), never in ClickHouse: `/sql` answers queries over the
`flywheel` database, and must not be able to read password hashes or session tokens. One SQLite file per
UI process's data directory (the worker's, or `flywheel ui`'s); the first admin comes from the command line
(`flywheel users add NAME --role admin`).

- Roles are ordered: viewer < editor < admin; `allows(role, needed)`.
- Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommendation); a hash made
  with older parameters is re-hashed at the next login.
- Sessions: a random token in an HttpOnly, SameSite=Strict cookie; only its SHA-256 is stored, so a copy
  of the file opens no session. Each session has its own CSRF token, required on every state-changing
  request (`check_csrf`, constant-time). Sessions expire (`SESSION_SECONDS`) and end on logout.
- Logins are throttled per user name and per address (`Throttle`): after `FREE_ATTEMPTS` failures each
  further attempt waits twice as long as the last, up to `MAX_WAIT_SECONDS`; a success clears the name.
  In memory: a restart forgets the failures (the argon2 cost still bounds guessing to a few per second).

Write keys never open the UI: they are not users, and nothing here accepts one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("viewer", "editor", "admin")  # each allows what the ones before it allow
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10
SESSION_SECONDS = 12 * 3600
FREE_ATTEMPTS = 5
MAX_WAIT_SECONDS = 300.0
FILE = "users.sqlite3"

_hasher = PasswordHasher()


class UserError(ValueError):
    """A request about users that cannot be done, saying why."""


def allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class User:
    name: str
    role: str


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The users file. Synchronous (SQLite, small): call it from an executor on the event loop."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / FILE
        if not self.path.exists():  # created private: it holds password hashes and session digests
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.clock = clock
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL,
                                              created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, name TEXT NOT NULL, csrf TEXT NOT NULL,
                                                 expires REAL NOT NULL);
        """)

    def close(self) -> None:
        self._db.close()

    # ---- users ---------------------------------------------------------------------------------------
    def add(self, name: str, role: str, password: str) -> User:
        if not NAME.match(name):
            raise UserError(f"user name {name!r}: 1–64 letters, digits and . _ @ -")
        if role not in ROLES:
            raise UserError(f"role {role!r}: one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise UserError(f"the password needs at least {MIN_PASSWORD} characters")
        try:
            self._db.execute("INSERT INTO users VALUES (?, ?, ?, ?)",
                             (name, role, _hasher.hash(password), self.clock()))
        except sqlite3.IntegrityError:
            raise UserError(f"user {name!r} exists: remove it first, or change its role or password") from None
        return User(name, role)

    def list(self) -> list[User]:
        return [User(n, r) for n, r in self._db.execute("SELECT name, role FROM users ORDER BY name")]

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise UserError(f"role {role!r}: one of {', '.join(ROLES)}")
        if self._db.execute("UPDATE users SET role = ? WHERE name = ?", (role, name)).rowcount == 0:
            raise UserError(f"no user {name!r}")

    def set_password(self, name: str, password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise UserError(f"the password needs at least {MIN_PASSWORD} characters")
        if self._db.execute("UPDATE users SET hash = ? WHERE name = ?", (_hasher.hash(password), name)).rowcount == 0:
            raise UserError(f"no user {name!r}")
        self._db.execute("DELETE FROM sessions WHERE name = ?", (name,))  # a new password ends every session

    def remove(self, name: str) -> None:
        if self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
            raise UserError(f"no user {name!r}")
        self._db.execute("DELETE FROM sessions WHERE name = ?", (name,))

    def check(self, name: str, password: str) -> User | None:
        """The user if the password is theirs. Takes an argon2 verification's time whether or not the user
        exists (no timing oracle for names)."""
        row = self._db.execute("SELECT role, hash FROM users WHERE name = ?", (name,)).fetchone()
        stored = row[1] if row else _DUMMY
        try:
            _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _hasher.check_needs_rehash(stored):
            self._db.execute("UPDATE users SET hash = ? WHERE name = ?", (_hasher.hash(password), name))
        return User(name, row[0])

    # ---- sessions ------------------------------------------------------------------------------------
    def open_session(self, user: User) -> tuple[str, Session]:
        """(the token for the cookie, the session). Only the token's digest is stored."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires = self.clock() + SESSION_SECONDS
        self._db.execute("DELETE FROM sessions WHERE expires <= ?", (self.clock(),))
        self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (_digest(token), user.name, csrf, expires))
        return token, Session(user, csrf, expires)

    def session(self, token: str | None) -> Session | None:
        """The live session of a cookie's token, with the user's current role; None if absent or expired."""
        if not token:
            return None
        row = self._db.execute(
            "SELECT u.name, u.role, s.csrf, s.expires FROM sessions s JOIN users u ON u.name = s.name "
            "WHERE s.digest = ?", (_digest(token),)).fetchone()
        if row is None or row[3] <= self.clock():
            return None
        return Session(User(row[0], row[1]), row[2], row[3])

    def close_session(self, token: str | None) -> None:
        if token:
            self._db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(token),))


_DUMMY = _hasher.hash(secrets.token_urlsafe(16))  # verified against when the name is unknown


def check_csrf(session: Session, given: str | None) -> bool:
    """Whether a state-changing request carries its session's CSRF token."""
    return bool(given) and hmac.compare_digest(session.csrf.encode(), given.encode())


class Throttle:
    """Failed logins per key (a user name, an address): after FREE_ATTEMPTS failures, the next attempt must
    wait 1 s, then 2, 4, … up to MAX_WAIT_SECONDS after the previous failure. Pure but for the clock."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # key → (failures, time of the last)

    def wait(self, *keys: str) -> float:
        """Seconds before an attempt for these keys may be made (0: now)."""
        now, longest = self.clock(), 0.0
        for key in keys:
            failures, last = self._failures.get(key, (0, 0.0))
            if failures >= FREE_ATTEMPTS:
                pause = min(MAX_WAIT_SECONDS, 2.0 ** (failures - FREE_ATTEMPTS))
                longest = max(longest, last + pause - now)
        return max(0.0, longest)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            self._failures[key] = (self._failures.get(key, (0, 0.0))[0] + 1, now)
        if len(self._failures) > 100_000:  # bounded: forget the oldest half
            for key, _ in sorted(self._failures.items(), key=lambda kv: kv[1][1])[:50_000]:
                del self._failures[key]

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def forgive(self, *keys: str) -> None:
        """Take back one attempt counted against each key (one that turned out fine)."""
        for key in keys:
            failures, last = self._failures.get(key, (0, 0.0))
            if failures <= 1:
                self._failures.pop(key, None)
            else:
                self._failures[key] = (failures - 1, last)
