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
wrong passwords are refused for a while, counted per source address and per name
(``LoginThrottle``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
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

#: Gradio api_name -> action: the one table of every endpoint of the web app, public or
#: not (hidden callbacks, page loads, timers and chained steps included: the browser calls
#: them all by number, so anyone logged in can). ``webapp.endpoints`` wraps each callback
#: in the role check for its entry, and refuses to build a UI with an event that has no
#: entry, so a new endpoint forces a decision instead of silently being open to every role.
ENDPOINT_ACTIONS: dict[str, str] = {
    # Detect (webapp/ui.py)
    "detect": "ingest",
    "detect_clear_uploads": "view",  # empties the upload box after a detect
    "detect_pick_crop": "view",  # a click on a crop fills in its face id
    "enroll": "label",
    # Search (webapp/ui.py)
    "search": "view",
    # People (webapp/ui.py)
    "list_people": "view",
    "people_tab_open": "view",
    "find_faces": "view",
    "rename_person": "curate",
    "merge_people": "curate",
    **{f"people_merge_choices_{after}": "view"  # the merge-target list after every change
       for after in ("open", "refresh", "rename", "merge", "delete")},
    "people_pick_face": "view",  # click a face or a row: selects the person
    "people_pick_row": "view",
    "people_follow_rename": "view",  # the selection follows a rename or merge
    "people_follow_merge": "view",
    "delete_person_ask": "delete",  # says what a delete will remove, before it happens
    "delete_person_cancel": "view",
    "delete_person": "delete",
    "delete_person_done": "view",
    # Label tab (webapp/label_tab.py)
    "label_load": "view",
    "label_tab_open": "view",
    "label_history": "view",
    "label_history_open": "view",
    "label_counts": "view",
    "label_save": "label",
    "label_next": "label",
    "label_skip": "label",
    "label_undo": "label",
    "label_name": "label",
    **{f"label_accept_{rank}": "label" for rank in range(1, 6)},  # the suggestion buttons
    "label_select_box": "view",  # box selection and editing in the browser's copy: no
    "label_edit_refresh": "view",  # database writes until Save
    "label_refresh_panel": "view",
    "label_prev_box": "view",
    "label_next_box": "view",
    "label_remove_box": "view",
    "label_table_select": "view",
    # Data tab (webapp/data_tab.py)
    "export_dataset": "export",
    "import_dataset": "import",
    "cluster_faces": "view",
    "cluster_pick_group": "view",
    "split_person": "curate",
    "name_group": "label",
    "remove_group_name": "label",
    # Train tab (webapp/train_tab.py)
    "train_page_load": "view",  # the job status, history and model table when a page opens
    "train_tick": "view",  # the 2-second status poll
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
#: the address a login request came from; set by the web server for each request
#: (``webapp.http_guard``), read by ``gradio_auth`` (Gradio passes only name and password)
login_address: ContextVar[str | None] = ContextVar("facelab_login_address", default=None)


class LoginThrottle:
    """Refuses logins after repeated wrong passwords, counted per source address as well
    as per name, so that nobody can lock an account out by knowing its name.

    Within ``window_s``:

    * one address with ``max_per_address`` failures (any names) is refused for every name;
    * one name from one address with ``max_per_pair`` failures is refused from there;
    * one name with ``max_per_name`` failures from all addresses together (a guess spread
      over many addresses) is refused, except from addresses where that name logged in
      successfully before (``trusted_s``): its owner still gets in from their usual
      machine while it is under attack.

    A success clears the pair's count. In memory: a restart resets it. Bounded: at most
    ``max_keys`` keys per table (the oldest are dropped under a spray of made-up names).
    """

    def __init__(self, max_per_pair: int = 10, max_per_address: int = 20, max_per_name: int = 50,
                 window_s: float = 300.0, trusted_s: float = 30 * 86400.0, max_keys: int = 10_000) -> None:
        self.max_per_pair, self.max_per_address, self.max_per_name = max_per_pair, max_per_address, max_per_name
        self.window_s, self.trusted_s, self.max_keys = window_s, trusted_s, max_keys
        self._by_pair: dict[tuple[str, str], list[float]] = {}
        self._by_address: dict[str, list[float]] = {}
        self._by_name: dict[str, list[float]] = {}
        self._trusted: dict[tuple[str, str], float] = {}  # (name, address) -> last successful login
        self._lock = threading.Lock()

    def _recent(self, table: dict, key: object, now: float) -> list[float]:
        times = [t for t in table.get(key, []) if now - t < self.window_s]
        if times:
            table[key] = times
        else:
            table.pop(key, None)
        return times

    def blocked(self, name: str, address: str | None = None) -> bool:
        address = address or "?"
        with self._lock:
            now = time.monotonic()
            if len(self._recent(self._by_address, address, now)) >= self.max_per_address:
                return True
            if len(self._recent(self._by_pair, (name, address), now)) >= self.max_per_pair:
                return True
            trusted = now - self._trusted.get((name, address), -math.inf) < self.trusted_s
            return not trusted and len(self._recent(self._by_name, name, now)) >= self.max_per_name

    def failed(self, name: str, address: str | None = None) -> None:
        address = address or "?"
        with self._lock:
            now = time.monotonic()
            for table, key in ((self._by_address, address), (self._by_pair, (name, address)), (self._by_name, name)):
                self._recent(table, key, now)
                table.setdefault(key, []).append(now)
                if len(table) > self.max_keys:  # drop the keys whose last failure is oldest
                    for old in sorted(table, key=lambda k: table[k][-1])[: len(table) - self.max_keys]:
                        del table[old]

    def succeeded(self, name: str, address: str | None = None) -> None:
        address = address or "?"
        with self._lock:
            self._by_pair.pop((name, address), None)
            self._trusted[(name, address)] = time.monotonic()
            if len(self._trusted) > self.max_keys:
                for old in sorted(self._trusted, key=self._trusted.get)[: len(self._trusted) - self.max_keys]:
                    del self._trusted[old]


def authenticate(lab: Lab, name: str, password: str, throttle: LoginThrottle | None = None,
                 address: str | None = None) -> bool:
    """True if ``name``/``password`` belong to an active user and ``throttle`` lets this
    name from this ``address`` try. Takes one scrypt either way."""
    try:
        key = clean_username(name)
    except InvalidRequest:
        key = ""
    if throttle is not None and throttle.blocked(key, address):
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
        (throttle.succeeded if ok else throttle.failed)(key, address)
    return ok


def gradio_auth(lab: Lab, throttle: LoginThrottle | None = None) -> Callable[[str, str], Awaitable[bool]] | None:
    """The ``auth=`` callable for ``gr.Blocks.launch``; None in single-user mode.

    Async so the ~50 ms scrypt runs in a worker thread instead of blocking Gradio's
    event loop (Gradio awaits coroutine functions). The source address comes from
    ``login_address``, set by the web server for the login request.
    """
    if not users_configured(lab):
        return None
    throttle = throttle or LoginThrottle()

    async def check(username: str, password: str) -> bool:
        import anyio.to_thread

        address = login_address.get()
        return await anyio.to_thread.run_sync(authenticate, lab, username, password, throttle, address)

    return check


def active_user(lab: Lab, username: str | None) -> UserInfo | None:
    """The user called ``username`` if it exists and is enabled, else None (one query)."""
    try:
        key = clean_username(username)
    except InvalidRequest:
        return None
    with lab.sessions() as session:
        row = session.execute(select(User.role, User.active).where(User.name == key)).one_or_none()
    if row is None or not row[1]:
        return None
    return UserInfo(key, row[0].value, True)


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
