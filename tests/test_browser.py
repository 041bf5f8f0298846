"""End to end in a real browser: JupyterLab runs notebook 02, and its explorer widget renders and reacts.

A headless JupyterLab (from this venv, on a free localhost port, with a token) serves a copy of the
notebook; Debian's Chromium (``/usr/bin/chromium``, driven by Playwright; no browser download) opens it,
runs all cells from the Run menu, then checks the ``clipscope.widgets.NeuronExplorer`` contract:
root ``.clipscope-explorer``; unit selector ``.clipscope-unit`` (a ``BoundedIntText``); title
``.clipscope-title`` reading ``unit N``; views ``.clipscope-visualization``, ``.clipscope-examples``,
``.clipscope-words``, ``.clipscope-label``; the note ``.clipscope-vis-note`` under a visualization not
rendered yet; button ``.clipscope-render``.

Screenshots and the executed notebook go to ``test-artifacts/browser/`` at the repository root.
``make test`` installs Chromium (apt-get, as root on Debian) and Playwright; where either is missing this
test is skipped with the reason, except under ``CLIPSCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a
missing browser fails the run rather than letting it go green without the browser check. ``CLIPSCOPE_BROWSER_NOTEBOOK=path.ipynb`` points it at another notebook.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(os.environ.get("CLIPSCOPE_BROWSER_NOTEBOOK") or ROOT / "notebooks" / "02_multimodal_neurons.ipynb")
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("CLIPSCOPE_CHROMIUM") or "/usr/bin/chromium")
#: Chromium flags: headless, and nothing that reaches outside the machine.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
SERVER_START_S = 60      # JupyterLab must answer within this
RUN_ALL_S = 400          # the whole notebook, in the browser, on 2 CPU cores
WIDGET_S = 120           # the explorer reacting to a unit change (may mine examples for the new unit)
#: Environment the notebook runs under (CLIPSCOPE_OUT is added per test).
NOTEBOOK_ENV = {"CLIPSCOPE_MODEL": "organism", "CLIPSCOPE_STEPS": "32",
                "CLIPSCOPE_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # the worker's share under pytest -n
#: JupyterLab user settings: every cell in the DOM, no news or update checks, no extension manager.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"checkForUpdates": False, "fetchNews": "false"},
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
}
NOT_FOUND = "explorer widget not found in notebook 02"


# --------------------------------------------------------------------------- JupyterLab server
@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path
    proc: subprocess.Popen = field(repr=False)

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no server log: {e})"
        return "\n".join(text[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path, env: dict[str, str]):
    """Start ``jupyter lab`` on ``root`` from this venv, headless, with a token; shut it down in all cases."""
    for name, value in LAB_SETTINGS.items():
        p = home / "lab-settings" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1",
                "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
                "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI runs as root
    log = home / "jupyter-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    lab = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log, proc=proc)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with status {proc.returncode} before answering\n"
                            f"--- server log ---\n{lab.log_tail()}", pytrace=False)
            try:
                lab.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {lab.url} within {SERVER_START_S} s\n"
                            f"--- server log ---\n{lab.log_tail()}", pytrace=False)
            time.sleep(0.5)
        yield lab
    finally:
        _stop(lab)


def _stop(lab: Lab) -> None:
    # kernels run in their own sessions: shut them down through the server, then stop the server
    if lab.proc.poll() is None:
        with contextlib.suppress(Exception):
            for k in lab.api("/api/kernels"):
                with contextlib.suppress(Exception):
                    lab.api(f"/api/kernels/{k['id']}", method="DELETE")
        lab.proc.send_signal(signal.SIGTERM)
        try:
            lab.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(lab.proc.pid, signal.SIGKILL)
            lab.proc.wait(timeout=10)


@pytest.fixture
def lab_on_notebook(tmp_path):
    """A JupyterLab server on a temporary folder holding a copy of ``NOTEBOOK``; stopped on teardown."""
    required = os.environ.get("CLIPSCOPE_REQUIRE_BROWSER") == "1"
    missing = pytest.fail if required else pytest.skip
    if not CHROMIUM.exists():
        missing(f"Chromium not found at {CHROMIUM} (make test installs it with apt-get when run as root on Debian)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    if not NOTEBOOK.is_file():
        pytest.fail(f"notebook not found: {NOTEBOOK}")
    code = " ".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    if "explorer" not in code.lower():
        pytest.fail(f"{NOT_FOUND}: no code cell of {NOTEBOOK.name} mentions an explorer", pytrace=False)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    out = tmp_path / "out"
    out.mkdir()
    with jupyter_lab(work, tmp_path, {**NOTEBOOK_ENV, "CLIPSCOPE_OUT": str(out)}) as lab:
        yield lab, work / NOTEBOOK.name


# --------------------------------------------------------------------------- browser helpers
#: State of the notebook's code cells: queued/running ("[*]"), not run, and whether any output is an error.
_CELL_STATE_JS = r"""() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  let pending = 0, unrun = 0;
  for (const c of cells) {
    const prompt = (c.querySelector('.jp-InputPrompt')?.textContent || '').trim();
    const src = (c.querySelector('.cm-content')?.textContent || '').trim();
    if (prompt.includes('*')) pending++;
    else if (src && !/\[\d+\]/.test(prompt)) unrun++;
  }
  const errors = [...document.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => /Traceback \(most recent call last\)|^\s*\w*(Error|Exception)\b.*:/m.test(t));
  return {cells: cells.length, pending, unrun, errors};
}"""

#: A signature of an element's content: its text, and a digest of every image's bytes (blob: URLs change
#: on every re-render even for the same picture, so the bytes are compared, not the URLs).
_SIGNATURE_JS = r"""async (el) => {
  const parts = [el.innerText];
  const imgs = el.tagName === 'IMG' ? [el] : [...el.querySelectorAll('img')];
  for (const img of imgs) {
    try {
      const buf = await (await fetch(img.src)).arrayBuffer();
      const d = await crypto.subtle.digest('SHA-256', buf);
      parts.push([...new Uint8Array(d)].map(b => b.toString(16).padStart(2, '0')).join(''));
    } catch (e) { parts.push(img.src); }
  }
  return parts;
}"""

#: Whether an element is or holds an image (with a source), or shows some text.
_HAS_CONTENT_JS = r"""(el) => (el.tagName === 'IMG' && !!el.src) || [...el.querySelectorAll('img')].some(i => !!i.src)
  || el.innerText.trim().length > 0"""


def _wait_until(predicate, timeout: float, what, interval: float = 1.0):
    """Poll ``predicate`` until it returns something true; ``what`` (text, or a callable giving it) names it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def _kernel_idle(lab: Lab, name: str) -> bool:
    try:
        sessions = lab.api("/api/sessions")
    except (OSError, ValueError):  # URLError is an OSError
        return False
    return any(s.get("path", "").endswith(name) and (s.get("kernel") or {}).get("execution_state") == "idle"
               for s in sessions)


