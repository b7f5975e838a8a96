"""The chat page at `/` in headless Chromium (selenium + the Debian `chromium` and
`chromium-driver` packages): type a message, see the answer stream in from
/v1/chat/completions, and keep the conversation for the next message.

Temperature 0 on the page makes the answers greedy, so they must equal `generate_full` on
the same conversation. Skipped, with the reason, only where chromium or its driver is missing.
"""

from __future__ import annotations

import re
import shutil

import pytest
from serving import running_server

from picoalign.config import ServeConfig
from picoalign.generation.batched import Sampling, generate_full

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")
KEY = "page-key"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for_answer(driver, index: int, timeout: float = 120):
    """The index-th assistant bubble once it is done (or failed): its state, text and chunk count."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = ("const m = document.querySelectorAll('.msg.assistant')[arguments[0]];"
              "return m && m.dataset.state !== 'streaming' ? "
              "[m.dataset.state, m.textContent, Number(m.dataset.chunks)] : null;")
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script, index))


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_chat_page_streams_answers_and_keeps_the_conversation(browser, chat_model, tiny_llama, chat_tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg = ServeConfig(model=str(chat_model), name="tiny", device="cpu", dtype="fp32", api_key=KEY,
                      max_new_tokens=16, max_tokens=64)
    with running_server(cfg) as (url, _):
        browser.get(url + "/")
        html = browser.page_source
        assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no external assets
        # Without the key the page says so; with it, the model's id appears.
        WebDriverWait(browser, 30).until(lambda d: "API key" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        for field, value in (("temperature", "0"), ("max-tokens", "24")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)

        send(browser, "Hello there.")
        state, first, chunks = wait_for_answer(browser, 0)
        conversation = [{"role": "user", "content": "Hello there."}]
        (ref,) = generate_full(tiny_llama, chat_tokenizer, [conversation], Sampling(24, greedy=True))
        assert state == "done" and first == ref.text
        assert chunks >= 3  # it arrived in pieces, as the server streamed them
        status = browser.find_element(By.ID, "status").text
        assert status == f"{ref.prompt_tokens} prompt + {ref.completion_tokens} answer tokens"

        send(browser, "What is the capital of France?")
        state, second, _ = wait_for_answer(browser, 1)
        conversation += [{"role": "assistant", "content": first},
                         {"role": "user", "content": "What is the capital of France?"}]
        (ref2,) = generate_full(tiny_llama, chat_tokenizer, [conversation], Sampling(24, greedy=True))
        assert state == "done" and second == ref2.text
        users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")]
        assert users == ["Hello there.", "What is the capital of France?"]

        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_chat_page_shows_a_wrong_key_as_an_error(browser, chat_model):
    from selenium.webdriver.common.by import By

    cfg = ServeConfig(model=str(chat_model), device="cpu", dtype="fp32", api_key=KEY, max_new_tokens=8)
    with running_server(cfg) as (url, _):
        browser.get(url + "/")
        browser.find_element(By.ID, "api-key").send_keys("wrong")
        send(browser, "Hello there.")
        state, text, _ = wait_for_answer(browser, 0, timeout=30)
        assert state == "error" and text.startswith("Error: 401: missing or wrong API key")
        assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello there."  # kept to retry
