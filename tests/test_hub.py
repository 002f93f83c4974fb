"""msr's JupyterHub (`make hub`: msr.hub.configure through jupyterhub_config.py) for real: the hub, its proxy from npm, the
dashboard as its voila service asking the session's REST service, and Debian's chromium driven by playwright. One hub
for the module; the tests run in order (signup, approval, login, lockout, and the login rate limit last)."""
from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import BIN, ROOT, copy_project, free_port, served_env, set_params, skip_without_browser, start_server
from msr.hub import PROXY, proxy_command

SCREENSHOTS = ROOT / "outputs" / "screenshots"
ADMIN, USER, STRANGER, LEAVER = "boss", "ada", "eve", "zoe"
PASSWORDS = {ADMIN: secrets.token_urlsafe(16), USER: "ada's long password 1", STRANGER: "eve's long password 2",
             LEAVER: "zoe's long password 3"}
FAILS = 3  # hub.allowed_failed_logins of this module's hub
PENDING_CAP = 10  # hub.max_pending_signups of this module's hub

skip_without_browser()
try: proxy_command()
except FileNotFoundError:
    pytest.skip(f"configurable-http-proxy is not at {PROXY}: npm could not install it (make hub-proxy)", allow_module_level=True)


class Hub:
    "A running hub: its address, project folder, state folder, log and process."
    def __init__(self, url, project, state, log, proc, service):
        self.url, self.project, self.state, self.log, self.proc, self.service = url, project, state, log, proc, service

    def processes(self) -> dict[str, psutil.Process]:
        "The hub, its proxy and the dashboard service (voila), by role."
        hub = psutil.Process(self.proc.pid)
        found = {"hub": hub}
        for child in hub.children():
            line = " ".join(child.cmdline())
            if "configurable-http-proxy" in line: found["proxy"] = child
            elif "voila" in line: found["voila"] = child
        return found

    def kernels(self) -> list[psutil.Process]:
        return [k for k in self.processes()["voila"].children(recursive=True)
                if k.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(k.cmdline())]


def stop_hub(proc):
    "The hub takes 30-60 s to stop by itself: SIGTERM, a short wait, then SIGKILL for it and everything it started."
    try: family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess: return
    proc.send_signal(signal.SIGTERM)
    try: proc.wait(timeout=3)
    except Exception: pass
    for p in family:
        try: p.kill()
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(family, timeout=10)


def fetch(url: str, headers: dict | None = None) -> tuple[int, str, str]:
    "(status, final URL, body) of a GET without cookies, redirects followed."
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.url, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.url, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def hub(served_project, msr_server, sample_zip, tmp_path_factory):
    """`jupyterhub -f jupyterhub_config.py` (what `make hub` runs) over a project folder of its own (free ports, lockout after
    3 failures, a login burst the module's logins fit in), its dashboard pages asking the session's msr-serve. The folder is
    a runnable project (the admin desk's retrain runs its real `dvc repro` on the sample) with a registry of its own: a copy
    of `served_project`'s (msr-recommender v1, champion), its new runs in an experiment of its own."""
    project = copy_project(tmp_path_factory.mktemp("hub-project") / "msr")
    shutil.copy2(served_project / "mlflow.db", project / "mlflow.db")
    port, service_port = free_port(), free_port()
    set_params(project, hub={"port": port, "hub_port": free_port(), "proxy_api_port": free_port(), "service_port": service_port,
                             "allowed_failed_logins": FAILS, "lockout_seconds": 600, "login_rate": 6, "login_burst": 20,
                             "signup_rate": 6, "signup_burst": 6, "max_pending_signups": PENDING_CAP},
               ingest={"source": str(sample_zip), "sha256": "", "offline_source": ""})
    env = {**served_env(served_project, project / "unused.sqlite"), "MSR_PROJECT_DIR": str(project), "MSR_API_URL": msr_server.url,
           "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "msr-hub-desk",
           "MSR_HUB_ADMIN": ADMIN, "MSR_HUB_ADMIN_PASSWORD": PASSWORDS[ADMIN]}  # as `make hub` takes them: in the environment
    log = project / "hub.log"
    url = f"http://127.0.0.1:{port}"
    proc = start_server([str(BIN / "jupyterhub"), "-f", str(ROOT / "jupyterhub_config.py")], project, env, f"{url}/hub/login", log)
    try:
        deadline = time.monotonic() + 120
        while "/hub/login" not in fetch(f"{url}/services/dashboard/")[1]:  # the service answers (through the proxy)
            assert time.monotonic() < deadline, f"the dashboard service did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Hub(url, project, project / "data" / "hub", log, proc, service_port)
    finally: stop_hub(proc)



def new_page(browser):
    return browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()


def log_in(page, hub: Hub, name: str, password: str | None = None):
    "Fill the hub's login form and send it (the browser lands wherever the hub sends it)."
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name] if password is None else password)
    page.click("#login_submit")
    page.wait_for_load_state()


