"""Access control: password hashing, roles checked on the server, binding rules, and the real
app behind a login (every route needs it; a labeler's client cannot call admin endpoints)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from pipeline import auth
from pipeline.auth import Forbidden, LaunchRefused
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.settings import Settings
from storage.orm import AuditLog, User
from tests.conftest import start_app

REPO = Path(__file__).resolve().parents[1]
ADMIN_PW = "correct horse battery"
LABELER_PW = "labeler-password-1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Lab]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("authlab"), database_url=database_url, match_threshold=0.8)
    with Lab.open(settings) as opened:
        yield opened


# -- passwords ----------------------------------------------------------------------------------
def test_password_hashes_are_salted_scrypt_and_verify() -> None:
    first, second = auth.hash_password("s3cret-passw0rd"), auth.hash_password("s3cret-passw0rd")
    assert first.startswith("scrypt$") and first != second  # per-hash random salt
    assert "s3cret" not in first
    assert auth.verify_password("s3cret-passw0rd", first) and auth.verify_password("s3cret-passw0rd", second)
    assert not auth.verify_password("s3cret-passw0rD", first)
    assert not auth.verify_password("", first)
    assert not auth.verify_password("x" * 5000, first)  # over the length cap: refused, not hashed for ages
    scheme, n, r, p, salt, key = first.split("$")
    tampered = "$".join([scheme, n, r, p, salt, key[:-4] + ("AAA=" if key[-4:] != "AAA=" else "BBB=")])
    assert not auth.verify_password("s3cret-passw0rd", tampered)
    for broken in ("", "plain", "bcrypt$1$2$3$4$5", "scrypt$x$8$1$AA==$AA=="):
        assert not auth.verify_password("s3cret-passw0rd", broken)


def test_weak_passwords_and_odd_user_names_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="at least"):
        auth.hash_password("short")
    for bad in ("", "  ", "a b", "<img src=x>", "x" * 65, "../etc", "-dash"):
        with pytest.raises(InvalidRequest):
            auth.clean_username(bad)
    assert auth.clean_username("  Alice.Smith@lab ") == "alice.smith@lab"


def test_login_throttle_refuses_a_name_after_repeated_failures() -> None:
    throttle = auth.LoginThrottle(max_failures=3, window_s=60)
    for _ in range(3):
        assert not throttle.blocked("bob")
        throttle.failed("bob")
    assert throttle.blocked("bob") and not throttle.blocked("carol")
    throttle.succeeded("bob")
    assert not throttle.blocked("bob")


# -- users and roles in the database ------------------------------------------------------------------
def test_single_user_mode_allows_everything_as_local(lab: Lab) -> None:
    assert not auth.users_configured(lab)
    for action in auth.PERMISSIONS:
        assert auth.require(lab, None, action) == "local"
    with pytest.raises(ValueError, match="unknown action"):
        auth.require(lab, None, "fly")


def test_roles_are_enforced_from_the_database(lab: Lab) -> None:
    auth.add_user(lab, "Admin", ADMIN_PW, "admin")
    auth.add_user(lab, "lena", LABELER_PW, "labeler")
    assert auth.users_configured(lab)
    with pytest.raises(Conflict):
        auth.add_user(lab, "ADMIN", ADMIN_PW, "admin")  # names ignore case
    with pytest.raises(InvalidRequest):
        auth.add_user(lab, "eve", ADMIN_PW, "superuser")
    # stored: a hash, never the password
    with lab.sessions() as s:
        stored = {u.name: u.password_hash for u in s.query(User)}
    assert set(stored) == {"admin", "lena"} and all(ADMIN_PW not in h and LABELER_PW not in h for h in stored.values())

    assert auth.authenticate(lab, "admin", ADMIN_PW) and auth.authenticate(lab, " Lena ", LABELER_PW)
    assert not auth.authenticate(lab, "lena", ADMIN_PW) and not auth.authenticate(lab, "nobody", ADMIN_PW)

    with pytest.raises(Forbidden, match="Log in"):
        auth.require(lab, None, "view")  # users exist: nobody logged in is nobody
    for action in ("view", "ingest", "label"):
        assert auth.require(lab, "lena", action) == "lena"
    for action in ("curate", "delete", "import", "export", "train", "admin"):
        with pytest.raises(Forbidden, match="labeler"):
            auth.require(lab, "lena", action)
        assert auth.require(lab, "Admin", action) == "admin"
    with pytest.raises(Forbidden):
        auth.require(lab, "<script>", "view")

    auth.set_role(lab, "lena", "admin")  # promotion and demotion take effect at once
    assert auth.require(lab, "lena", "delete") == "lena"
    auth.set_role(lab, "lena", "labeler")
    with pytest.raises(Forbidden):
        auth.require(lab, "lena", "delete")
    auth.set_active(lab, "lena", False)
    with pytest.raises(Forbidden, match="disabled"):
        auth.require(lab, "lena", "view")
    assert not auth.authenticate(lab, "lena", LABELER_PW)
    auth.set_active(lab, "lena", True)
    auth.set_password(lab, "lena", "a-new-password-2")
    assert not auth.authenticate(lab, "lena", LABELER_PW) and auth.authenticate(lab, "lena", "a-new-password-2")
    auth.set_password(lab, "lena", LABELER_PW)
    with pytest.raises(NotFound):
        auth.remove_user(lab, "nobody")
    with lab.sessions() as s:
        details = [a.details for a in s.query(AuditLog).filter(AuditLog.target_type == "user")]
    assert details and not any(LABELER_PW in str(d) or "a-new-password-2" in str(d) for d in details)


def test_binding_rules() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        auth.check_bind(host, share=False, with_users=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(LaunchRefused, match="users add"):
            auth.check_bind(host, share=False, with_users=False)
        auth.check_bind(host, share=False, with_users=True)
    with pytest.raises(LaunchRefused, match="share"):
        auth.check_bind("127.0.0.1", share=True, with_users=False)


def test_app_refuses_to_listen_on_all_interfaces_without_users(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", "--data", str(tmp_path), "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Refusing to listen on 0.0.0.0 without user accounts" in proc.stderr


def test_every_public_endpoint_has_a_declared_action(tmp_path: Path) -> None:
    from webapp.ui import build_ui

    with Lab.open(Settings(data_dir=tmp_path, match_threshold=0.8)) as lab:
        demo = build_ui(lab)
    public = {fn.api_name for fn in demo.fns.values() if getattr(fn, "api_visibility", "public") == "public"}
    # Gradio names unnamed callbacks "lambda_3" etc.; those are timers and refreshes that
    # should be api_visibility="private" (reported to their tab's owner), not a role decision
    public = {name for name in public if not re.fullmatch(r"(lambda|partial)(_\d+)?", name)}
    assert public - set(auth.ENDPOINT_ACTIONS) == set(), "add new endpoints to pipeline.auth.ENDPOINT_ACTIONS"
    assert set(auth.ENDPOINT_ACTIONS.values()) <= set(auth.PERMISSIONS)


# -- the running app behind a login ------------------------------------------------------------------
@dataclass(frozen=True)
class SecuredApp:
    url: str
    settings: Settings


@pytest.fixture(scope="module")
def secured_app(tmp_path_factory: pytest.TempPathFactory, make_database_url) -> Iterator[SecuredApp]:
    data_dir = tmp_path_factory.mktemp("secured")
    url = make_database_url()
    settings = Settings(data_dir=data_dir, database_url=url, match_threshold=0.8)
    db_args = ["--database-url", url] if url else []
    # the first user through the real CLI (password on stdin), the others in-process
    proc = subprocess.run(
        [sys.executable, "app.py", "--data", str(data_dir), *db_args, "users", "add", "boss", "--role", "admin",
         "--password-stdin"],
        cwd=REPO, input=ADMIN_PW + "\n", capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Lab.open(settings) as lab:
        auth.add_user(lab, "lena", LABELER_PW, "labeler")
        auth.add_user(lab, "gone", LABELER_PW, "labeler")
    with start_app(data_dir, env={"DATABASE_URL": url} if url else None) as app_url:
        yield SecuredApp(app_url, settings)


def test_every_route_needs_a_login(secured_app: SecuredApp) -> None:
    base = secured_app.url.rstrip("/")
    for path in ("/config", "/gradio_api/info", "/gradio_api/queue/data?session_hash=x", "/gradio_api/file=app.py",
                 "/gradio_api/upload_progress?upload_id=x"):
        assert httpx.get(base + path, timeout=10).status_code == 401, path
    for path in ("/gradio_api/queue/join", "/gradio_api/upload", "/gradio_api/call/delete_person",
                 "/gradio_api/run/delete_person"):
        assert httpx.post(base + path, json={}, timeout=10).status_code == 401, path
    page = httpx.get(base + "/", timeout=10).text
    # the login page: no components, no data (Gradio does embed the API's schema in it)
    assert '"auth_required":true' in page and '"components":[]' in page
    assert str(secured_app.settings.data_dir) not in page and "Detector:" not in page
    with pytest.raises(Exception):
        Client(secured_app.url, verbose=False)
    with pytest.raises(Exception):
        Client(secured_app.url, auth=("boss", "wrong password!"), verbose=False)


def test_labeler_is_refused_admin_endpoints_and_admin_is_not(secured_app: SecuredApp) -> None:
    labeler = Client(secured_app.url, auth=("lena", LABELER_PW), verbose=False)
    labeler.predict(api_name="/list_people")  # viewing is allowed
    for args, api in ((("Anyone", True), "/delete_person"), (("A", "B"), "/rename_person"),
                      (("A", "B"), "/merge_people")):
        with pytest.raises(Exception, match="may not"):
            labeler.predict(*args, api_name=api)
    admin = Client(secured_app.url, auth=("boss", ADMIN_PW), verbose=False)
    with pytest.raises(Exception, match="No person called"):  # past the role check, into the pipeline
        admin.predict("Anyone", True, api_name="/delete_person")


def test_a_removed_user_is_refused_at_once(secured_app: SecuredApp) -> None:
    client = Client(secured_app.url, auth=("gone", LABELER_PW), verbose=False)
    client.predict(api_name="/list_people")
    with Lab.open(secured_app.settings) as lab:  # e.g. `python app.py users remove gone` while the app runs
        auth.remove_user(lab, "gone", by="boss")
    with pytest.raises(Exception, match="no longer exists"):
        client.predict(api_name="/list_people")  # the browser session logged in before: still refused


# Other tabs' admin endpoints: their callbacks check the role too.
ADMIN_ENDPOINTS_ELSEWHERE = [
    pytest.param("/export_dataset", ("yolo", False)),
    pytest.param("/split_person", ("Anyone", 0.5)),
]


@pytest.mark.parametrize(("api", "args"), ADMIN_ENDPOINTS_ELSEWHERE)
def test_labeler_is_refused_admin_endpoints_of_other_tabs(secured_app: SecuredApp, api: str, args: tuple) -> None:
    labeler = Client(secured_app.url, auth=("lena", LABELER_PW), verbose=False)
    with pytest.raises(Exception, match="may not"):
        labeler.predict(*args, api_name=api)
