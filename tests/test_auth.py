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
from gradio_client import Client, handle_file

from pipeline import auth
from pipeline.auth import Forbidden, LaunchRefused
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.settings import Settings
from storage.orm import AuditLog, User, UserRole
from pipeline.library.ingest import Upload, ingest
from tests.conftest import astronaut_photo, start_app

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


def test_login_throttle_counts_per_address_and_cannot_lock_an_owner_out_by_name() -> None:
    throttle = auth.LoginThrottle(max_per_pair=3, max_per_address=5, max_per_name=8, window_s=60)
    for _ in range(3):
        assert not throttle.blocked("boss", "10.0.0.66")
        throttle.failed("boss", "10.0.0.66")
    assert throttle.blocked("boss", "10.0.0.66")  # that name from that address
    assert not throttle.blocked("boss", "10.0.0.1")  # the owner, elsewhere: still in
    assert not throttle.blocked("carol", "10.0.0.66")
    for name in ("carol", "dave"):
        throttle.failed(name, "10.0.0.66")
    assert throttle.blocked("erin", "10.0.0.66")  # 5 failures from one address: every name
    throttle.succeeded("boss", "10.0.0.1")  # the owner's usual machine
    # a guess spread over many addresses: the name is refused everywhere but where its
    # owner logged in before
    for n in range(8):
        throttle.failed("boss", f"10.1.0.{n}")
    assert throttle.blocked("boss", "10.2.0.1") and not throttle.blocked("boss", "10.0.0.1")
    throttle.succeeded("carol", "10.0.0.7")
    assert not throttle.blocked("carol", "10.0.0.7")
    small = auth.LoginThrottle(max_keys=50)  # a spray of made-up names stays bounded
    for n in range(500):
        small.failed(f"user{n}", f"10.3.{n // 250}.{n % 250}")
    assert max(len(small._by_pair), len(small._by_address), len(small._by_name)) <= 50


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