def sign_up(browser, hub: Hub, name: str) -> str:
    "Sign `name` up in a browser of its own; the message the hub answers."
    page = new_page(browser)
    try:
        page.goto(f"{hub.url}/hub/signup")
        page.fill("input[name=username]", name)
        page.fill("input[name=signup_password]", PASSWORDS[name])
        page.fill("input[name=signup_password_confirmation]", PASSWORDS[name])
        page.click("#signup_submit, input[type=submit], button[type=submit]")
        page.wait_for_selector(".alert", timeout=30_000)
        return page.inner_text(".alert")
    finally: page.context.close()


def authorized(hub: Hub, name: str) -> bool | None:
    "NativeAuthenticator's approval of `name` in the hub's database (None: no such signup)."
    with sqlite3.connect(hub.state / "jupyterhub.sqlite") as con:
        row = con.execute("select is_authorized from users_info where username = ?", (name,)).fetchone()
    return None if row is None else bool(row[0])


@pytest.fixture(scope="module")
def admin(hub, browser):
    "The first admin, logged in, in a browser of their own."
    page = new_page(browser)
    log_in(page, hub, ADMIN)
    page.wait_for_selector(".msr-go", timeout=60_000)  # the admin lands on the dashboard too
    try: yield page
    finally: page.context.close()


ROUTES = ["/", "/hub/", "/hub/home", "/hub/admin", "/hub/authorize", "/hub/token", "/hub/change-password",
          f"/hub/change-password/{ADMIN}", "/hub/spawn", f"/hub/user/{ADMIN}/", f"/user/{ADMIN}/", "/services/dashboard/",
          "/services/dashboard/?voila=1", "/services/dashboard/voila/render/dashboard.ipynb"]


def test_signed_out_visits_go_to_login(hub):
    for route in ROUTES:
        status, final, body = fetch(hub.url + route)
        assert status == 200 and final.startswith(f"{hub.url}/hub/login"), (route, status, final)
        assert "msr-go" not in body
    for route in (f"/hub/authorize/{ADMIN}", f"/hub/discard/{ADMIN}"):  # approve/discard: a login, else a refusal
        status, final, _ = fetch(hub.url + route, {"Sec-Fetch-Site": "same-origin"})
        assert final.startswith(f"{hub.url}/hub/login") or status == 403, (route, status, final)
    for route in ("/hub/api/users", "/services/dashboard/api/kernels", "/services/dashboard/api/kernels/x/channels"):
        status, final, _ = fetch(hub.url + route)
        assert status in (401, 403) or final.startswith(f"{hub.url}/hub/login"), (route, status, final)


def test_state_is_private_and_secrets_stay_off_command_lines(hub):
    for name in ("jupyterhub.sqlite", "jupyterhub_cookie_secret", "desk-token"):
        assert (hub.state / name).stat().st_mode & 0o777 == 0o600, name
    assert hub.state.stat().st_mode & 0o777 == 0o700
    assert not (hub.state / "admin-password").exists()  # the admin's password came from the environment
    procs = hub.processes()
    assert set(procs) == {"hub", "proxy", "voila"}, procs
    secrets_ = {"admin password": PASSWORDS[ADMIN], "desk token": (hub.state / "desk-token").read_text().strip(),
                "proxy token": procs["proxy"].environ()["CONFIGPROXY_AUTH_TOKEN"],
                "service token": procs["voila"].environ()["JUPYTERHUB_API_TOKEN"]}
    for role, p in procs.items():
        line = Path(f"/proc/{p.pid}/cmdline").read_bytes().decode()
        for what, value in secrets_.items(): assert value not in line, f"the {what} is on the {role}'s command line"
    for role in ("proxy", "voila"):  # read once by the hub, never handed on
        assert "MSR_HUB_ADMIN_PASSWORD" not in procs[role].environ(), role
    assert PASSWORDS[ADMIN] not in hub.log.read_text() and secrets_["desk token"] not in hub.log.read_text()


def test_an_unapproved_user_is_refused(hub, browser):
    assert "sent to the admin" in sign_up(browser, hub, STRANGER)
    assert authorized(hub, STRANGER) is False
    page = new_page(browser)
    try:
        log_in(page, hub, STRANGER)
        assert f"User {STRANGER} has not been authorized" in page.inner_text("body")
        page.goto(f"{hub.url}/services/dashboard/")
        assert "/hub/login" in page.url and page.locator(".msr-go").count() == 0
    finally: page.context.close()


