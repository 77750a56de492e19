"""The operator console (/ui) in a real browser: Debian's headless Chromium, driven by selenium
through Debian's chromedriver, against a running dede with an API key. It uploads a clean and a
triggered sample and checks what the page shows; screenshots go to $DEDE_SCREENSHOT_DIR (the
README's are made so: `DEDE_SCREENSHOT_DIR=docs/console pytest tests/service/test_console_browser.py`),
else to the test's temporary directory.

Without Chromium the test skips, except on CI (CI=true), where a missing browser is a failure:
.ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_KEY, ServerProcess, encode, start_server
from synthetic_bundle import THRESHOLD, expected_score, make_synthetic_bundle

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> tuple[str, str] | None:
    binary = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def _need_browser() -> tuple[str, str]:
    found = _browser()
    if found is None:
        reason = (
            "headless Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"on CI the console test must run: {reason}")
        pytest.skip(reason)
    try:
        import selenium  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("on CI the console test must run: selenium is missing (pip install -e '.[dev]')")
        pytest.skip("selenium is not installed (the dev extra)")
    return found


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    _need_browser()
    bundle = make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "console", explain=True)
    process = start_server(bundle, tmp_path_factory.mktemp("logs") / "console.log", api_key=API_KEY)
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def browser(console_server: ServerProcess):  # noqa: ANN201 - selenium's driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1500",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _samples(directory: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A clean sample (dark, mottled) and a triggered one: the same with a bright patch that the
    synthetic detector flags, in its top right corner."""
    rng = np.random.default_rng(5)
    clean = (rng.integers(0, 256, (32, 32, 3)) * 0.45).astype(np.uint8)
    triggered = clean.copy()
    triggered[:20, 12:] = 255
    clean_path, triggered_path = directory / "clean.png", directory / "triggered.png"
    clean_path.write_bytes(encode(clean))
    triggered_path.write_bytes(encode(triggered))
    return clean_path, triggered_path, clean, triggered


def _screenshot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("DEDE_SCREENSHOT_DIR") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def test_console_scores_a_clean_and_a_triggered_sample(
    console_server: ServerProcess,
    browser,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    shots = _screenshot_dir(tmp_path)
    clean_path, triggered_path, clean, triggered = _samples(tmp_path)
    assert expected_score(clean.transpose(2, 0, 1)) < THRESHOLD < expected_score(triggered.transpose(2, 0, 1))

    # The page itself needs no key and loads nothing from elsewhere (the CSP says so too).
    page = httpx.get(console_server.url + "/ui", timeout=10)
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN, no external URL
    browser.get(console_server.url + "/ui")

    # The service has a key: the page asks for it, keyboard first.
    key_field = wait.until(ready.visibility_of_element_located((By.ID, "api-key")))
    assert browser.switch_to.active_element == key_field
    key_field.send_keys(API_KEY + Keys.ENTER)
    wait.until(ready.text_to_be_present_in_element((By.ID, "model-facts"), "Threshold"))
    facts = browser.find_element(By.ID, "model-facts").text
    assert "synthetic test-1" in facts and f"{THRESHOLD:.4g}" in facts and "5.00% false positives" in facts
    assert "yes (heat map and rebuild)" in facts

    # Accessibility basics: a labelled picker, a focusable drop zone, live regions.
    drop = browser.find_element(By.ID, "drop")
    assert drop.get_attribute("tabindex") == "0" and drop.get_attribute("role") == "button"
    assert browser.find_element(By.CSS_SELECTOR, "label[for=files]").text
    assert browser.find_element(By.ID, "results").get_attribute("aria-live") == "polite"

    browser.find_element(By.ID, "files").send_keys(f"{clean_path}\n{triggered_path}")
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#results li.card")) == 2)
    cards = {
        card.get_attribute("aria-label").split(":")[0]: card
        for card in browser.find_elements(By.CSS_SELECTOR, "#results li.card")
    }
    assert set(cards) == {"clean.png", "triggered.png"}
    flagged, clean_card = cards["triggered.png"], cards["clean.png"]
    assert "flagged" in flagged.get_attribute("class").split()
    assert "flagged" not in clean_card.get_attribute("class").split()
    assert "FLAGGED" in flagged.text and "not flagged" in clean_card.text
    for card, array in ((clean_card, clean), (flagged, triggered)):
        score = expected_score(array.transpose(2, 0, 1))
        assert f"score {score:.4g}" in card.text
        meter = card.find_element(By.CSS_SELECTOR, "[role=meter]")
        assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(score, rel=1e-5)
        heat = card.find_element(By.CSS_SELECTOR, "img.heat")
        assert heat.get_attribute("src").startswith("data:image/png;base64,") and heat.get_attribute("alt")
        rebuild = card.find_element(By.CSS_SELECTOR, "img.rebuild")
        assert (
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", rebuild) == 32
        )
        assert all(img.get_attribute("alt") for img in card.find_elements(By.TAG_NAME, "img"))
    # The bright patch is where the heat map is: its strongest cell is above the threshold.
    assert "most unusual place: 3.333 × threshold" in flagged.text

    # The recent flag rate comes from the service's own counters.
    browser.execute_script("refreshStats()")
    wait.until(ready.text_to_be_present_in_element((By.ID, "flag-rate"), "1 of 2"))
    assert "50.0% flagged" in browser.find_element(By.ID, "flag-rate").text

    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shots / "console.png"))
    clean_card.screenshot(str(shots / "console-clean.png"))
    flagged.screenshot(str(shots / "console-triggered.png"))
    assert (shots / "console-triggered.png").stat().st_size > 1000


def test_console_files_are_served_by_name_only(console_server: ServerProcess) -> None:
    for path in ("/ui/console.js", "/ui/console.css"):
        assert httpx.get(console_server.url + path, timeout=10).status_code == 200
    for path in ("/ui/index.html.bak", "/ui/..%2fconsole.py", "/ui/%2e%2e%2fapp.py"):
        assert httpx.get(console_server.url + path, timeout=10).status_code == 404
    stats = httpx.get(console_server.url + "/v1/stats", timeout=10)
    assert stats.status_code == 401  # the counters need the key like the rest of the API
