"""What a person sees in MLflow's UI: `mmflow ui` on a small quickstart store, rendered by
headless Chromium (Debian's `chromium` package), driven over the DevTools protocol.

The store holds two runs of the quickstart's first two stages, shrunk: `synth` (pictures) and
`clip_train` (a training stage: metrics, system metrics, a model), then all cached. The page
must land on the runs table in MLflow's model-training view, list the stage runs under the
parent, show the training run's metrics and the pictures under `images/`. Screenshots of each
page are left in the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import MMFLOW, ROOT

QUICKSTART = os.path.join(ROOT, "pipelines", "quickstart.yaml")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (infra/test-packages.sh installs it: apt-get install chromium)",
)
SMALL = [  # the quickstart's first two stages, shrunk
    "synth.params.num_samples=128",
    "synth.params.samples_per_shard=64",
    *(
        f"clip_train.{s}"
        for s in (
            "params.eval_samples=32",
            "params.train.max_steps=4",
            "params.train.batch_size=16",
            "params.train.warmup_steps=1",
            "params.train.checkpoint_every=4",
            "params.train.log_every=1",
            "resources.cpus=1",
        )
    ),
]


GENAI = ("Judges", "Evaluation runs")  # in GenAI's sidebar only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One Chromium tab over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws, shots: str):
        self.ws, self.shots, self.n = ws, shots, 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        async for msg in self.ws:
            reply = json.loads(msg.data)
            if reply.get("id") == self.n:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
        raise ConnectionError("Chromium closed the DevTools connection")

    async def js(self, expression: str):
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    async def goto(self, url: str) -> None:
        """Open ``url`` and wait for the page it ends on (``/mmflow/open`` goes on by itself)."""
        await self.call("Page.navigate", url=url)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if await self.js("document.readyState === 'complete' && location.hash !== ''"):
                    return
            except AssertionError as e:  # evaluated while the page went on to the next one
                assert "navigated or closed" in str(e), e
            await asyncio.sleep(0.3)
        raise AssertionError(f"{url}: no page loaded in 30 s")

    async def screenshot(self, name: str) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        with open(os.path.join(self.shots, f"{name}.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    async def wait_for(self, check: str, what: str, timeout: float = 90.0):
        """Poll a JS expression until it is truthy; on timeout, a screenshot and the page's text."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := await self.js(check):
                return value
            await asyncio.sleep(0.5)
        await self.screenshot("timeout")
        text = await self.js("location.href + '\\n' + document.body?.innerText")
        raise AssertionError(f"page never showed {what}; it reads:\n{text[:3000]}")

    async def text_has(self, *needles: str, absent: tuple[str, ...] = (), timeout=90.0) -> str:
        """The page's text once it shows every needle and none of ``absent``."""
        check = "(t => %s.every(n => t.includes(n)) && !%s.some(n => t.includes(n)) && t)"
        check = check % (json.dumps(needles), json.dumps(absent))
        what = f"{needles}" + (f" without {absent}" if absent else "")
        return await self.wait_for(check + "(document.body?.innerText ?? '')", what, timeout)

    async def links(self, href_part: str) -> dict[str, str]:
        """Text -> href of the page's links whose href contains ``href_part``."""
        return await self.js(
            "Object.fromEntries([...document.querySelectorAll('a')]"
            f".filter(a => a.getAttribute('href')?.includes({json.dumps(href_part)}))"
            ".map(a => [a.innerText.trim(), a.getAttribute('href')]))"
        )

    async def click(self, find: str, what: str) -> None:
        """A real mouse click (React's handlers listen for pointer events, not ``.click()``) at
        the middle of the element the JS expression ``find`` gives, once there is one."""
        where = (
            "(e => { if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null; })"
            f"({find})"
        )
        x, y = await self.wait_for(where, what)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def click_text(self, text: str, among: str = "body *") -> None:
        """Click the innermost element of ``among`` whose whole visible text is ``text``."""
        find = "[...document.querySelectorAll(%s)].filter(e => e.innerText?.trim() === %s).pop()"
        await self.click(find % (json.dumps(among), json.dumps(text)), repr(text))


