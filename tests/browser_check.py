"""Headless-browser checks of ComfyUI's frontend for the FlexTok pack (adapted from shared/comfyui/browser_check.py).

Uses Python Playwright driving Debian's /usr/bin/chromium (no browser download); run it with the ComfyUI env's
python, where `.ci/install_comfyui.sh --with-browser` installed playwright:

    $COMFYUI_HOME/bin/python tests/browser_check.py --url http://127.0.0.1:PORT \\
        --expect FlexTokLoad FlexTokEncode --workflow example_workflows/flextok_reconstruct.json \\
        --run --screenshot ui.png

Prints a JSON report: registered/missing node types, categories, and for every --workflow the API prompt the
frontend itself makes of it (``app.graphToPrompt()``), node types it does not know, and page errors. With --run the
last workflow is queued like the Run button and the report says how the job ended. Exit code 1 if an expected node
type is missing.

    $COMFYUI_HOME/bin/python tests/browser_check.py --url ... --export-ui api.json out.json [--note "text"]

turns an API-format graph into a UI-format workflow the way the frontend does (``app.loadApiJson`` +
``graph.serialize()``), with seeds fixed and an optional note; that is how example_workflows/ were made.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY = ("() => window.app && window.app.graph && window.LiteGraph"
         " && Object.keys(window.LiteGraph.registered_node_types).length > 0")


def _open(p, url: str, profile: str, executable: str, errors: list, timeout_ms: int):
    ctx = p.chromium.launch_persistent_context(profile, executable_path=executable, headless=True,
                                               viewport={"width": 1920, "height": 1080}, args=CHROMIUM_ARGS)
    page = ctx.pages[0] if ctx.pages else ctx.new_page()
    origin = url.rstrip("/")
    # keep every request on loopback (the frontend also calls api.comfy.org)
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(origin) else r.abort())
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the "Nodes 2.0" banner
    page.goto(origin + "/")
    page.wait_for_function(READY, timeout=timeout_ms)
    page.evaluate("""async () => {
        try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
    }""")
    return ctx, page


def _get_json(url: str):
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _fit_view(page) -> None:
    """Zoom and pan so every node of the graph is on screen."""
    page.evaluate("""() => {
        const { app } = window, nodes = app.graph._nodes;
        if (!nodes.length) return;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
        const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const W = window.innerWidth - 90, H = window.innerHeight - 130;
        const scale = Math.min(1, W / (x1 - x0), H / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [70 / scale - x0, 110 / scale - y0];
        app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(400)


def _dismiss_overlays(page) -> None:
    """Close dialogs and banners (template browser, release toasts) that would cover the canvas."""
    for _ in range(3):
        page.keyboard.press("Escape")
        page.wait_for_timeout(150)
    page.evaluate("""() => {
        for (const sel of ['.p-dialog-mask', '.p-toast']) document.querySelectorAll(sel).forEach(e => e.remove());
    }""")


def check(url: str, expect: list[str], screenshot: str | None = None, workflows: list[str] = (),
          run: bool = False, run_timeout_s: float = 120, timeout_ms: int = 60000,
          executable: str = "/usr/bin/chromium") -> dict:
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="pw-profile-")
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            t0 = time.monotonic()
            ctx, page = _open(p, url, profile, executable, errors, timeout_ms)
            result = page.evaluate("""(expect) => {
                const reg = window.LiteGraph.registered_node_types;
                return {
                  frontend_version: window.__COMFYUI_FRONTEND_VERSION__,
                  total_node_types: Object.keys(reg).length,
                  missing: expect.filter(n => !reg[n]),
                  categories: Object.fromEntries(expect.filter(n => reg[n]).map(n => [n, reg[n].category])),
                  display_names: Object.fromEntries(expect.filter(n => reg[n]).map(n => [n, reg[n].title])),
                };
            }""", expect)
            result["ready_s"] = round(time.monotonic() - t0, 2)
            _dismiss_overlays(page)
            result["workflows"] = {}
            for path in workflows:
                with open(path) as f:
                    data = json.load(f)
                name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                result["workflows"][path] = page.evaluate("""async ([data, name]) => {
                    const { app, LiteGraph } = window;
                    await app.loadGraphData(data, true, true, name);
                    const reg = LiteGraph.registered_node_types;
                    const types = app.graph._nodes.map(n => n.type);
                    const p = await app.graphToPrompt();
                    return { node_types: types, unknown: types.filter(t => !reg[t]),
                             nodes: app.graph._nodes.length, links: Object.keys(app.graph.links || {}).length,
                             prompt: p.output };
                }""", [data, name])
            _dismiss_overlays(page)
            if run and workflows:
                t1 = time.monotonic()
                origin = url.rstrip("/")
                before = set(_get_json(origin + "/history"))
                page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
                new, deadline = [], time.monotonic() + run_timeout_s
                while time.monotonic() < deadline:  # the job the Run button queued, until it is done
                    queue = _get_json(origin + "/queue")
                    new = [k for k in _get_json(origin + "/history") if k not in before]
                    if new and not queue["queue_running"] and not queue["queue_pending"]:
                        break
                    time.sleep(0.5)
                item = _get_json(f"{origin}/history/{new[0]}")[new[0]] if new else {}
                status = item.get("status", {})
                result["run"] = {"status": status.get("status_str", "timeout"),
                                 "outputs": sorted(item.get("outputs", {})),
                                 "messages": [m[0] for m in status.get("messages", [])],
                                 "seconds": round(time.monotonic() - t1, 2)}
                page.wait_for_timeout(1500)  # let the previews render
                _dismiss_overlays(page)
            if screenshot:
                if workflows:
                    _fit_view(page)
                page.screenshot(path=screenshot)
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    result["page_errors"] = errors[:5]
    return result


def export_ui(url: str, api_graph: dict, note: str | None = None, timeout_ms: int = 60000,
              executable: str = "/usr/bin/chromium") -> dict:
    """API-format graph -> UI-format workflow, made by the frontend itself."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="pw-profile-")
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            ctx, page = _open(p, url, profile, executable, errors, timeout_ms)
            ui = page.evaluate("""async ([api, note]) => {
                const { app, LiteGraph } = window;
                await app.loadApiJson(api, 'workflow.json');
                for (const n of app.graph._nodes) {          // seeds: fixed, so the example is reproducible
                    for (const w of n.widgets || []) {
                        if (w.name === 'control_after_generate') w.value = 'fixed';
                    }
                }
                if (note) {
                    const n = LiteGraph.createNode('MarkdownNote') || LiteGraph.createNode('Note');
                    n.pos = [100, -240]; n.size = [560, 200];
                    n.widgets[0].value = note;
                    app.graph.add(n);
                }
                return app.graph.serialize();
            }""", [api_graph, note])
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if errors:
        raise RuntimeError(f"page errors while exporting: {errors[:3]}")
    return ui


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--expect", nargs="+", default=[])
    ap.add_argument("--workflow", action="append", default=[], help="UI-format workflow to load (repeatable)")
    ap.add_argument("--run", action="store_true", help="queue the last --workflow and wait for it")
    ap.add_argument("--screenshot")
    ap.add_argument("--export-ui", nargs=2, metavar=("API_JSON", "OUT_JSON"))
    ap.add_argument("--note")
    ap.add_argument("--executable", default="/usr/bin/chromium")
    a = ap.parse_args(argv)
    if a.export_ui:
        with open(a.export_ui[0]) as f:
            api = json.load(f)
        ui = export_ui(a.url, api, a.note, executable=a.executable)
        with open(a.export_ui[1], "w") as f:
            json.dump(ui, f, indent=1)
            f.write("\n")
        print(f"wrote {a.export_ui[1]}: {len(ui['nodes'])} nodes")
        return 0
    res = check(a.url, a.expect, a.screenshot, a.workflow, a.run, executable=a.executable)
    print(json.dumps(res, indent=1))
    return 1 if res["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