def test_signup_approval_login_and_recommendations(hub, browser, admin, served_project, capsys):
    "A person signs up, the admin approves them on the hub's page, they log in and get 20 recommendations."
    import pandas as pd
    assert "sent to the admin" in sign_up(browser, hub, USER)
    admin.goto(f"{hub.url}/hub/authorize")
    admin.click(f"tr#{USER} a:has-text('Authorize')")  # the admin's own click (Sec-Fetch-Site: same-origin)
    admin.wait_for_selector(f"tr#{USER}.success")
    assert authorized(hub, USER) is True
    page = new_page(browser)
    try:
        t0 = time.perf_counter()
        log_in(page, hub, USER)
        page.wait_for_selector(".msr-go", timeout=60_000)
        first_render = time.perf_counter() - t0
        assert page.url == f"{hub.url}/services/dashboard/"
        assert page.inner_text(".msr-user-name") == USER
        (kernel,) = hub.kernels()[-1:]
        env = kernel.environ()
        assert (env["MSR_USER"], env["MSR_USER_ADMIN"], env["MSR_USER_GROUPS"]) == (USER, "", "[]")
        assert not [k for k in env if k.startswith("JUPYTERHUB_")]  # the service's hub token stays in voila
        pt = pd.read_parquet(served_project / "data/processed/playlist_tracks.parquet")
        words = [w.lower() for w in pt["playlist_name"].value_counts().index[0].split()[:2]]
        page.fill(".msr-playlist-search input", " ".join(words))
        page.wait_for_function(
            """words => { const o = [...document.querySelectorAll('.msr-playlist select option')].map(e => e.textContent.toLowerCase());
                         return o.length > 0 && o.every(t => words.every(w => t.includes(w))); }""", arg=words, timeout=30_000)
        page.locator(".msr-playlist select").select_option(index=0)
        page.click(".msr-go")
        page.wait_for_selector("tr.msr-rec", timeout=60_000)
        assert page.locator("tr.msr-rec").count() == 20
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "hub-dashboard.png"), full_page=True)
        page.goto(f"{hub.url}/hub/spawn")  # no server of one's own
        assert page.locator(".msr-go").count() == 0 and "/user/" not in page.url
        page.goto(f"{hub.url}/services/dashboard/")
        page.click(".msr-user a:has-text('log out')")  # out of the dashboard and the hub
        page.wait_for_load_state()
        page.goto(f"{hub.url}/services/dashboard/")
        assert "/hub/login" in page.url and page.locator(".msr-go").count() == 0
    finally: page.context.close()
    with capsys.disabled(): print(f"\nhub: first dashboard render {first_render:.2f} s after the login form was sent")
    assert first_render < 15, first_render


def test_admin_page_knows_its_user(admin, hub):
    admin.goto(f"{hub.url}/services/dashboard/")
    admin.wait_for_selector(".msr-go", timeout=60_000)
    assert admin.inner_text(".msr-user-name") == ADMIN
    kernels = [k.environ() for k in hub.kernels()]
    assert any(e["MSR_USER"] == ADMIN and e["MSR_USER_ADMIN"] == "1" and "msr-admins" in e["MSR_USER_GROUPS"] for e in kernels)


# ---- the admin desk (the Admin tab, msr.admin / msr.desk) ----

NEWCOMER = "cy"
PASSWORDS[NEWCOMER] = "cy's long password 3"
TAB = ".lm-TabBar-tab:has-text('{}'), .p-TabBar-tab:has-text('{}')"


def open_admin_tab(page):
    page.click(TAB.format("Admin", "Admin"))
    page.wait_for_selector("tr.msr-version", timeout=60_000)


def desk_status(page, text: str, timeout: float = 60_000):
    "Wait until the Admin tab's status line says `text`; return it."
    page.wait_for_function("t => (document.querySelector('.msr-desk-status') || {}).innerText?.includes(t)", arg=text, timeout=timeout)
    return page.inner_text(".msr-desk-status")


HAS_OPTION = """([css, starts]) => [...document.querySelectorAll(css + ' select option')]
                   .some(o => o.textContent.replace(/\\u00a0/g, ' ').startsWith(starts))"""


def pick(page, css: str, starts: str):
    """Choose the option of the dropdown `css` whose label starts with `starts` (ipywidgets shows spaces as no-break spaces),
    once the page has it: the desk sets a table and its dropdown in two widget messages, so one can show before the other."""
    page.wait_for_function(HAS_OPTION, arg=[css, starts], timeout=30_000)
    labels = page.locator(f"{css} select option").all_inner_texts()
    page.locator(f"{css} select").select_option(label=next(label for label in labels if label.replace("\xa0", " ").startswith(starts)))


def registry(hub: Hub) -> dict:
    "msr-recommender's versions in the hub project's registry: {version: (aliases, tags)}."
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{hub.project}/mlflow.db")
    return {int(v.version): (set(client.get_model_version("msr-recommender", v.version).aliases), v.tags)
            for v in client.search_model_versions("name='msr-recommender'")}