@pytest.mark.slow  # runs python app.py in a subprocess
def test_app_refuses_to_listen_on_all_interfaces_without_users(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", "--data", str(tmp_path), "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Refusing to listen on 0.0.0.0 without user accounts" in proc.stderr


def test_every_endpoint_is_declared_and_checks_the_role_itself(tmp_path: Path) -> None:
    """Every event of the UI (hidden ones, page loads, timers and chained steps included) is
    declared with its API name and action, and refuses a removed user and a labeler on its
    own, before the web server's checks (webapp/endpoints.py)."""
    import gradio as gr
    from gradio.helpers import special_args

    from webapp.endpoints import check_declared, declaration_of
    from webapp.ui import build_ui

    with Lab.open(Settings(data_dir=tmp_path, match_threshold=0.8)) as lab:
        auth.add_user(lab, "boss", ADMIN_PW, "admin")
        auth.add_user(lab, "lena", LABELER_PW, "labeler")
        demo = build_ui(lab)
        # browser-only (js) steps have no server function: nothing to declare or check
        server_fns = [fn for fn in demo.fns.values() if fn.fn is not None]
        names = [fn.api_name for fn in server_fns]
        assert len(names) == len(set(names)) and not any(re.fullmatch(r"(lambda|partial)(_\d+)?", n) for n in names)
        # the table and the UI agree both ways: nothing undeclared, nothing stale
        assert set(names) == set(auth.ENDPOINT_ACTIONS), set(names) ^ set(auth.ENDPOINT_ACTIONS)
        assert set(auth.ENDPOINT_ACTIONS.values()) <= set(auth.PERMISSIONS)
        select = gr.EventData(None, {"index": 0, "value": None})

        def call(block_fn, username: str | None) -> str:
            inputs, *_ = special_args(block_fn.fn, [None] * len(block_fn.inputs), request=gr.Request(username=username),
                                      event_data=select)
            try:
                block_fn.fn(*inputs)
            except gr.Error as exc:
                return exc.message
            return "ran"

        for block_fn in server_fns:
            declared = declaration_of(block_fn.fn)
            assert declared is not None and declared.api_name == block_fn.api_name, block_fn.api_name
            assert "no longer exists" in call(block_fn, "gone"), block_fn.api_name
            assert "Log in first" in call(block_fn, None), block_fn.api_name
            if UserRole.LABELER not in auth.PERMISSIONS[declared.action]:
                assert "may not" in call(block_fn, "lena"), block_fn.api_name

        with gr.Blocks() as rogue:  # an event added without a declaration is refused
            gr.Button().click(lambda: None, None, None, api_name="sneaky")
        with pytest.raises(RuntimeError, match="sneaky"):
            check_declared(rogue)


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
        auth.add_user(lab, "other-admin", ADMIN_PW, "admin")
        ingest(lab, [Upload("one.jpg", data=astronaut_photo(7))])  # something to export
    with start_app(data_dir, env={"DATABASE_URL": url} if url else None) as app_url:
        yield SecuredApp(app_url, settings)


def _login(app: SecuredApp, name: str, password: str, address: str | None = None) -> tuple[httpx.Client, int]:
    """An HTTP client that logged in like the browser does (Gradio's /login sets a cookie).
    ``address``: sent as X-Forwarded-For, which the server believes from 127.0.0.1 (a
    reverse proxy on the same machine): stands for a caller at that address."""
    client = httpx.Client(base_url=app.url.rstrip("/"), timeout=60,
                          headers={"X-Forwarded-For": address} if address else None)
    response = client.post("/login", data={"username": name, "password": password})
    return client, response.status_code


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
    with pytest.raises(Exception, match="401 Unauthorized"):  # the login ended with the account
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


def _queue_join(client: httpx.Client, fn_index: int) -> httpx.Response:
    """What the browser sends to run event number ``fn_index`` (inputs do not matter here:
    a refused caller never gets as far as them)."""
    return client.post("/gradio_api/queue/join", json={
        "data": [], "fn_index": fn_index, "session_hash": f"s{fn_index}x", "event_data": None, "trigger_id": None})


@pytest.mark.parametrize("how", ["removed", "disabled"])
def test_a_removed_or_disabled_user_is_refused_on_every_fn_index(secured_app: SecuredApp, how: str) -> None:
    name = f"temp-{how}"
    with Lab.open(secured_app.settings) as lab:
        auth.add_user(lab, name, LABELER_PW, "labeler")
    client, status = _login(secured_app, name, LABELER_PW)
    assert status == 200
    dependencies = client.get("/config").json()["dependencies"]
    fn_indexes = [d["id"] for d in dependencies]
    # every event that runs on the server, hidden ones included (browser-only js steps,
    # such as the Label tab's key-gate hooks, have no backend function)
    assert len([d for d in dependencies if d["backend_fn"]]) == len(auth.ENDPOINT_ACTIONS)
    people = next(d["id"] for d in dependencies if d["api_name"] == "people_tab_open")  # a hidden one
    assert _queue_join(client, people).status_code == 200  # logged in: the call is queued
    with Lab.open(secured_app.settings) as lab:  # `python app.py users remove|disable NAME` while it runs
        (auth.remove_user if how == "removed" else lambda lab, n, by: auth.set_active(lab, n, False, by=by))(
            lab, name, by="boss")
    refused = {i: _queue_join(client, i).status_code for i in fn_indexes}
    assert set(refused.values()) == {401}, refused
    for path in ("/config", "/gradio_api/info", "/gradio_api/upload_progress?upload_id=x"):
        assert client.get(path).status_code == 401, path
    # the login itself has ended: the account coming back does not revive this session
    with Lab.open(secured_app.settings) as lab:
        if how == "removed":
            auth.add_user(lab, name, LABELER_PW, "labeler")
        else:
            auth.set_active(lab, name, True)
    assert client.get("/config").status_code == 401
    again, status = _login(secured_app, name, LABELER_PW)
    assert status == 200 and again.get("/config").status_code == 200


def _gradio_routes() -> list[tuple[str, str]]:
    """(method, path) of every route this Gradio version serves, parameters filled in."""
    import gradio as gr
    from gradio.routes import App

    with gr.Blocks() as demo:
        gr.Markdown("routes")
    def walk(routes: list, prefix: str = "") -> list[tuple[str, str]]:
        out = []
        for route in routes:
            included = getattr(route, "include_context", None)  # FastAPI's lazily included routers
            if included is not None and not callable(included):
                out += walk(included.included_router.routes, prefix + included.prefix)
            elif getattr(route, "path", None):
                path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
                out += [(method, path) for method in sorted(getattr(route, "methods", None) or {"GET"})]
        return out

    return walk(App.create_app(demo).routes)


def test_anonymous_callers_reach_nothing_but_the_login_page(secured_app: SecuredApp) -> None:
    from webapp.http_guard import PUBLIC_PATHS, PUBLIC_PREFIXES

    base = secured_app.url.rstrip("/")
    routes = _gradio_routes()
    assert ("POST", "/gradio_api/cancel") in routes and len(routes) > 60
    open_routes = []
    for method, path in routes:
        response = httpx.request(method, base + path, json={}, timeout=30)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            continue  # the login page and its scripts, styles and fonts
        if response.status_code != 401:
            open_routes.append((method, path, response.status_code))
    assert not open_routes, open_routes
    cancel = httpx.post(base + "/gradio_api/cancel", timeout=10,
                        json={"session_hash": "x", "fn_index": 0, "event_id": "x"})
    assert cancel.status_code == 401


def test_every_response_carries_the_security_headers(secured_app: SecuredApp) -> None:
    from webapp.http_guard import SECURITY_HEADERS

    base = secured_app.url.rstrip("/")
    admin, _ = _login(secured_app, "boss", ADMIN_PW)
    responses = [httpx.get(base + "/", timeout=10), httpx.get(base + "/config", timeout=10),
                 httpx.get(base + "/assets/nothing-here.js", timeout=10),
                 httpx.post(base + "/login", data={"username": "boss", "password": "wrong password!"}, timeout=10),
                 httpx.post(base + "/gradio_api/cancel", json={}, timeout=10),
                 admin.get("/"), admin.get("/config"), admin.get("/facelab/download/" + "x" * 32),
                 admin.get("/gradio_api/file=/etc/passwd"), admin.delete("/config")]
    assert {r.status_code for r in responses} >= {200, 401, 404}
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.request.url, response.status_code, name)
    assert "frame-ancestors 'none'" in responses[0].headers["content-security-policy"]