def _unit_in(text: str) -> int | None:
    m = re.search(r"\bunit\s*#?\s*(\d+)", text)
    return int(m.group(1)) if m else None


def _run_notebook_in_browser(page, lab: Lab, path: Path) -> dict:
    page.goto(f"{lab.url}/lab/tree/{path.name}?reset&token={lab.token}")
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)

    def kernel_ready():
        dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
        if dialog.count():  # the notebook names no kernel: take the default one
            dialog.locator(".jp-mod-accept").click()
        return _kernel_idle(lab, path.name)

    _wait_until(kernel_ready, 90, "the notebook's kernel to start")
    # Run menu -> Run All Cells
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    start = time.monotonic()

    last: dict = {}

    def done():
        last.update(page.evaluate(_CELL_STATE_JS))
        # finished: nothing queued, and every non-empty cell ran (or a cell failed and the rest were aborted)
        return dict(last) if last["cells"] and not last["pending"] and (not last["unrun"] or last["errors"]) else None

    state = _wait_until(done, RUN_ALL_S, lambda: f"all cells of {path.name} to run (Run -> Run All Cells; "
                        f"{last.get('pending')} of {last.get('cells')} code cells still queued or running)", interval=2)
    _wait_until(lambda: _kernel_idle(lab, path.name), 60, "the kernel to go idle")
    state["run_s"] = round(time.monotonic() - start, 1)
    return state


