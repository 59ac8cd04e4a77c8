"""Who may use the app, and who may do what.

Two modes, decided by the ``users`` table:

* **single-user** (no users): no login; the app may only listen on the loopback
  interface, so only people already on this machine reach it (``check_bind``).
* **multi-user** (one or more users, added with ``python app.py users add``): every page
  and API call needs a login (Gradio's ``launch(auth=...)``, see ``gradio_auth``), and
  every UI callback asks ``require(lab, username, action)`` before it acts, so roles are
  enforced on the server whatever a client sends.

Passwords are stored as ``scrypt$n$r$p$salt$hash`` (hashlib.scrypt, 16-byte random salt
per user, 32-byte key); checks use ``hmac.compare_digest`` and unknown names are hashed
against a dummy so a login takes the same time whether or not the name exists. Repeated
wrong passwords for one name are refused for a while (``LoginThrottle``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from pipeline.context import Lab
from pipeline.errors import Conflict, FaceLabError, InvalidRequest, NotFound
from storage.orm import User, UserRole, record_audit

#: the user name recorded when nobody is logged in (single-user mode, CLI)
LOCAL_USER = "local"

#: action -> roles allowed. Labelers look, upload and label; admins also curate
#: (rename, merge, delete, import, export), train and switch models, and manage users.
PERMISSIONS: dict[str, frozenset[UserRole]] = {
    "view": frozenset({UserRole.ADMIN, UserRole.LABELER}),  # search, lists, history, label queue
    "ingest": frozenset({UserRole.ADMIN, UserRole.LABELER}),  # Detect tab upload
    "label": frozenset({UserRole.ADMIN, UserRole.LABELER}),  # enroll, Label tab save/undo/skip, name groups
    "curate": frozenset({UserRole.ADMIN}),  # rename, merge, split people
    "delete": frozenset({UserRole.ADMIN}),  # delete people/images (privacy deletes)
    "import": frozenset({UserRole.ADMIN}),
    "export": frozenset({UserRole.ADMIN}),  # a dataset export holds every face and name
    "train": frozenset({UserRole.ADMIN}),  # training runs, model registry, switching models
    "admin": frozenset({UserRole.ADMIN}),
}

#: Gradio api_name -> action: what each callback must pass to ``require``. Every named
#: endpoint of the app must be listed (tests/test_auth.py checks), so a new endpoint
#: forces a decision instead of silently being open to every role.
ENDPOINT_ACTIONS: dict[str, str] = {
    # Detect / Search / People (webapp/ui.py)
    "detect": "ingest",
    "enroll": "label",
    "search": "view",
    "list_people": "view",
    "find_faces": "view",
    "rename_person": "curate",
    "merge_people": "curate",
    "delete_person": "delete",
    # Label tab (webapp/label_tab.py)
    "label_load": "view",
    "label_history": "view",
    "label_counts": "view",
    "label_save": "label",
    "label_next": "label",
    "label_skip": "label",
    "label_undo": "label",
    "label_name": "label",
    "label_accept": "label",
    # Data tab (webapp/data_tab.py)
    "export_dataset": "export",
    "import_dataset": "import",
    "cluster_faces": "view",
    "split_person": "curate",
    "name_group": "label",
    "remove_group_name": "label",
    # Train tab (webapp/train_tab.py)
    "train_start": "train",
    "train_cancel": "train",
    "train_promote": "train",
    "train_rollback": "train",
    "train_run": "view",
    "train_preview": "view",
}

USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # scrypt of a megabyte "password" is a cheap denial of service

# scrypt cost: n=2**14, r=8 -> 16 MiB and ~50 ms per check on one core (OWASP's minimum
# for scrypt is n=2**17 with r=8 at p=1 *or* equivalent; 2**14 keeps logins snappy on a
# 2-core box; the parameters are stored with each hash, so raising them later only
# affects new or changed passwords)
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32


class Forbidden(FaceLabError):
    """The logged-in user's role does not allow the action (or nobody is logged in)."""


class LaunchRefused(FaceLabError):
    """The app would be reachable by others without a login."""


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: str
    active: bool


# -- passwords ----------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """A new salted scrypt hash string for ``password``."""
    _check_password(password)
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         dklen=SCRYPT_DKLEN, maxmem=64 * 1024 * 1024)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches the ``stored`` hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt_b64, key_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            password = ""  # still do the work, then fail below
            expected = b""
        key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p),
                             dklen=len(expected) or SCRYPT_DKLEN, maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return bool(expected) and hmac.compare_digest(key, expected)


