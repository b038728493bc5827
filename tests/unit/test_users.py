"""web/users.py: the UI's users (argon2id hashes in a private SQLite file, not in ClickHouse), roles, sessions
stored as digests with their own CSRF token, and the login throttle — time-driven parts on an injected clock."""

from __future__ import annotations

import os
import stat

import pytest
from flywheel.cli import cli
from flywheel.web import users as u
from flywheel.web.users import Throttle, UserError, Users, allows, check_csrf
from typer.testing import CliRunner

PASSWORD = "correct horse battery"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    clock = Clock()
    users = Users(tmp_path, clock=clock)
    yield users, clock
    users.close()


def test_users_are_kept_hashed_in_a_private_file_and_checked(store, tmp_path):
    users, _ = store
    users.add("ana", "admin", PASSWORD)
    users.add("bo", "viewer", PASSWORD + "!")
    assert [(x.name, x.role) for x in users.list()] == [("ana", "admin"), ("bo", "viewer")]
    assert stat.S_IMODE(os.stat(tmp_path / u.FILE).st_mode) == 0o600
    assert PASSWORD.encode() not in (tmp_path / u.FILE).read_bytes()  # argon2id hashes only
    assert b"$argon2id$" in (tmp_path / u.FILE).read_bytes()
    assert users.check("ana", PASSWORD) == u.User("ana", "admin")
    assert users.check("ana", PASSWORD + "!") is None
    assert users.check("nobody", PASSWORD) is None


@pytest.mark.parametrize(("name", "role", "password", "message"), [
    ("ana", "admin", PASSWORD, "exists"),
    ("a b", "viewer", PASSWORD, "letters, digits"),
    ("cy", "root", PASSWORD, "one of viewer, editor, admin"),
    ("cy", "viewer", "short", "at least 10 characters"),
])
def test_bad_users_are_refused_with_the_reason(store, name, role, password, message):
    users, _ = store
    users.add("ana", "admin", PASSWORD)
    with pytest.raises(UserError, match=message):
        users.add(name, role, password)


def test_roles_are_ordered():
    assert allows("admin", "editor") and allows("editor", "viewer") and allows("viewer", "viewer")
    assert not allows("viewer", "editor") and not allows("editor", "admin")


def test_sessions_are_stored_as_digests_expire_and_follow_the_user(store, tmp_path):
    users, clock = store
    ana = users.add("ana", "editor", PASSWORD)
    token, session = users.open_session(ana)
    assert token.encode() not in (tmp_path / u.FILE).read_bytes()  # a copy of the file opens no session
    assert users.session(token) == session and users.session("forged") is None and users.session(None) is None
    users.set_role("ana", "viewer")  # effective at the next request
    assert users.session(token).user.role == "viewer"
    clock.now += u.SESSION_SECONDS + 1
    assert users.session(token) is None
    token, _ = users.open_session(ana)
    users.close_session(token)  # logout
    assert users.session(token) is None
    token, _ = users.open_session(ana)
    users.set_password("ana", PASSWORD + "2")  # a new password ends every session
    assert users.session(token) is None and users.check("ana", PASSWORD + "2") is not None
    token, _ = users.open_session(ana)
    users.remove("ana")
    assert users.session(token) is None and users.list() == []


def test_a_state_changing_request_needs_its_sessions_csrf_token(store):
    users, _ = store
    _, session = users.open_session(users.add("ana", "admin", PASSWORD))
    _, other = users.open_session(users.add("bo", "admin", PASSWORD))
    assert check_csrf(session, session.csrf)
    assert not check_csrf(session, other.csrf) and not check_csrf(session, None) and not check_csrf(session, "")


def test_the_throttle_doubles_the_wait_after_the_free_attempts_and_a_success_clears_the_name():
    clock = Clock(0.0)
    throttle = Throttle(clock=clock)
    for _ in range(u.FREE_ATTEMPTS):
        assert throttle.wait("name:ana", "ip:1.2.3.4") == 0
        throttle.failed("name:ana", "ip:1.2.3.4")
    assert throttle.wait("name:ana") == 1.0  # the sixth attempt waits a second
    clock.now += 1.0
    throttle.failed("name:ana", "ip:1.2.3.4")
    assert throttle.wait("name:ana") == 2.0 and throttle.wait("ip:1.2.3.4") == 2.0
    assert throttle.wait("name:bo") == 0  # another name from elsewhere is not held
    for _ in range(30):
        throttle.failed("name:ana")
    assert throttle.wait("name:ana") == u.MAX_WAIT_SECONDS
    throttle.succeeded("name:ana")
    assert throttle.wait("name:ana") == 0 and throttle.wait("ip:1.2.3.4") == 2.0  # the address stays held


def test_the_first_admin_comes_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    listed = runner.invoke(cli, ["users", "list"])
    assert listed.exit_code == 0 and "makes the first admin" in listed.output
    added = runner.invoke(cli, ["users", "add", "ana", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    prompted = runner.invoke(cli, ["users", "add", "bo"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0, prompted.output
    assert runner.invoke(cli, ["users", "list"]).output.splitlines() == ["ana\tadmin", "bo\tviewer"]
    refused = runner.invoke(cli, ["users", "add", "cy", "--role", "root", "--password-stdin"], input=PASSWORD + "\n")
    assert refused.exit_code == 1 and "one of viewer, editor, admin" in refused.output
    assert runner.invoke(cli, ["users", "set-role", "bo", "editor"]).exit_code == 0
    assert runner.invoke(cli, ["users", "remove", "bo"]).exit_code == 0
    users = Users(tmp_path)
    assert users.check("ana", PASSWORD) == u.User("ana", "admin") and [x.name for x in users.list()] == ["ana"]
    users.close()


def test_forgiving_takes_back_one_counted_attempt():
    throttle = Throttle(clock=lambda: 100.0)
    for _ in range(5):
        throttle.failed("addr:1.2.3.4")
    assert throttle.wait("addr:1.2.3.4") == 1.0
    throttle.forgive("addr:1.2.3.4")  # the fifth was a login that succeeded
    assert throttle.wait("addr:1.2.3.4") == 0
    for _ in range(9):
        throttle.forgive("addr:1.2.3.4")
    for _ in range(4):
        throttle.failed("addr:1.2.3.4")
    assert throttle.wait("addr:1.2.3.4") == 0  # nothing went below zero: four failures are four
    throttle.failed("addr:1.2.3.4")
    assert throttle.wait("addr:1.2.3.4") == 1.0