def hub_groups(hub: Hub, name: str) -> list[str]:
    "`name`'s hub groups, asked of the hub's API with the desk's token."
    p = __import__("yaml").safe_load((hub.project / "params.yaml").read_text())["hub"]
    request = urllib.request.Request(f"http://127.0.0.1:{p['hub_port']}/hub/api/users/{name}",
                                     headers={"Authorization": f"token {(hub.state / 'desk-token').read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=30) as r: return json.load(r)["groups"]


def listen(page) -> list:
    "Collect the page's kernel websocket URLs and the frames it receives (widget states included)."
    seen = []
    page.on("websocket", lambda ws: (seen.append(("url", ws.url)), ws.on("framereceived", lambda p: seen.append(("frame", p)))))
    return seen


def kernel_and_model(seen: list, css: str) -> tuple[str, str]:
    "The page's kernel id and the widget model id of the widget classed `css`, from what its websocket received."
    kernel = next(re.search(r"/api/kernels/([0-9a-f-]{36})/channels", u).group(1) for k, u in seen if k == "url" and "/channels" in u)
    text = "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p for k, p in seen if k == "frame")
    at = text.index(f'"{css}"')
    ids = list(re.finditer(r'"comm_id":\s*"([0-9a-f]{32})"|"([0-9a-f]{32})":\s*\{', text[:at]))
    assert ids, text[max(0, at - 2000):at]
    return kernel, ids[-1].group(1) or ids[-1].group(2)


FORGE = """async ([kernel, model]) => {
  const url = location.origin.replace(/^http/, 'ws') + '/services/dashboard/api/kernels/' + kernel + '/channels?session_id=forged';
  return await new Promise(resolve => {
    const ws = new WebSocket(url);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      const header = {msg_id: 'forged-' + Date.now(), msg_type: 'comm_msg', username: 'forger', session: 'forged',
                      date: new Date().toISOString(), version: '5.3'};
      ws.send(JSON.stringify({header, parent_header: {}, metadata: {}, channel: 'shell', buffers: [],
                              content: {comm_id: model, data: {method: 'custom', content: {event: 'click'}}}}));
      setTimeout(() => { ws.close(); resolve('sent'); }, 2000);
    };
    ws.onclose = () => { if (!opened) resolve('refused'); };
  });
}"""


SHUTDOWN = """async kernel => {
  const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1];
  const r = await fetch('/services/dashboard/voila/api/shutdown/' + kernel,
                        {method: 'POST', headers: xsrf ? {'X-XSRFToken': decodeURIComponent(xsrf)} : {}});
  return r.status;
}"""


def audit_log(hub: Hub) -> list[dict]:
    path = hub.project / "data/desk/audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_admin_desk(hub, admin, browser, capsys):
    """The Admin tab: a retrain (the real `dvc repro` on the sample) in the background, one at a time; while it runs, the
    accounts (approve, make admin, a demoted admin refused at once, disable) and forged widget messages from a non-admin's
    page; then promote and roll back on the retrain's new version; every action in the audit log."""
    seen = listen(admin)
    t0 = time.perf_counter()
    admin.goto(f"{hub.url}/services/dashboard/")
    admin.wait_for_selector(".msr-go", timeout=60_000)
    first_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_admin_tab(admin)
    tab_load = time.perf_counter() - t0
    assert registry(hub)[1][0] == {"champion"} and admin.locator("tr.msr-version").count() == 1
    kernel = max((k for k in hub.kernels() if k.environ()["MSR_USER"] == ADMIN), key=lambda k: k.create_time())
    admin_rss = kernel.memory_info().rss / 2**20

    # a retrain, and a second one refused while it runs
    admin.click(".msr-retrain")
    desk_status(admin, "retrain started")
    admin.wait_for_selector(".msr-retrain-running", timeout=30_000)
    admin.click(".msr-retrain")
    assert "a retrain is already running (started by boss" in desk_status(admin, "already running")

    # accounts: a newcomer approved from the tab, ada made admin, then demoted (refused at her next click)
    assert "sent to the admin" in sign_up(browser, hub, NEWCOMER)
    admin.click(".msr-desk-refresh")
    admin.wait_for_selector(f"tr.msr-account:has-text('{NEWCOMER}')", timeout=30_000)
    pick(admin, ".msr-account-pick", NEWCOMER)
    admin.click(".msr-approve")
    desk_status(admin, f"approve {NEWCOMER}: done")
    assert authorized(hub, NEWCOMER) is True
    pick(admin, ".msr-account-pick", USER)
    admin.click(".msr-make-admin")
    desk_status(admin, f"make-admin {USER}: done")
    assert "msr-admins" in hub_groups(hub, USER)
    ada = new_page(browser)
    try:
        log_in(ada, hub, USER)
        ada.wait_for_selector(".msr-go", timeout=60_000)
        open_admin_tab(ada)  # an admin now
        pick(admin, ".msr-account-pick", USER)
        admin.click(".msr-remove-admin")
        desk_status(admin, f"remove-admin {USER}: done")
        assert "msr-admins" not in hub_groups(hub, USER)
        ada.click(".msr-desk-refresh")  # her page still has the tab; the hub says she is no admin now
        assert f"{USER} is not in the hub group msr-admins" in desk_status(ada, "not in the hub group")
    finally: ada.context.close()

    # a non-admin's page: no Admin tab, no admin widget; forged clicks on the admin's Promote reach nothing
    promote_model = kernel_and_model(seen, "msr-promote")
    champion_before, rows_before = registry(hub), len(audit_log(hub))
    cy = new_page(browser)
    try:
        cy_seen = listen(cy)
        log_in(cy, hub, NEWCOMER)
        cy.wait_for_selector(".msr-go", timeout=60_000)
        assert cy.locator(TAB.format("Admin", "Admin")).count() == 0 and cy.locator(".msr-admin, .msr-promote").count() == 0
        cy_kernel = kernel_and_model(cy_seen, "msr-go")[0]
        assert cy.evaluate(FORGE, [cy_kernel, promote_model[1]]) == "sent"  # her own kernel: no such widget
        assert cy.evaluate(FORGE, promote_model) == "refused"  # the admin's kernel: not hers (msr.hub.KernelOwner)
        assert cy.evaluate(SHUTDOWN, promote_model[0]) == 403  # nor may she end it (issue 21, item 12)
        assert cy.evaluate(SHUTDOWN, cy_kernel) == 204  # her own page's kernel: as the page does when it closes
    finally: cy.context.close()
    time.sleep(1)
    assert registry(hub) == champion_before and len(audit_log(hub)) == rows_before

    # disable the newcomer (made admin first): out of the admins, and their next login is refused
    pick(admin, ".msr-account-pick", NEWCOMER)
    admin.click(".msr-make-admin")
    desk_status(admin, f"make-admin {NEWCOMER}: done")
    admin.click(".msr-disable")
    desk_status(admin, f"disable {NEWCOMER}: done")
    assert authorized(hub, NEWCOMER) is False and "msr-admins" not in hub_groups(hub, NEWCOMER)
    page = new_page(browser)
    try:
        log_in(page, hub, NEWCOMER)
        assert f"User {NEWCOMER} has not been authorized" in page.inner_text("body")
    finally: page.context.close()

    # the retrain ends; its log and new version show
    t_wait = time.perf_counter()
    admin.wait_for_selector(".msr-retrain-finished, .msr-retrain-failed", timeout=240_000)
    assert admin.locator(".msr-retrain-finished").count() == 1, admin.inner_text(".msr-retrain-log")
    assert "Running stage 'register'" in admin.inner_text(".msr-retrain-log")
    admin.wait_for_function("() => document.querySelectorAll('tr.msr-version').length == 2", timeout=60_000)
    waited = time.perf_counter() - t_wait
    versions = registry(hub)
    assert set(versions) == {1, 2}

    # promote and roll back, whichever the retrain's own decision was (v2 champion: roll back to v1, then promote v2 again)
    steps = [(1, "rollback"), (2, "promote")] if "champion" in versions[2][0] else [(2, "promote"), (1, "rollback")]
    for version, action in steps:
        pick(admin, ".msr-version-pick", f"v{version} ")
        admin.fill(".msr-reason input", f"{action} test {version}")
        admin.click(f".msr-{action}")
        desk_status(admin, f"{action} v{version}: done, champion is v{version}")
        aliases, tags = registry(hub)[version]
        assert "champion" in aliases and sum("champion" in a for a, _ in registry(hub).values()) == 1, registry(hub)
        assert (tags["msr.promoted_by"], tags["msr.promoted_reason"], tags["msr.promoted_action"]) == (ADMIN, f"{action} test {version}", action)
        assert tags["msr.promoted_at"].startswith(time.strftime("%Y-", time.gmtime()))

    # a forged click from the admin's own browser on the admin's own kernel does reach it (the forging works)
    before = len(audit_log(hub))
    kernel_id, retrain_model = kernel_and_model(seen, "msr-retrain")
    assert admin.evaluate(FORGE, [kernel_id, retrain_model]) == "sent"
    deadline = time.monotonic() + 30
    while len(audit_log(hub)) == before and time.monotonic() < deadline: time.sleep(0.5)
    assert audit_log(hub)[-1]["action"] == "retrain" and audit_log(hub)[-1]["who"] == ADMIN

    # the audit log: a row per action, who/when/what/outcome, private; shown in the tab
    rows = audit_log(hub)
    assert (hub.project / "data/desk/audit.jsonl").stat().st_mode & 0o777 == 0o600
    assert all(set(r) >= {"when", "who", "action", "target", "outcome"} for r in rows)
    got = [(r["who"], r["action"], r["target"], r["outcome"]) for r in rows]
    for row in [(ADMIN, "retrain", "refused"), (ADMIN, "approve", NEWCOMER, "ok"), (ADMIN, "make-admin", USER, "ok"),
                (ADMIN, "remove-admin", USER, "ok"), (USER, "check", "", "refused"), (ADMIN, "disable", NEWCOMER, "ok"),
                (ADMIN, "promote", "2", "ok"), (ADMIN, "rollback", "1", "ok")]:
        if len(row) == 3: assert any((g[0], g[1], g[3]) == row for g in got), (row, got)
        else: assert row in got, (row, got)
    started = [r for r in rows if r["action"] == "retrain" and r["outcome"] in ("started", "ok")]
    assert len(started) >= 2 and started[0]["target"].endswith("dvc repro")
    token = (hub.state / "desk-token").read_text().strip()
    assert token not in (hub.project / "data/desk/audit.jsonl").read_text()
    admin.click(".msr-desk-refresh")
    admin.wait_for_selector("tr.msr-audit-row:has-text('rollback')", timeout=30_000)
    end_rss = kernel.memory_info().rss / 2**20
    with capsys.disabled():
        print(f"\nhub: admin page first render {first_render:.2f} s, Admin tab loaded in {tab_load:.2f} s, its kernel {admin_rss:.0f} MB RSS "
              f"({end_rss:.0f} MB after every action); the retrain went on {waited:.0f} s after the account checks")
    assert first_render < 15 and admin_rss < 100 and end_rss < 100, (first_render, admin_rss, end_rss)  # the page budget: 100 MB


def test_cross_site_approval_is_refused(hub, admin, browser, http_server):
    """A link on another site, followed by the signed-in admin's browser, approves nobody; nor does a forged cross-site GET,
    nor a link that has the admin log in on the hub's own form and then sends them on to an approval."""
    other, routes = http_server
    routes["/"] = (200, {"Content-Type": "text/html"},
                   f"<a id='go' href='{hub.url}/hub/authorize/{STRANGER}'>win a prize</a>".encode())
    admin.goto(other + "/")
    admin.click("#go")
    admin.wait_for_load_state()
    assert "Sec-Fetch-Site" in admin.inner_text("body") and authorized(hub, STRANGER) is False
    for action in ("authorize", "discard"):
        r = admin.context.request.get(f"{hub.url}/hub/{action}/{STRANGER}", headers={"Sec-Fetch-Site": "cross-site"}, max_redirects=0)
        assert r.status == 403, (action, r.status)
    assert authorized(hub, STRANGER) is False  # neither approved nor discarded
    page = new_page(browser)
    try:
        page.goto(f"{hub.url}/hub/login?next=%2Fhub%2Fauthorize%2F{STRANGER}")
        page.fill("input[name=username]", ADMIN)
        page.fill("input[name=password]", PASSWORDS[ADMIN])
        page.click("#login_submit")
        page.wait_for_load_state()
        assert "Referer" in page.inner_text("body") and authorized(hub, STRANGER) is False
    finally: page.context.close()
    admin.goto(f"{hub.url}/hub/authorize")  # from the hub's own page, the same click works
    admin.click(f"tr#{STRANGER} a:has-text('Discard')")
    admin.wait_for_url(re.compile(r".*/hub/authorize"))
    assert authorized(hub, STRANGER) is None


@pytest.fixture(scope="module")
def hub_rest(hub, served_project, tmp_path_factory):
    "msr-serve beside the hub (serve.hub_api_url), whose people's hub API tokens work as API keys: (url, monitoring log, server log)."
    logs = tmp_path_factory.mktemp("hub-rest")
    port, db = free_port(), logs / "served.sqlite"
    proc = start_server([str(BIN / "msr-serve"), "--port", str(port), "--hub", f"{hub.url}/hub/api"], served_project,
                        served_env(served_project, db), f"tcp://127.0.0.1:{port}", logs / "serve.log")
    try: yield f"http://127.0.0.1:{port}", db, logs / "serve.log"
    finally: stop_hub(proc)


def hub_token(hub: Hub, name: str) -> str:
    "A hub API token for `name`, asked with their password, as a script gets one."
    request = urllib.request.Request(f"{hub.url}/hub/api/users/{name}/tokens", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"auth": {"username": name, "password": PASSWORDS[name]},
                                                      "note": "msr REST", "expires_in": 600}).encode())
    with urllib.request.urlopen(request, timeout=30) as r: return json.load(r)["token"]