async def _open_page(shots: str, profile: str, log):
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,900",
         "about:blank"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.time() + 60
    while not os.path.exists(port_file) and time.time() < deadline and proc.poll() is None:
        await asyncio.sleep(0.2)
    assert os.path.exists(port_file), f"chromium did not start (exit {proc.poll()})"
    port = open(port_file).read().split()[0]
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
    [tab] = [t for t in targets if t["type"] == "page"]
    return proc, tab["webSocketDebuggerUrl"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_session):
    """`mmflow ui` on the small quickstart store, run twice (the second time all cached):
    (the URL it printed, the tmp folder)."""
    from mmflow.config import load_pipeline
    from mmflow.runner import Runner

    d = tmp_path_factory.mktemp("ui-store")
    uri, port = f"sqlite:///{d}/mlflow.db", _free_port()
    # started first, so that its start overlaps the run; it creates the experiment, whose
    # artifacts then go under its working folder, d
    ui = subprocess.Popen(
        [*MMFLOW, "ui", QUICKSTART, "--tracking-uri", uri, "--port", str(port), "--workers", "1"],
        cwd=d, stdout=subprocess.PIPE, stderr=open(d / "ui.log", "w"), text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        line = ui.stdout.readline()
        [url] = re.findall(r"http://\S+", line) or [line]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
            for _ in range(2):
                pipeline = load_pipeline(QUICKSTART, SMALL, str(d / "store"), uri)
                Runner(pipeline).run(only=["synth", "clip_train"])
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert ui.poll() is None and time.time() < deadline, (d / "ui.log").read_text()
                time.sleep(1)
        yield url, d
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


def test_the_ui_shows_stage_runs_metrics_and_pictures(store):
    url, d = store
    assert "/mmflow/open?to=" in url and "workflowType%3Dmachine_learning" in url, url
    with open(d / "chromium.log", "w") as log:
        proc, ws_url = asyncio.run(_open_page(str(d), str(d / "profile"), log))
        try:
            asyncio.run(_look(url, ws_url, str(d)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


async def _look(url: str, ws_url: str, shots: str) -> None:
    import aiohttp

    base = url.split("mmflow/open")[0]
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws, shots)
        # the runs table, in the model-training view: the parents named after what they did,
        # the pipeline file as their Source
        await page.goto(url)
        await page.text_has(
            "quickstart: synth, clip_train",
            "quickstart: all 2 cached",
            "quickstart.yaml",
            absent=GENAI,
        )
        await page.screenshot("1-runs")

        # the first run's stages, nested under it
        await page.click(
            "[...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes("
            "'quickstart: synth, clip_train'))?.querySelector('button')",
            "the expander of the first run",
        )
        check = "(l => l.includes('synth') && l.includes('clip_train'))({})"
        names = "[...document.querySelectorAll('a')].map(a => a.innerText.trim())"
        await page.wait_for(check.format(names), "the stage runs synth and clip_train")
        await page.screenshot("2-stages")
        stage_runs = await page.links("/runs/")

        # a run page from the table, in the model-training view too: the page mmflow ui opened
        # first made it the browser's choice (MLflow 3.17 would show GenAI's sidebar and an
        # "Evaluations" breadcrumb in a browser that never chose)
        await page.click_text("clip_train", among="a")
        await page.text_has("Overview", "Model metrics", "System metrics")
        await page.text_has(  # its metrics, and the pipeline file as its Source
            "final_loss", "heldout_i2t_r1", "quickstart.yaml", absent=GENAI + ("Evaluations",)
        )
        await page.screenshot("3-clip_train")

        # its system metrics, from MLflow's own monitor
        await page.click_text("System metrics", among="[role=tab]")
        selected = "document.querySelector('[role=tab][aria-selected=true]')?.innerText"
        await page.wait_for(f"{selected} === 'System metrics'", "the System metrics tab")
        # the first charts, drawn over time (the memory ones are further down, drawn on scroll)
        await page.text_has("cpu_utilization_percentage", "disk_usage_percentage", "Time")
        await page.screenshot("4-system-metrics")

        # synth's pictures under images/, and the picture itself loads
        await page.goto(base + stage_runs["synth"] + "/artifacts")
        await page.text_has("images")
        await page.click_text("images")
        await page.text_has("samples.png")
        await page.click_text("samples.png")
        img = 'document.querySelector(\'img[src*="samples.png"], img[src^="blob:"]\')'
        width = await page.wait_for(f"(i => i?.complete && i.naturalWidth)({img})", "the picture")
        assert width > 0
        await page.screenshot("5-pictures")
