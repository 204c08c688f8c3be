"""OSCQuery and the control page, through HTTP, the WebSocket and a real browser: a `synthd run
--http-port` on a JACK dummy server, read by urllib, aiohttp's WebSocket client and headless
Chromium at a phone's viewport."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_packet import OscPacket
from pythonosc.osc_message_builder import build_msg

from support.jack import jack_server, record  # noqa: F401  (fixture)
from support.nnmodels import build_toy_model
from support.synthd_proc import OscClient, SynthdProcess, rms_db

TOKEN = "stage-secret-42"
OUTPUT = Path(__file__).resolve().parent / "output"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("webmodels")
    build_toy_model(d / "toy.ts", latent_size=4)
    build_toy_model(d / "six.ts", latent_size=6)
    (d / "rig.toml").write_text('version = 1\nname = "rig"\n[[preset]]\nname = "low"\nvalues = { pitch = 0.2 }\n'
                                '[[preset]]\nname = "high"\nvalues = { pitch = 0.8 }\n')
    return d


@pytest.fixture(scope="module")
def synthd(jack_server, models):  # noqa: F811
    with SynthdProcess(jack_server, "--model", str(models / "toy.ts"), "--patch", str(models / "rig.toml"),
                       "--http-port", "0") as proc:
        proc.url = re.search(r"web (http://\S+)", proc.startup).group(1)
        yield proc


def get(url: str, accept: str = "application/json") -> tuple[int, object]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body and "json" in response.headers["Content-Type"] else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def walk(node: dict):
    yield node
    for child in node.get("CONTENTS", {}).values():
        yield from walk(child)


def test_the_namespace_has_the_proposals_attributes(synthd):
    status, root = get(synthd.url)
    assert status == 200 and root["FULL_PATH"] == "/"
    nodes = list(walk(root))
    paths = {n["FULL_PATH"] for n in nodes}
    for path in ("/synthd/control/pitch", "/synthd/control/brightness", "/synthd/latent/0", "/synthd/gain",
                 "/synthd/gate", "/synthd/note", "/synthd/status", "/synthd/model/load", "/synthd/preset/recall"):
        assert path in paths, path
    for n in nodes:
        assert isinstance(n["ACCESS"], int) and 0 <= n["ACCESS"] <= 3 and n["DESCRIPTION"]
        if "VALUE" in n:
            assert len(n["TYPE"]) == len(n["VALUE"]) == len(n["RANGE"]), n
        for part, child in n.get("CONTENTS", {}).items():
            assert child["FULL_PATH"].rstrip("/").endswith("/" + part)
    brightness = next(n for n in nodes if n["FULL_PATH"] == "/synthd/control/brightness")
    assert brightness["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}] and "measured" in brightness["DESCRIPTION"]
    gain = next(n for n in nodes if n["FULL_PATH"] == "/synthd/gain")
    assert gain["UNIT"] == ["gain.dB"]
    recall = next(n for n in nodes if n["FULL_PATH"] == "/synthd/preset/recall")
    assert recall["RANGE"] == [{"VALS": ["low", "high"]}]


def test_queries_host_info_and_refusals(synthd):
    status, info = get(synthd.url + "?HOST_INFO")
    assert status == 200 and info["OSC_PORT"] == synthd.osc_address[1] and info["OSC_TRANSPORT"] == "UDP"
    assert info["EXTENSIONS"]["LISTEN"] and info["EXTENSIONS"]["PATH_CHANGED"]
    client = OscClient(synthd.osc_address)
    client.send("/synthd/control/brightness", 0.25)
    time.sleep(0.1)
    assert get(synthd.url + "synthd/control/brightness?VALUE") == (200, {"VALUE": [0.25]})
    assert get(synthd.url + "synthd/status?VALUE")[0] == 204  # a command has no value
    assert get(synthd.url + "synthd/gain?COLOUR")[0] == 400
    assert get(synthd.url + "synthd/nothing")[0] == 404
    client.close()


async def listen(url: str, paths: list[str], during, seconds: float) -> list[tuple[str, list]]:
    """OSC messages pushed over a WebSocket that LISTENs to `paths` while `during()` runs."""
    got = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for path in paths:
            await ws.send_str(json.dumps({"COMMAND": "LISTEN", "DATA": path}))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, during)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                message = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if message.type == aiohttp.WSMsgType.BINARY:  # a message, or a bundle of several
                got += [(t.message.address, list(t.message.params)) for t in OscPacket(message.data).messages]
    return got


def test_listen_pushes_changes_throttled_to_60_a_second(synthd):
    client = OscClient(synthd.osc_address)

    def sweep():
        for i in range(600):  # 600 changes in about half a second
            client.send("/synthd/control/brightness", i / 599)
            client.send("/synthd/gain", -6.0 if i == 599 else -3.0)
            time.sleep(0.0008)

    got = asyncio.run(listen(synthd.url, ["/synthd/control/brightness", "/synthd/gain"], sweep, 1.0))
    client.close()
    brightness = [args[0] for address, args in got if address == "/synthd/control/brightness"]
    gains = [args[0] for address, args in got if address == "/synthd/gain"]
    assert 5 <= len(brightness) <= 60 and brightness[-1] == pytest.approx(1.0)  # the last value arrives
    assert gains[-1] == pytest.approx(-6.0)


def test_osc_over_the_websocket_is_handled_like_udp(synthd):
    async def talk():
        async with aiohttp.ClientSession() as session, session.ws_connect(synthd.url) as ws:
            await ws.send_bytes(build_msg("/synthd/control/timbre_1", [0.75]).dgram)
            await ws.send_bytes(build_msg("/synthd/status", []).dgram)
            await ws.send_bytes(build_msg("/synthd/control/nope", [0.5]).dgram)
            await ws.send_str("{not json")
            await ws.send_str(json.dumps({"COMMAND": "DANCE", "DATA": "/"}))
            replies = []
            for _ in range(4):
                m = await ws.receive(timeout=3)
                replies.append(OscMessage(m.data).address if m.type == aiohttp.WSMsgType.BINARY
                               else json.loads(m.data)["COMMAND"])
            return replies

    before = OscClient(synthd.osc_address)
    invalid = before.status()["invalid"]
    replies = asyncio.run(talk())
    assert sorted(replies) == sorted(["/synthd/status.reply", "/fail", "ERROR", "ERROR"])
    before.send("/synthd/controls")
    values = {r[1][0]: r[1][2] for r in before.replies(count=4)}
    assert values["timbre_1"] == 0.75
    assert before.status()["invalid"] >= invalid + 2
    before.close()


def test_hostile_clients_are_refused_and_the_sound_plays_on(jack_server, synthd):  # noqa: F811
    async def attack() -> tuple[int, bool]:
        async with aiohttp.ClientSession() as session:
            for _ in range(1000):  # opened and dropped
                ws = await session.ws_connect(synthd.url)
                await ws.close()
            async with session.ws_connect(synthd.url, max_msg_size=0) as ws:
                await ws.send_bytes(b"/" + b"x" * (200 * 1024))  # oversized: the server closes
                closed = (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                               aiohttp.WSMsgType.CLOSING)
            return closed

    assert asyncio.run(attack())
    client = OscClient(synthd.osc_address)
    client.send("/synthd/gain", 0.0)
    client.send("/synthd/control/loudness", 0.9)
    assert synthd.alive and client.status()["model"] == "toy"
    assert rms_db(record(jack_server, 0.4, [])) > -30
    client.close()


def test_path_changed_after_a_model_swap(synthd, models):
    client = OscClient(synthd.osc_address)

    async def watch():
        async with aiohttp.ClientSession() as session, session.ws_connect(synthd.url) as ws:
            await asyncio.sleep(0.1)
            assert client.ask("/synthd/model/load", "six", reply="/done")[1] == "toy"
            while True:
                m = await ws.receive(timeout=5)
                if m.type == aiohttp.WSMsgType.TEXT and json.loads(m.data)["COMMAND"] == "PATH_CHANGED":
                    return json.loads(m.data)["DATA"]

    try:
        assert asyncio.run(watch()) == "/synthd"
        status, node = get(synthd.url + "synthd/control")
        assert len(node["CONTENTS"]) == 6
    finally:
        client.ask("/synthd/model/load", "toy", reply="/done")
        client.close()


def test_a_token_guards_the_page_and_the_websocket(jack_server, models, tmp_path):  # noqa: F811
    with SynthdProcess(jack_server, "--model", str(models / "toy.ts"), "--http-port", "0",
                       "--http-token", TOKEN) as proc:
        url = re.search(r"web (http://\S+)", proc.startup).group(1)
        assert url.endswith(f"?token={TOKEN}")
        bare = url.split("?")[0]
        assert get(bare, accept="text/html")[0] == 401
        assert get(bare + "?token=wrong", accept="text/html")[0] == 401
        assert get(url, accept="text/html")[0] == 200

        async def connect(target):
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.ws_connect(target):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status

        assert asyncio.run(connect(bare)) == 401
        assert asyncio.run(connect(url)) == 101


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=390,844",
                "--disable-gpu"):
        options.add_argument(arg)
    # a phone: touch events, its viewport and pixel ratio
    options.add_experimental_option("mobileEmulation", {
        "deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 3.0, "touch": True}})
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def test_the_page_on_a_phone_moves_the_sound_and_follows_osc(jack_server, synthd, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = OscClient(synthd.osc_address)
    client.send("/synthd/gain", 0.0)
    client.send("/synthd/control/loudness", 0.5)
    browser.get(synthd.url)
    wait = WebDriverWait(browser, 10)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#controls .row[data-label="loudness"]'))
    labels = [e.get_attribute("data-label") for e in browser.find_elements(By.CSS_SELECTOR, "#controls .row")]
    assert labels == ["pitch", "loudness", "brightness", "timbre_1"]
    assert browser.execute_script("return window.innerWidth") == 390
    wait.until(lambda b: "underruns" in b.find_element(By.ID, "strip").text)

    loud = browser.find_element(By.CSS_SELECTOR, '#controls .row[data-label="loudness"] input')
    before = rms_db(record(jack_server, 0.3, []))
    # a touch drag from the slider's left end to its right end
    browser.execute_script("""
        const input = arguments[0], r = input.getBoundingClientRect(), y = r.top + r.height / 2;
        const fire = (type, x) => input.dispatchEvent(new PointerEvent(type, {bubbles: true, clientX: x, clientY: y,
                                                                            pointerType: 'touch'}));
        fire('pointerdown', r.left + 2);
        for (let i = 0; i <= 20; i++) {
          input.value = i / 20;
          input.dispatchEvent(new Event('input', {bubbles: true}));
        }
        fire('pointerup', r.right - 2);
        input.dispatchEvent(new Event('change', {bubbles: true}));
    """, loud)
    time.sleep(0.3)
    after = rms_db(record(jack_server, 0.3, []))
    assert after > before + 3, (before, after)  # loudness up: the sound at the JACK output is louder
    client.send("/synthd/controls")
    values = {r[1][0]: r[1][2] for r in client.replies(count=4)}
    assert values["loudness"] == pytest.approx(1.0)

    client.send("/synthd/control/brightness", 0.125)  # from OSC: the page's slider follows
    bright = browser.find_element(By.CSS_SELECTOR, '#controls .row[data-label="brightness"] input')
    wait.until(lambda b: abs(float(bright.get_attribute("value")) - 0.125) < 1e-3)
    OUTPUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "control-page-phone.png"))
    client.close()


def test_an_oscquery_client_finds_synthd_over_zeroconf_and_listens(jack_server, models):  # noqa: F811
    """Discovery on loopback (`--zeroconf`), then the namespace from the advertised address."""
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf

    with SynthdProcess(jack_server, "--model", str(models / "toy.ts"), "--http-port", "0", "--zeroconf") as proc:
        zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        found: dict[str, tuple[str, int]] = {}

        class Listener:
            def add_service(self, zc, kind, name):
                info = zc.get_service_info(kind, name, timeout=3000)
                if info is not None and name.startswith("synthd on "):
                    found[kind] = (info.parsed_addresses()[0], info.port)

            def update_service(self, zc, kind, name):
                self.add_service(zc, kind, name)

            def remove_service(self, zc, kind, name):
                pass

        browser = ServiceBrowser(zc, ["_oscjson._tcp.local.", "_osc._udp.local."], Listener())
        deadline = time.monotonic() + 20
        while len(found) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        browser.cancel()
        zc.close()
        assert found.get("_osc._udp.local.") == proc.osc_address, found
        host, port = found["_oscjson._tcp.local."]
        url = f"http://{host}:{port}/"
        status, info = get(url + "?HOST_INFO")
        assert info["OSC_PORT"] == proc.osc_address[1]
        status, root = get(url)
        assert {"FULL_PATH", "CONTENTS"} <= set(root)
        client = OscClient(proc.osc_address)
        got = asyncio.run(listen(url, ["/synthd/control/pitch"],
                                 lambda: client.send("/synthd/control/pitch", 0.3), 1.0))
        client.close()
        assert got and got[-1] == ("/synthd/control/pitch", [pytest.approx(0.3)])
