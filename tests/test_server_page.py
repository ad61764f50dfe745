"""The chat page (impl/server/static/index.html) in a real headless Chromium, on a real server.

The oracle for what the page shows is the server's own API asked directly (httpx, not
streamed): a greedy reply in the page must be that answer to the same messages, so the page's
streaming, its settings and its conversation history are each checked against a request that
did not go through the page. A screenshot after the multi-turn chat goes to
build/server-page.png.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.server_process import ROOT, ServerProcess, checked_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPLY_TIMEOUT = 60  # seconds for a short reply: generous for a busy machine
MAX_TOKENS = 20
SCREENSHOT = ROOT / "build" / "server-page.png"


@pytest.fixture(scope="module")
def server():
    """One server for the module; its exit on SIGTERM is checked at the end."""
    yield from checked_server()


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium through chromedriver, with the browser's console log kept."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `apt-get install chromium chromium-driver`",
                    pytrace=False)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


# ---------------------------------------------------------------- helpers


def wait(driver, condition, timeout: float = REPLY_TIMEOUT, what: str = ""):
    """condition(driver)'s first truthy value, polled every 50 ms for at most `timeout` s."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, what)


def open_page(driver, url: str) -> None:
    """The page, loaded, with its model name fetched (or the fetch's error shown)."""
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.ID, "model").text != "…" or d.find_element(By.ID, "error").text,
         30, "the page did not fetch /v1/models")


def set_field(driver, id_: str, value) -> None:
    field = driver.find_element(By.ID, id_)
    field.clear()
    field.send_keys(str(value))


def replies(driver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def text(element: WebElement) -> str:
    """An element's exact text (textContent: no trimming or whitespace folding)."""
    return element.get_property("textContent")


def ask(driver, question: str) -> WebElement:
    """Type a question, press Enter, and wait for the page to mark the reply done."""
    before = len(replies(driver))
    driver.find_element(By.ID, "prompt").send_keys(question, Keys.ENTER)
    return wait_done(driver, before)


def wait_done(driver, before: int) -> WebElement:
    """The reply after the `before` earlier ones, once its data-done is "true"."""
    def done(d):
        r = replies(d)
        return r[before] if len(r) > before and r[before].get_attribute("data-done") == "true" else None

    return wait(driver, done, what="the reply was not marked done")


def api_reply(url: str, messages: list[dict], **headers) -> dict:
    """The server's greedy non-streamed answer: {"content", "completion_tokens"}."""
    r = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=REPLY_TIMEOUT,
                   json={"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    r.raise_for_status()
    body = r.json()
    return {"content": body["choices"][0]["message"]["content"],
            "completion_tokens": body["usage"]["completion_tokens"]}


def metric(url: str, name: str, **labels) -> float:
    """The sum of a metric's samples in /metrics whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def greedy_chat(driver, url: str) -> None:
    """The page freshly loaded (an empty chat), with greedy settings and MAX_TOKENS."""
    open_page(driver, url)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", MAX_TOKENS)
    driver.find_element(By.ID, "seed").clear()


# ---------------------------------------------------------------- tests


def test_the_page_loads_without_console_errors_and_names_the_model(server, driver):
    """GET / loads with no SEVERE console message (where chromedriver keeps the log), shows the
    model's id from /v1/models, and Shift+Enter is a new line, not a send."""
    def console() -> list[dict]:
        try:
            return driver.get_log("browser")  # the entries since the last call
        except (AttributeError, WebDriverException):  # a driver without the log: the page still loads
            return []

    console()  # forget what earlier pages logged
    open_page(driver, server.url)
    name = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    assert driver.find_element(By.ID, "model").text == name
    assert driver.find_element(By.ID, "error").text == ""
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("a", Keys.SHIFT, Keys.ENTER, Keys.NULL, "b")
    assert prompt.get_property("value") == "a\nb" and not replies(driver)
    prompt.clear()
    severe = [e["message"] for e in console() if e.get("level") == "SEVERE"]
    assert not severe, severe


def test_a_greedy_reply_is_the_apis_answer_with_stats(server, driver):
    """Temperature 0 in the page: the streamed reply is exactly the content of a non-streamed
    POST with the same message; the stats show its token count and a tokens/s figure."""
    greedy_chat(driver, server.url)
    question = "Write a haiku about the sea."
    reply = ask(driver, question)
    want = api_reply(server.url, [{"role": "user", "content": question}])
    assert reply.get_attribute("data-state") == "done"
    assert text(reply) == want["content"]
    stats = driver.find_element(By.ID, "stats").text
    m = re.search(r"(\d+) tokens · (\d+\.\d) tok/s · first token \d+ ms", stats)
    assert m, stats
    assert int(m.group(1)) == want["completion_tokens"] and float(m.group(2)) > 0


def test_a_second_turn_sends_the_history(server, driver):
    """Two questions in one chat: the second reply is the API's answer to the three-message
    history, so the page sent the first turn along. The user's text is shown as text, not HTML.
    Saves the screenshot build/server-page.png."""
    greedy_chat(driver, server.url)
    first, second = "What is the capital of France?", "And of <i>Italy</i>?"
    reply1 = text(ask(driver, first))
    reply2 = text(ask(driver, second))
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply1},
               {"role": "user", "content": second}]
    assert reply1 == api_reply(server.url, history[:1])["content"]
    assert reply2 == api_reply(server.url, history)["content"]
    users = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    assert [text(u) for u in users] == [first, second]
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages i"), "user text was parsed as HTML"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))
    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .msg")
    alone = ask(driver, second)  # a new chat: the history is gone
    assert text(alone) == api_reply(server.url, history[2:])["content"]
    assert text(alone) != reply2, "the question must need its history for this test to tell"