#: hashed against when the name is unknown, so timing does not tell which names exist
_DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(b'facelab-dummy-salt')}${_b64(bytes(SCRYPT_DKLEN))}"


def _check_password(password: object) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"Passwords need at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidRequest(f"Passwords are at most {MAX_PASSWORD_LENGTH} characters.")


def clean_username(name: object) -> str:
    """A user name as stored: trimmed, lower-case, letters/digits/``._@-`` only."""
    cleaned = str(name or "").strip().lower()
    if not USERNAME_RE.fullmatch(cleaned):
        raise InvalidRequest(
            "User names are 1-64 characters: letters, digits and . _ @ - (starting with a letter or digit)."
        )
    return cleaned


def _role(role: object) -> UserRole:
    try:
        return UserRole(str(role).strip().lower())
    except ValueError:
        raise InvalidRequest(f"role must be one of {', '.join(r.value for r in UserRole)}, got {role!r}") from None


# -- user management (CLI) -------------------------------------------------------------------
def users_configured(lab: Lab) -> bool:
    """True once at least one user exists: the app then requires a login."""
    with lab.sessions() as session:
        return bool(session.scalar(select(func.count(User.id))))


def add_user(lab: Lab, name: str, password: str, role: str, by: str = LOCAL_USER) -> UserInfo:
    name, role_value = clean_username(name), _role(role)
    password_hash = hash_password(password)
    with lab.session() as session:
        if session.scalar(select(User.id).where(User.name == name)) is not None:
            raise Conflict(f"User {name!r} already exists; use `users passwd` or `users role`.")
        session.add(User(name=name, role=role_value, password_hash=password_hash, active=True))
        record_audit(session, by, "user_add", "user", None, {"name": name, "role": role_value.value})
    return UserInfo(name, role_value.value, True)


def _get(session, name: str) -> User:  # noqa: ANN001
    user = session.scalars(select(User).where(User.name == clean_username(name))).one_or_none()
    if user is None:
        raise NotFound(f"No user called {clean_username(name)!r}.")
    return user


def set_password(lab: Lab, name: str, password: str, by: str = LOCAL_USER) -> None:
    password_hash = hash_password(password)
    with lab.session() as session:
        user = _get(session, name)
        user.password_hash = password_hash
        record_audit(session, by, "user_passwd", "user", user.id, {"name": user.name})


def set_role(lab: Lab, name: str, role: str, by: str = LOCAL_USER) -> UserInfo:
    role_value = _role(role)
    with lab.session() as session:
        user = _get(session, name)
        record_audit(session, by, "user_role", "user", user.id, {"name": user.name, "from": user.role.value,
                                                                   "to": role_value.value})
        user.role = role_value
        return UserInfo(user.name, user.role.value, user.active)


def set_active(lab: Lab, name: str, active: bool, by: str = LOCAL_USER) -> None:
    with lab.session() as session:
        user = _get(session, name)
        user.active = bool(active)
        record_audit(session, by, "user_enable" if active else "user_disable", "user", user.id, {"name": user.name})


def remove_user(lab: Lab, name: str, by: str = LOCAL_USER) -> None:
    """Delete a login. Its name stays in the audit log (who did what is not rewritten)."""
    with lab.session() as session:
        user = _get(session, name)
        record_audit(session, by, "user_remove", "user", user.id, {"name": user.name})
        session.delete(user)


def list_users(lab: Lab) -> list[UserInfo]:
    with lab.sessions() as session:
        return [UserInfo(u.name, u.role.value, u.active) for u in session.scalars(select(User).order_by(User.name))]