def _save_and_read(page, lab: Lab, path: Path) -> dict:
    before = path.stat().st_mtime_ns
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    _wait_until(lambda: path.stat().st_mtime_ns != before, 30, "the notebook to be saved", interval=0.5)
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the test
def check_explorer_in_browser(lab: Lab, path: Path, artifacts: Path, profile: Path) -> dict:
    """Open ``path`` in Chromium through ``lab``, run it, and check the explorer widget; returns timings."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    shutil.rmtree(artifacts, ignore_errors=True)  # no stale screenshots from an earlier run
    artifacts.mkdir(parents=True)
    console_errors: list[str] = []
    report: dict = {}
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1400}, service_workers="block")
        # nothing but the local server
        ctx.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        try:
            state = _run_notebook_in_browser(page, lab, path)
            report["run_all_s"] = state["run_s"]
            page.screenshot(path=artifacts / "lab-after-run-all.png", full_page=True)
            assert not state["errors"], "a cell output shows an error (see lab-after-run-all.png):\n" + "\n---\n".join(state["errors"])[-3000:]
            saved = _save_and_read(page, lab, path)
            shutil.copy(path, artifacts / f"{path.stem}.executed.ipynb")
            errors = [f"{o.get('ename')}: {o.get('evalue')}" for c in saved["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "error"]
            assert not errors, f"the executed notebook holds errors: {errors}"

            # --- the explorer renders
            root = page.locator(".clipscope-explorer")
            try:
                root.first.wait_for(state="visible", timeout=30_000)
            except PlaywrightTimeout:
                raise AssertionError(f"{NOT_FOUND} ({path.name}): no element with DOM class "
                                     "'clipscope-explorer' after running all cells") from None
            root = root.last
            root.scroll_into_view_if_needed()
            unit_input = root.locator(".clipscope-unit input")
            title = root.locator(".clipscope-title")
            assert unit_input.count() == 1, "explorer: expected one unit selector (.clipscope-unit input)"
            assert title.count() == 1, "explorer: expected one title (.clipscope-title)"
            views = {name: root.locator(f".clipscope-{name}") for name in ("visualization", "examples", "words", "label")}
            for name, view in views.items():
                assert view.count() >= 1, f"explorer: view .clipscope-{name} not found"
                _wait_until(lambda v=view: v.first.evaluate(_HAS_CONTENT_JS), 30,
                            f"the explorer's {name} view to hold an image or text")
            assert root.locator(".clipscope-render").count() >= 1, "explorer: no render button (.clipscope-render)"

            first = int(unit_input.input_value())
            assert _unit_in(title.inner_text()) == first, \
                f"explorer title {title.inner_text()!r} does not show the selected unit {first}"
            before = views["examples"].first.evaluate(_SIGNATURE_JS)
            root.screenshot(path=artifacts / "explorer-before.png")

            # --- change the unit: type a new number, Enter
            top = unit_input.get_attribute("max")
            assert top is not None, "explorer: the unit selector has no maximum"
            second = int(float(top)) if int(float(top)) != first else first - 1   # the last unit: not rendered yet
            t0 = time.monotonic()
            unit_input.fill(str(second))
            unit_input.press("Enter")
            unit_input.blur()  # a change event, in case Enter did not send one
            _wait_until(lambda: _unit_in(title.inner_text()) == second, WIDGET_S,
                        lambda: f"the explorer title to show unit {second} (it shows {title.inner_text()!r})")
            _wait_until(lambda: views["examples"].first.evaluate(_SIGNATURE_JS) != before, WIDGET_S,
                        "the explorer's examples view to change with the unit")
            report["unit_change_s"] = round(time.monotonic() - t0, 1)
            for name, view in views.items():
                assert view.first.evaluate(_HAS_CONTENT_JS), \
                    f"explorer: view .clipscope-{name} is empty after the unit change"
            _wait_until(lambda: _kernel_idle(lab, path.name), WIDGET_S, "the kernel to go idle after the unit change")
            root.screenshot(path=artifacts / "explorer-after.png")

            # --- render on demand: the unit starts unrendered (a note says so) and the button renders it
            note = root.locator(".clipscope-vis-note").first
            assert "not rendered" in note.inner_text(), \
                f"unit {second} should not be rendered before the click; its note reads {note.inner_text()!r}"
            vis_before = views["visualization"].first.evaluate(_SIGNATURE_JS)
            t0 = time.monotonic()
            button = root.locator(".clipscope-render").first.locator("xpath=descendant-or-self::button").first
            button.click()

            def rendered():
                return (_kernel_idle(lab, path.name) and button.is_enabled() and "not rendered" not in note.inner_text()
                        and views["visualization"].first.evaluate(_SIGNATURE_JS) != vis_before)

            _wait_until(rendered, WIDGET_S, lambda: "the explorer to render after a click on its render button "
                        f"(note: {note.inner_text()!r})")
            report["render_s"] = round(time.monotonic() - t0, 1)
            assert views["visualization"].first.evaluate(_HAS_CONTENT_JS), "explorer: visualization empty after render"
            assert _unit_in(title.inner_text()) == second, \
                f"the render button changed the title to {title.inner_text()!r} (unit {second} expected)"
            status = root.locator(".clipscope-status")  # where the explorer reports a failed callback, if it has one
            if status.count():
                assert not re.match(r"\s*error", status.first.inner_text(), re.IGNORECASE), \
                    f"the explorer reports: {status.first.inner_text()!r}"
            state = page.evaluate(_CELL_STATE_JS)
            assert not state["errors"], "an error appeared while using the explorer:\n" + "\n---\n".join(state["errors"])[-3000:]
            root.screenshot(path=artifacts / "explorer-rendered.png")
            page.screenshot(path=artifacts / "lab-explorer.png", full_page=True)
            for shot in ("explorer-before.png", "explorer-after.png", "explorer-rendered.png", "lab-explorer.png"):
                assert (artifacts / shot).stat().st_size > 1000, f"screenshot {shot} is missing or empty"
            report["units"] = (first, second)
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=artifacts / "failure.png", full_page=True)
            if console_errors:
                print("browser console errors:\n" + "\n".join(console_errors[-20:]))
            raise
        finally:
            ctx.close()
    return report


def test_explorer_in_jupyterlab(lab_on_notebook, tmp_path, capsys):
    from playwright.sync_api import Error as PlaywrightError

    lab, path = lab_on_notebook
    start = time.monotonic()
    try:
        report, failure = check_explorer_in_browser(lab, path, ARTIFACTS, tmp_path / "chromium-profile"), None
    except (AssertionError, PlaywrightError, OSError) as e:  # say what failed, with the server's log
        report, failure = None, f"{type(e).__name__}: {e}"
    if failure:
        pytest.fail(f"{failure}\nscreenshots: {ARTIFACTS}\n--- jupyter server log (tail) ---\n{lab.log_tail()}",
                    pytrace=False)
    with capsys.disabled():
        print(f"\nbrowser test: {path.name} ran in {report['run_all_s']} s, unit {report['units'][0]} -> "
              f"{report['units'][1]} in {report['unit_change_s']} s, render {report['render_s']} s, total {time.monotonic() - start:.0f} s; "
              f"screenshots in {ARTIFACTS}")