def test_stop_aborts_the_request_on_the_server(server, driver):
    """Stop after the first text of a long sampled reply: the page marks it stopped, and the server
    aborts it (no requests running within a few seconds, and none finished by stop or length)."""
    open_page(driver, server.url)
    set_field(driver, "temperature", 0.8)
    set_field(driver, "max-tokens", 2000)
    set_field(driver, "seed", 0)  # a draw that runs all 2000 tokens (about a minute) if not stopped
    def finished() -> float:  # requests that ended by a stop or their length (an abort is neither)
        return sum(metric(server.url, "tiny_llm:request_success_total", finished_reason=r) for r in ("stop", "length"))

    before = finished()
    driver.find_element(By.ID, "prompt").send_keys("Write a long story about a dragon.", Keys.ENTER)
    wait(driver, lambda d: replies(d) and text(replies(d)[-1]), what="no text arrived")
    driver.find_element(By.ID, "stop").click()
    reply = wait_done(driver, 0)
    assert reply.get_attribute("data-state") == "stopped" and text(reply)
    deadline = time.monotonic() + 10
    while metric(server.url, "tiny_llm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.1)
    assert finished() == before, "it finished rather than being aborted"
    assert driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()


def test_an_api_key_is_sent_and_a_401_shows_its_message(driver):
    """With --api-key: the page shows the 401's message (no key, then a wrong one); with the
    right key (kept in localStorage) a reply comes."""
    with ServerProcess("--api-key", "secret", "--kv-cache-memory", "64M") as keyed:
        messages = {key: httpx.get(f"{keyed.url}/v1/models", headers=headers, timeout=10).json()["error"]["message"]
                    for key, headers in (("none", {}), ("wrong", {"Authorization": "Bearer wrong"}))}
        greedy_chat(driver, keyed.url)
        error = driver.find_element(By.ID, "error")
        assert error.text == messages["none"]
        set_field(driver, "api-key", "wrong")
        driver.find_element(By.ID, "prompt").send_keys("Hi", Keys.ENTER)
        wait(driver, lambda d: error.text == messages["wrong"], 30, "the 401's message was not shown")
        assert not replies(driver), "a refused turn is taken back"
        assert driver.find_element(By.ID, "prompt").get_property("value") == "Hi"
        set_field(driver, "api-key", "secret")
        driver.find_element(By.ID, "send").click()
        reply = wait_done(driver, 0)
        assert reply.get_attribute("data-state") == "done" and text(reply)
        assert error.text == ""
        wait(driver, lambda d: d.find_element(By.ID, "model").text != "?", 30, "no model name with the key")
        assert driver.execute_script("return localStorage.getItem('tiny-llm-api-key')") == "secret"
        name = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer secret"}, timeout=10)
        assert driver.find_element(By.ID, "model").text == name.json()["data"][0]["id"]