def test_unauthorizing_on_the_hub_page_ends_sessions_and_tokens(hub, browser, admin, hub_rest, served_project):
    """The stock toggle on /hub/authorize, like the desk's disable, signs the person out everywhere: their cookie and
    their API token stop working at the hub at once, and msr-serve refuses the token within its 5 s cache (issue 21,
    items 4 and 5). Service tokens (the desk's, the dashboard's) are not people's keys at msr-serve."""
    from test_api import call
    from test_serve import playlist_seeds
    url, _, _ = hub_rest
    body = {"dataframe_records": [{"seeds": playlist_seeds(served_project)[0], "k": 3}]}
    assert "sent to the admin" in sign_up(browser, hub, LEAVER)
    admin.goto(f"{hub.url}/hub/authorize")
    admin.click(f"tr#{LEAVER} a:has-text('Authorize')")
    admin.wait_for_selector(f"tr#{LEAVER}.success")
    page = new_page(browser)
    try:
        log_in(page, hub, LEAVER)
        page.wait_for_selector(".msr-go", timeout=60_000)
        token = hub_token(hub, LEAVER)
        assert fetch(f"{hub.url}/hub/api/user", {"Authorization": f"token {token}"})[0] == 200
        assert call(url, body=body, headers={"Authorization": f"token {token}"})[0] == 200
        admin.goto(f"{hub.url}/hub/authorize")
        admin.click(f"tr#{LEAVER} a:has-text('Unauthorize')")
        admin.wait_for_selector(f"tr#{LEAVER}:not(.success)")
        t0 = time.monotonic()
        assert authorized(hub, LEAVER) is False
        assert fetch(f"{hub.url}/hub/api/user", {"Authorization": f"token {token}"})[0] in (401, 403)
        page.goto(f"{hub.url}/hub/home")
        assert "/hub/login" in page.url  # their hub cookie no longer works
        while (status := call(url, body=body, headers={"Authorization": f"token {token}"})[0]) == 200:
            assert time.monotonic() - t0 < 6.5, "msr-serve still answers a revoked token"
            time.sleep(0.25)
        assert status == 401
        while True:  # nor, once the dashboard's 5 s cache of the hub's answer has passed, their dashboard cookie
            page.goto(f"{hub.url}/services/dashboard/")
            if "/hub/login" in page.url: break
            assert time.monotonic() - t0 < 8, "the dashboard still opens for a person the hub signed out"
            time.sleep(0.5)
        assert page.locator(".msr-go").count() == 0
    finally: page.context.close()
    for service_token in ((hub.state / "desk-token").read_text().strip(), hub.processes()["voila"].environ()["JUPYTERHUB_API_TOKEN"]):
        assert fetch(f"{hub.url}/hub/api/user", {"Authorization": f"token {service_token}"})[0] == 200  # valid at the hub
        status, _, answer = call(url, body=body, headers={"Authorization": f"token {service_token}"})
        assert status == 401, answer