# -- login -------------------------------------------------------------------------------
class LoginThrottle:
    """At most ``max_failures`` wrong passwords per name per ``window_s``; then refuse that
    name (right password or not) until the window has passed. In memory: a restart resets it."""

    def __init__(self, max_failures: int = 10, window_s: float = 300.0) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(name, []) if now - t < self.window_s]
        self._failures[name] = times
        return times

    def blocked(self, name: str) -> bool:
        with self._lock:
            return len(self._recent(name, time.monotonic())) >= self.max_failures

    def failed(self, name: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._recent(name, now).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of made-up names
                self._failures = {k: v for k, v in self._failures.items() if v}

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


def authenticate(lab: Lab, name: str, password: str, throttle: LoginThrottle | None = None) -> bool:
    """True if ``name``/``password`` belong to an active user. Takes one scrypt either way."""
    try:
        key = clean_username(name)
    except InvalidRequest:
        key = ""
    if throttle is not None and throttle.blocked(key):
        verify_password(password, _DUMMY_HASH)
        return False
    stored = None
    if key:
        with lab.sessions() as session:
            stored = session.execute(
                select(User.password_hash, User.active).where(User.name == key)
            ).one_or_none()
    ok = verify_password(password, stored[0] if stored else _DUMMY_HASH) and bool(stored and stored[1])
    if throttle is not None:
        (throttle.succeeded if ok else throttle.failed)(key)
    return ok


def gradio_auth(lab: Lab) -> Callable[[str, str], Awaitable[bool]] | None:
    """The ``auth=`` callable for ``gr.Blocks.launch``; None in single-user mode.

    Async so the ~50 ms scrypt runs in a worker thread instead of blocking Gradio's
    event loop (Gradio awaits coroutine functions).
    """
    if not users_configured(lab):
        return None
    throttle = LoginThrottle()

    async def check(username: str, password: str) -> bool:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(authenticate, lab, username, password, throttle)

    return check


# -- authorisation -----------------------------------------------------------------------
def require(lab: Lab, username: str | None, action: str) -> str:
    """Allow ``action`` for ``username`` or raise ``Forbidden``; returns the name to record
    in the audit log.

    ``username`` is ``gr.Request.username`` (None when nobody logged in). With no users
    configured everything is allowed as ``"local"``. The role is read from the database on
    every call, so removing, disabling or demoting a user takes effect at once, even for a
    browser tab that logged in before.
    """
    allowed = PERMISSIONS.get(action)
    if allowed is None:
        raise ValueError(f"unknown action {action!r}; add it to pipeline.auth.PERMISSIONS")
    with lab.sessions() as session:
        if username is None:
            if session.scalar(select(func.count(User.id))):
                raise Forbidden("Log in first (this app has user accounts; restart it if they were just added).")
            return LOCAL_USER
        try:
            key = clean_username(username)
        except InvalidRequest:
            raise Forbidden("Unknown user; log in again.") from None
        row = session.execute(select(User.role, User.active).where(User.name == key)).one_or_none()
    if row is None or not row[1]:
        raise Forbidden(f"The account {key!r} no longer exists or is disabled; ask an admin.")
    if row[0] not in allowed:
        raise Forbidden(f"Your role ({row[0].value}) may not {action}; ask an admin.")
    return key


def require_endpoint(lab: Lab, username: str | None, api_name: str) -> str:
    """``require`` with the action ``ENDPOINT_ACTIONS`` lists for a Gradio endpoint."""
    return require(lab, username, ENDPOINT_ACTIONS[api_name])


# -- binding ----------------------------------------------------------------------------------
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, share: bool, with_users: bool) -> None:
    """Refuse to serve anyone but this machine without logins."""
    if with_users:
        return
    if share:
        raise LaunchRefused(
            "Refusing --share without user accounts: a public link would let anyone see and change "
            "your photos. Add one first: python app.py users add NAME --role admin"
        )
    if not is_loopback(host):
        raise LaunchRefused(
            f"Refusing to listen on {host} without user accounts: anyone on the network could use the app. "
            "Add one first (python app.py users add NAME --role admin), or leave --host at 127.0.0.1."
        )


# -- CLI: python app.py users ... -----------------------------------------------------------
def _read_password(from_stdin: bool) -> str:
    import getpass
    import sys

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise InvalidRequest("The two passwords differ.")
    return first


def users_command(lab: Lab, action: str, name: str | None, role: str | None, password_stdin: bool) -> int:
    """``python app.py users add|passwd|role|disable|enable|remove NAME`` and ``users list``."""
    import sys

    try:
        if action == "list":
            for user in list_users(lab):
                print(f"{user.name}\t{user.role}\t{'active' if user.active else 'disabled'}")
            if not users_configured(lab):
                print("no users: single-user mode (the app only listens on 127.0.0.1)")
            return 0
        if not name:
            raise InvalidRequest(f"`users {action}` needs a user name")
        if action == "add":
            info = add_user(lab, name, _read_password(password_stdin), role or "labeler")
            print(f"added {info.name} ({info.role}); restart the app if it is running so it asks for logins")
        elif action == "passwd":
            set_password(lab, name, _read_password(password_stdin))
            print(f"password changed for {clean_username(name)}")
        elif action == "role":
            if not role:
                raise InvalidRequest("`users role` needs --role admin|labeler")
            info = set_role(lab, name, role)
            print(f"{info.name} is now {info.role}")
        elif action in ("disable", "enable"):
            set_active(lab, name, action == "enable")
            print(f"{clean_username(name)} {action}d")
        elif action == "remove":
            remove_user(lab, name)
            print(f"removed {clean_username(name)}")
        else:
            raise InvalidRequest(f"unknown users action {action!r}")
    except FaceLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