def test_login_is_throttled_per_address_so_nobody_can_lock_an_owner_out(secured_app: SecuredApp) -> None:
    attacker, owner, colleague = "10.66.0.1", "10.0.0.5", "10.0.0.9"
    for _ in range(10):  # the attacker guesses the admin's password
        assert _login(secured_app, "boss", "not the password", attacker)[1] == 400
    assert _login(secured_app, "boss", ADMIN_PW, attacker)[1] == 400  # refused from there, even the right one
    assert _login(secured_app, "boss", ADMIN_PW, owner)[1] == 200  # the owner is not locked out
    for n in range(10):  # the same address tries other names
        assert _login(secured_app, f"made-up-{n}", "not the password", attacker)[1] == 400
    assert _login(secured_app, "lena", LABELER_PW, attacker)[1] == 400  # that address: no name at all
    assert _login(secured_app, "lena", LABELER_PW, colleague)[1] == 200


def test_an_export_is_served_once_and_only_to_the_admin_who_made_it(secured_app: SecuredApp, tmp_path: Path) -> None:
    import tempfile
    import zipfile

    data_dir = secured_app.settings.data_dir
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    admin = Client(secured_app.url, auth=("boss", ADMIN_PW), verbose=False)
    link, message = admin.predict("yolo", False, api_name="/export_dataset")
    token = re.search(r"facelab/download/([A-Za-z0-9_-]{32})", link).group(1)
    assert "Exported 1 image" in message and token not in message
    pending = sorted(p.name for p in (data_dir / "exports").iterdir())
    assert pending == [f"{token}.json", f"{token}.zip"]  # inside the data folder, nowhere else
    assert not [p for p in (data_dir / "ui-cache").rglob("*.zip")]
    assert not {p for p in Path(tempfile.gettempdir()).iterdir() if "export" in p.name} - temp_before

    path = f"/facelab/download/{token}"
    assert httpx.get(secured_app.url.rstrip("/") + path, timeout=10).status_code == 401  # anonymous
    labeler, _ = _login(secured_app, "lena", LABELER_PW)
    assert labeler.get(path).status_code == 403  # a labeler may not export at all
    other, _ = _login(secured_app, "other-admin", ADMIN_PW)
    assert other.get(path).status_code == 404  # another admin: not theirs
    owner, _ = _login(secured_app, "boss", ADMIN_PW)
    response = owner.get(path)
    assert response.status_code == 200, response.text
    assert "attachment" in response.headers["content-disposition"] and "no-store" in response.headers["cache-control"]
    (tmp_path / "got.zip").write_bytes(response.content)
    with zipfile.ZipFile(tmp_path / "got.zip") as zf:
        assert "facelab.json" in zf.namelist() and any(n.startswith("labels/") for n in zf.namelist())
    assert owner.get(path).status_code == 404  # once
    assert not list((data_dir / "exports").iterdir())  # and deleted after sending

    # the uploaded archive of an import does not stay behind either
    imported = admin.predict(handle_file(str(tmp_path / "got.zip")), "auto", api_name="/import_dataset")
    assert "already stored" in str(imported), imported
    assert not [p for p in (data_dir / "ui-cache").rglob("*.zip")]


@pytest.mark.browser
def test_the_app_works_in_chromium_under_its_security_policy(secured_app: SecuredApp, tmp_path: Path) -> None:
    """Debian's Chromium (Playwright), scripted: log in, open every tab, export and
    download the dataset through the link. The page must run with the app's
    Content-Security-Policy without a single violation."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.set_default_timeout(60_000)
        context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                                "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
        page = context.new_page()
        page.goto(secured_app.url)
        page.fill("input[type=text]", "boss")
        page.fill("input[type=password]", ADMIN_PW)
        page.keyboard.press("Enter")
        page.wait_for_selector("#status-line")
        for tab in ("Detect", "Label", "Search", "People", "Train", "Data"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1000)  # let the tab's load events render
        page.locator("#export-button").click()
        link = page.locator("#export-file a")
        link.wait_for()
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name.startswith("facelab-yolo-") and saved.stat().st_size > 1000
        assert page.evaluate("window.__csp") == []
        headers = page.request.get(secured_app.url).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        browser.close()