def session_from(address: str):
    "A requests session whose connections come from `address` (another loopback address: another client, as the proxy sees it)."
    import requests

    class From(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs): super().init_poolmanager(*args, source_address=(address, 0), **kwargs)

    s = requests.Session()
    s.mount("http://", From())
    return s


def signup(base: str, name: str, source: str = "127.0.0.1", headers: dict | None = None) -> tuple[int, str]:
    "(status, alert text) of one signup through the form at `base`, from the loopback address `source`."
    with session_from(source) as s:
        page = s.get(f"{base}/hub/signup", headers=headers, timeout=30)
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
        r = s.post(f"{base}/hub/signup", headers=headers, timeout=60, data={
            "_xsrf": xsrf, "username": name, "signup_password": "a flood of long passwords", "signup_password_confirmation": "a flood of long passwords"})
    alert = re.search(r'<div class="alert[^"]*" role="alert">(.*?)</div>', r.text, re.S)
    text = __import__("html").unescape(re.sub(r"<[^>]+>", " ", alert.group(1))) if alert else r.text[:300]
    return r.status_code, " ".join(text.split())


def pending(hub: Hub) -> int:
    with sqlite3.connect(hub.state / "jupyterhub.sqlite") as con:
        return con.execute("select count(*) from users_info where not is_authorized").fetchone()[0]


