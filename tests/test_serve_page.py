"""The chat page of `modernlm serve` (GET /, src/modernlm/serve/chat.html) in a real headless browser.

Debian's chromium and chromium-driver, driven by Selenium, against the real app live on 127.0.0.1
(tests/serve_util.py), serving a model whose greedy reply to any chat is "<script>alert(1)</script>":
the page must show it as text. One browser for the whole module; each test loads the page afresh.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from modernlm import load
from tests.serve_util import script_checkpoint, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPLY = "<script>alert(1)</script>"
WAIT_S = 20

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (in the lock: bash scripts/setup.sh)")
from selenium.common.exceptions import NoAlertPresentException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Wraps window.fetch to record each request's JSON body in window.__bodies.
RECORD_BODIES = """
window.__bodies = [];
const fetch0 = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) window.__bodies.push(JSON.parse(init.body));
  return fetch0(url, init);
};
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: needs `apt-get install chromium chromium-driver` (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(script_checkpoint(tmp_path_factory.mktemp("serve_page") / "ckpt"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def url(lm):
    with serving(lm) as base:
        yield base


def api(base: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a request to the server, straight, not through the page."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        state = driver.execute_script("return document.getElementById('model').outerHTML + "
                                      "document.getElementById('messages').outerHTML")
        raise AssertionError(f"timed out waiting for {what}; the page: {state}") from None


def open_page(driver, base: str, model: str | None = None) -> None:
    driver.get(base + "/")
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete", "the page")
    if model is not None:
        wait(driver, lambda d: d.find_element(By.ID, "model").get_attribute("textContent") == model,
             f"the model id {model!r} on the page")


def set_value(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def send(driver, text: str, replies: int, key: str = "") -> list[str]:
    """Types `text`, sends it (the button, or Enter with key="\\n"), waits for reply number `replies`
    to finish; the texts of the assistant messages."""
    driver.find_element(By.ID, "input").send_keys(text + key)
    if not key:
        driver.find_element(By.ID, "send").click()
    done = ".msg.assistant[data-done='true']"
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, f"#messages {done}")) >= replies,
         f"assistant reply {replies}")
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")]


def classes(driver) -> list[str]:
    return [e.get_attribute("className") for e in driver.find_elements(By.CSS_SELECTOR, "#messages > *")]


def assert_no_alert(driver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 (the property raises when no alert is open)


def model_id(base: str, key: str | None = None) -> str:
    status, body = api(base, "/v1/models", key=key)
    assert status == 200, body
    return body["data"][0]["id"]


def test_reply_is_shown_as_text(driver, url):
    open_page(driver, url, model_id(url))
    set_value(driver, "temperature", "0")
    assert send(driver, "Hello!", 1) == [REPLY]
    assert classes(driver) == ["msg user", "msg assistant"]
    assert driver.find_element(By.CSS_SELECTOR, "#messages .msg.user").get_attribute("textContent") == "Hello!"
    assert driver.find_element(By.CSS_SELECTOR, "#messages .msg.assistant").text == REPLY
    assert driver.find_elements(By.CSS_SELECTOR, "#messages script") == []
    assert_no_alert(driver)


def test_second_turn_and_clear(driver, url):
    model = model_id(url)
    open_page(driver, url, model)
    driver.execute_script(RECORD_BODIES)
    set_value(driver, "temperature", "0")
    assert send(driver, "one", 1) == [REPLY]
    assert send(driver, "two", 2, key="\n") == [REPLY, REPLY]  # Enter sends
    assert classes(driver) == ["msg user", "msg assistant"] * 2
    second = driver.execute_script("return window.__bodies")[1]
    assert second["model"] == model
    assert second["messages"] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": REPLY},
                                  {"role": "user", "content": "two"}]
    assert driver.find_element(By.ID, "input").get_attribute("value") == ""
    driver.find_element(By.ID, "clear").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages > *") == []
    assert send(driver, "three", 1) == [REPLY]  # a new conversation: no history
    assert driver.execute_script("return window.__bodies")[2]["messages"] == [{"role": "user", "content": "three"}]
    assert_no_alert(driver)


def test_api_key(driver, lm):
    with serving(lm, api_key="secret") as base:
        # What the server answers a wrong key (the page asks /v1/models first, then chats).
        chat = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        refusals = {api(base, "/v1/models", key="wrong")[1]["error"]["message"],
                    api(base, "/v1/chat/completions", chat, key="wrong")[1]["error"]["message"]}
        open_page(driver, base)
        set_value(driver, "temperature", "0")
        set_value(driver, "api-key", "wrong")
        driver.find_element(By.ID, "input").send_keys("hi")
        driver.find_element(By.ID, "send").click()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.error"), "the error message")
        error = driver.find_element(By.CSS_SELECTOR, "#messages .msg.error").get_attribute("textContent")
        assert error in refusals, (error, refusals)
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant") == []
        set_value(driver, "api-key", "secret")
        assert send(driver, "hi again", 1) == [REPLY]
        assert driver.find_element(By.ID, "model").get_attribute("textContent") == model_id(base, key="secret")
        assert_no_alert(driver)


def test_settings_are_sent(driver, url):
    open_page(driver, url, model_id(url))
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
    assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == ""  # auto: what the context leaves
    driver.execute_script(RECORD_BODIES)
    set_value(driver, "system", "You are terse.")
    set_value(driver, "temperature", "0")
    set_value(driver, "max-tokens", "9")
    assert send(driver, "Hi", 1) == [REPLY]
    [body] = driver.execute_script("return window.__bodies")
    assert body["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert body["temperature"] == 0 and body["max_tokens"] == 9 and body["stream"] is True
    assert driver.find_element(By.CSS_SELECTOR, "#messages .msg.assistant").get_attribute("data-finish") == "stop"


def test_max_tokens_cuts_the_reply(driver, url):
    open_page(driver, url, model_id(url))
    set_value(driver, "temperature", "0")
    set_value(driver, "max-tokens", "1")
    assert send(driver, "Hi", 1) == ["<script>"]  # one token of the chain; a note (CSS) says it was cut
    assert driver.find_element(By.CSS_SELECTOR, "#messages .msg.assistant").get_attribute("data-finish") == "length"


def test_sse_parser(driver, url):
    """SSEParser.push, fed the stream in two pieces split at every position (mid-line, between \\r and
    \\n, ...) and one character at a time, gives the events' data payloads: comments skipped."""
    open_page(driver, url)
    stream = ': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\ndata: {"b":\ndata: 2}\n\nevent: x\ndata:[DONE]\n\n'
    expected = ['{"a": 1}', '{"b":\n2}', "[DONE]"]
    results = driver.execute_script("""
      const s = arguments[0], out = [];
      for (let i = 0; i <= s.length; i++) {
        const p = new SSEParser();
        out.push([...p.push(s.slice(0, i)), ...p.push(s.slice(i)), ...p.end()]);
      }
      const p = new SSEParser(), chars = [];
      for (const c of s) chars.push(...p.push(c));
      out.push(chars);
      return out;
    """, stream)
    assert all(r == expected for r in results), results
    assert driver.execute_script("const p = new SSEParser(); p.push('data: x'); return p.end()") == ["x"]


def test_stream_decoding(driver, url):
    """readSSE (what the page reads replies with) over bytes split at every position, inside the
    UTF-8 characters "é" and "🙂" too, gives the whole text."""
    open_page(driver, url)
    content = "café 🙂 <b>"
    chunk = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    raw = f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\ndata: [DONE]\r\n\r\n".encode()
    results = driver.execute_script("""
      const bytes = new Uint8Array(arguments[0]);
      const read = async (pieces) => {
        const body = new ReadableStream({ start(c) { pieces.forEach((p) => c.enqueue(p)); c.close(); } });
        const out = [];
        await readSSE(new Response(body), (data) => out.push(data));
        return out;
      };
      const runs = [];
      for (let i = 0; i <= bytes.length; i++) runs.push(read([bytes.slice(0, i), bytes.slice(i)]));
      runs.push(read(Array.from(bytes, (b) => Uint8Array.of(b))));
      return Promise.all(runs);
    """, list(raw))
    assert len(results) == len(raw) + 2
    for payloads in results:
        assert len(payloads) == 2 and payloads[1] == "[DONE]", payloads
        assert json.loads(payloads[0])["choices"][0]["delta"]["content"] == content


def bodies(driver) -> list[dict]:
    return driver.execute_script("return window.__bodies")


def test_a_small_context_chats_on_max_tokens_auto_and_drops_the_oldest_turn(driver, tmp_path):
    """A 64-token model: one turn is 21 prompt tokens, two 47, three 73. With Max tokens empty the
    server gives each reply what the context leaves; the third message leaves out the oldest turn
    (said on the page) instead of failing, and every reply is whole."""
    small = load(script_checkpoint(tmp_path / "ckpt", max_seq_len=64), device="cpu", progress=False)
    with serving(small) as base:
        open_page(driver, base, model_id(base))
        driver.execute_script(RECORD_BODIES)
        set_value(driver, "temperature", "0")
        for turn in (1, 2, 3):
            assert send(driver, "Hi", turn) == [REPLY] * turn
        assert [len(b["messages"]) for b in bodies(driver)] == [1, 3, 5, 3]  # the third sent twice: without turn 1
        assert all("max_tokens" not in b for b in bodies(driver))
        assert "error" not in " ".join(classes(driver))
        notes = [n.get_attribute("textContent") for n in driver.find_elements(By.CSS_SELECTOR, "#messages .msg.info")]
        assert notes == ["1 earliest turn left out: the model's context is full"]
        finishes = [e.get_attribute("data-finish") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
        assert finishes == ["stop"] * 3


def test_max_tokens_as_typed_and_a_bad_one_is_said_before_sending(driver, url):
    open_page(driver, url, model_id(url))
    driver.execute_script(RECORD_BODIES)
    set_value(driver, "max-tokens", "2.5")
    driver.find_element(By.ID, "input").send_keys("Hi\n")
    wait(driver, lambda d: "msg error" in classes(d), "the error")
    assert "Max tokens" in driver.find_element(By.CSS_SELECTOR, ".msg.error").get_attribute("textContent")
    assert bodies(driver) == [] and driver.find_element(By.ID, "input").get_attribute("value") == "Hi"
    set_value(driver, "input", "")
    set_value(driver, "max-tokens", "1e1")  # a number input's exponent: 10, where parseInt read 1
    send(driver, "Hi", 1)
    assert bodies(driver)[-1]["max_tokens"] == 10


def test_a_server_restarted_with_another_model_is_asked_again(driver, url):
    """The page keeps the model id of /v1/models; when the server answers model_not_found (it came
    back with another model), the page asks /v1/models again and resends, once."""
    open_page(driver, url, model_id(url))
    driver.execute_script(RECORD_BODIES + "model = 'the-model-before-the-restart';")
    assert send(driver, "Hi", 1) == [REPLY]
    assert [b["model"] for b in bodies(driver)] == ["the-model-before-the-restart", model_id(url)]
    assert driver.find_element(By.ID, "model").get_attribute("textContent") == model_id(url)


def test_an_empty_reply_keeps_its_turn(driver, tmp_path):
    silent = load(script_checkpoint(tmp_path / "ckpt", words=()), device="cpu", progress=False)
    with serving(silent) as base:
        open_page(driver, base, model_id(base))
        driver.execute_script(RECORD_BODIES)
        assert send(driver, "My name is Ann.", 1) == [""]
        assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-note") == "[empty reply]"
        send(driver, "What is my name?", 2)
        assert bodies(driver)[-1]["messages"] == [
            {"role": "user", "content": "My name is Ann."}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "What is my name?"},
        ]  # fmt: skip


def test_no_other_site_can_frame_the_page(driver, url):
    """Clickjacking: another origin's page (a server on another port) frames the chat; the browser
    must refuse to show it (frame-ancestors 'none'), while the page runs under its own policy."""
    import http.server
    import threading

    class Framing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's name)
            body = f"<iframe id='f' src='{url}/'></iframe>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Framing)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{other.server_port}/")
    finally:
        other.shutdown()
    driver.switch_to.frame(driver.find_element(By.ID, "f"))
    try:  # the frame's document: the page, or the browser's own "refused to connect" page
        loaded = "return document.readyState === 'complete' && location.href !== 'about:blank'"
        wait(driver, lambda d: d.execute_script(loaded), "the frame")
        assert driver.find_elements(By.ID, "input") == []
    finally:
        driver.switch_to.default_content()
    with urllib.request.urlopen(url + "/", timeout=WAIT_S) as response:
        policy = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy and response.headers["X-Frame-Options"] == "DENY"