def test_a_signup_flood_is_limited_and_the_hub_keeps_answering(hub):
    """30 signups from one address in 3 threads (issue 21, item 6): past `hub.signup_burst` they get 429 with Retry-After,
    the passwords are hashed off the hub's event loop, so another person's API calls keep their latency meanwhile
    (measured; before: a 15 ms median became 1.27 s), and signups awaiting approval stop at `hub.max_pending_signups`."""
    import statistics
    import threading
    from concurrent.futures import ThreadPoolExecutor
    token, lat, done = hub_token(hub, ADMIN), [], threading.Event()

    def other_person():
        while not done.is_set():
            t0 = time.perf_counter()
            assert fetch(f"{hub.url}/hub/api/user", {"Authorization": f"token {token}"})[0] == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(0.05)

    watcher = threading.Thread(target=other_person, daemon=True)
    watcher.start()
    time.sleep(1)
    calm = list(lat)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: signup(hub.url, f"flood{i:02d}"), range(30)))
    done.set(); watcher.join(30)
    flood = lat[len(calm):]
    statuses = [s for s, _ in got]
    assert statuses.count(200) <= 8 and statuses.count(429) >= 20, got  # the burst (6), and a refill or two
    assert all("Too many signups from your address" in a for s, a in got if s == 429), got
    print(f"\nhub: another person's /hub/api/user during a signup flood: median {statistics.median(flood) * 1000:.0f} ms "
          f"(p95 {sorted(flood)[int(len(flood) * 0.95)] * 1000:.0f} ms, {len(flood)} calls), before it {statistics.median(calm) * 1000:.0f} ms")
    assert statistics.median(flood) < 0.5, flood
    # a forged X-Forwarded-For on the hub's own port is not another address (only the proxy's counts): still 429
    p = __import__("yaml").safe_load((hub.project / "params.yaml").read_text())["hub"]
    status, alert = signup(f"http://127.0.0.1:{p['hub_port']}", "forger", headers={"X-Forwarded-For": "10.9.9.9"})
    assert status == 429, (status, alert)
    # other addresses (127.0.0.2, 127.0.0.3, ... through the proxy) until the cap on signups awaiting approval
    refused = None
    for i in range(PENDING_CAP + 5):
        status, alert = signup(hub.url, f"later{i:02d}", source=f"127.0.0.{i + 2}")
        if status == 503: refused = alert; break
        assert status == 200 and "sent to the admin" in alert, (status, alert)
    assert refused is not None and "await the admin's approval" in refused, refused
    assert pending(hub) == PENDING_CAP


def hub_login(hub: Hub, name: str, source: str) -> int:
    "The status of a login through the hub's form from the loopback address `source` (302: in)."
    with session_from(source) as s:
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', s.get(f"{hub.url}/hub/login", timeout=30).text).group(1)
        r = s.post(f"{hub.url}/hub/login", timeout=60, allow_redirects=False, data={"_xsrf": xsrf, "username": name, "password": PASSWORDS[name]})
    return r.status_code


def test_lockout_after_failed_logins(hub, browser):
    """Wrong passwords lock a name from the address they came from only (issue 21, item 7): there the right password then
    gets 403, from another address the owner gets in; an admin's unlock on the desk (msr-desk unlock) lets them in again."""
    page = new_page(browser)
    try:
        for _ in range(FAILS):
            log_in(page, hub, USER, "not the password")
            assert "Invalid username or password" in page.inner_text("body")
        log_in(page, hub, USER)  # the right password, too late
        assert "Too many failed logins for this name" in page.inner_text("body")
        assert page.locator(".msr-go").count() == 0 and "/hub/login" in page.url
        assert hub_login(hub, USER, source="127.0.0.9") == 302  # the owner, from another address
        env = {**served_env(hub.project, hub.project / "unused.sqlite"), "MSR_PROJECT_DIR": str(hub.project)}
        out = subprocess.run([str(BIN / "msr-desk"), "unlock", USER, "--by", ADMIN], cwd=hub.project, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["ok"], out.stdout + out.stderr
        log_in(page, hub, USER)
        page.wait_for_selector(".msr-go", timeout=60_000)  # unlocked: in from the first address too
    finally: page.context.close()
    assert [r["action"] for r in audit_log(hub)][-1] == "unlock"


def test_login_rate_limit(hub, browser):
    """Past the burst, a client's login attempts get 429 before any password is checked (the last test: it spends the burst),
    and a new forged X-Forwarded-For on each attempt at the hub's own port is no way around it (issue 21, item 7): only the
    proxy's is believed (before: 25 attempts, no 429)."""
    port = __import__("yaml").safe_load((hub.project / "params.yaml").read_text())["hub"]["hub_port"]
    page = new_page(browser)
    try:
        page.goto(f"{hub.url}/hub/login")
        xsrf = page.locator("input[name=_xsrf]").get_attribute("value")
        statuses = []
        for i in range(30):
            r = page.context.request.post(f"{hub.url}/hub/login", form={"_xsrf": xsrf, "username": f"nobody{i}", "password": "x"})
            statuses.append(r.status)
            if r.status == 429: break
        assert statuses[-1] == 429 and int(r.headers["retry-after"]) > 0, statuses
        assert "Too many login attempts from your address" in r.text()
    finally: page.context.close()
    forged = []
    for i in range(25):  # each attempt with a fresh form (its XSRF token is bound to the address the hub believes)
        with session_from("127.0.0.1") as s:
            headers = {"X-Forwarded-For": f"10.7.{i}.1"}
            token = re.search(r'name="_xsrf" value="([^"]+)"', s.get(f"http://127.0.0.1:{port}/hub/login", headers=headers, timeout=30).text)
            r = s.post(f"http://127.0.0.1:{port}/hub/login", headers=headers, allow_redirects=False, timeout=60,
                       data={"_xsrf": token.group(1), "username": f"forger{i}", "password": "x"})
        forged.append(r.status_code)
        if r.status_code == 429: break
    assert forged[-1] == 429 and "Too many login attempts" in r.text, (forged, r.text[-600:])


def test_rest_takes_a_users_hub_token(hub, hub_rest, served_project):
    """msr-serve beside the hub (serve.hub_api_url): a person's hub API token works as an API key, and their answers are
    rate-limited and logged under their name; with a hub configured, a request with no key or a wrong one is refused."""
    from test_api import call
    from test_serve import logged, playlist_seeds
    url, db, log = hub_rest
    token, before = hub_token(hub, ADMIN), len(logged(db))
    body = {"dataframe_records": [{"seeds": playlist_seeds(served_project)[0], "k": 3}]}
    for headers in ({}, {"Authorization": "token not-a-hub-token"}):
        status, _, answer = call(url, body=body, headers=headers)
        assert status == 401 and "JupyterHub API token" in answer["message"], answer
    status, _, answer = call(url, body=body, headers={"Authorization": f"token {token}"})
    assert status == 200 and len(answer["predictions"]) == 3, answer
    assert call(url, body=body, headers={"Authorization": f"Bearer {token}"})[0] == 200
    assert logged(db, at_least=before + 2)["client"].tolist()[before:] == [ADMIN, ADMIN]
    assert token not in log.read_text()
