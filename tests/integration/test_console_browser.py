"""The web console in a real browser (Debian's chromium, headless, driven by selenium through
chromium-driver) against a real `lab-bastion serve` (nginx in front of gunicorn): log in, see
discovered machines appear without reloading, queue an install through the form, watch the
progress bar and the log lines move while a simulated install posts progress and syslog, cancel
one, forget one; a wrong token refused; a hostile DMI string shown as text; a CSRF-less post
refused. One browser and one bastion for the module.

Screenshots land in the test's artefact directory (printed); with UPDATE_DOCS_IMAGES=1 they also
replace docs/img/console-*.png, which docs/console.md shows."""

from __future__ import annotations

import pytest
import requests

from tests.support import (
    KEY,
    UEFI_HW,
    call_from,
    save_screenshot,
    send_udp,
    start_bastion,
    start_chromium,
    udp_port,
    wait_for,
)

HOSTILE = "<script>alert('dmi')</script><img src=x onerror=alert(2)>"
#: the simulated machines: (MAC, loopback address each reports from)
NODE, OTHER, GONE = ("52:54:00:c0:00:01", "127.0.0.61"), ("52:54:00:c0:00:02", "127.0.0.62"), ("52:54:00:c0:00:03", "127.0.0.63")


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("console") / "data", workers=2)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("console-screenshots")
    yield d
    print(f"\nconsole screenshots: {d}")


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def _wait(driver, what: str, predicate, timeout: float = 20.0):
    """Wait until ``predicate(driver)`` is truthy; the page is never reloaded by the test."""
    from selenium.common.exceptions import StaleElementReferenceException

    def check():
        try:
            return predicate(driver)
        except StaleElementReferenceException:
            return False  # the live fragment was replaced under us: look again
    return wait_for(check, timeout=timeout, interval=0.2, what=what)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _all(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _link(driver, text):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.PARTIAL_LINK_TEXT, text)


def _go(driver, element) -> None:
    """Click a link or a submit button and wait for the page it leads to."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = _css(driver, "html")
    element.click()
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old))


def _shot(driver, shots, name: str, width: int = 1280) -> None:
    save_screenshot(driver, shots / f"console-{name}.png", width)


def _discover(b, mac: str, source: str, hardware=None) -> None:
    status, body = call_from(b, source, "POST", "/api/discover", {"mac": mac, "hardware": hardware or UEFI_HW})
    assert status == 200, body


def _no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no script ran alert()


def test_console_in_a_browser(bastion, browser, shots):
    from selenium.webdriver.support.ui import Select

    b, d = bastion, browser
    d.get(b.url + "/console/machines")
    assert "/console/login" in d.current_url
    # a wrong token is refused
    _css(d, "#token").send_keys("this-is-not-the-operator-token")
    _go(d, _css(d, "main button[type=submit]"))
    assert "not this bastion's operator token" in _css(d, "#token-error").text
    _shot(d, shots, "login")
    _css(d, "#token").send_keys(b.token)
    _go(d, _css(d, "main button[type=submit]"))
    assert d.current_url.endswith("/console/machines") and "No machines yet" in d.page_source

    # machines appear without a reload; one reports a hostile DMI string
    _discover(b, NODE[0], NODE[1])
    _discover(b, OTHER[0], OTHER[1])
    _discover(b, GONE[0], GONE[1], {**UEFI_HW, "dmi": {"vendor": HOSTILE, "product": "<b>bold</b>"}})
    _wait(d, "three machines listed", lambda d: len(_all(d, "tbody tr[data-mac]")) == 3)
    assert _css(d, "#count-discovered").text == "3"

    # the hostile machine's page shows the string as text; no script ran
    d.get(f"{b.url}/console/machines/{GONE[0]}")
    assert HOSTILE in _css(d, "#dmi").text and "<b>bold</b>" in _css(d, "#dmi").text
    _no_alert(d)

    # queue an install through the form: first a bad host name, shown next to its field
    d.get(f"{b.url}/console/machines/{NODE[0]}")
    _wait(d, "the stream says there is no install", lambda d: "No install running" in _css(d, "#log-status").text)
    _go(d, _link(d, "Install"))
    _css(d, "#hostname").send_keys("-bad-")
    Select(_css(d, "#role")).select_by_visible_text("worker")
    Select(_css(d, "#os")).select_by_visible_text("fedora-43")
    _css(d, "#ssh_keys").send_keys(KEY)
    _go(d, _css(d, "main button[type=submit]"))
    assert "host name" in _css(d, "#hostname-error").text.lower()
    assert _css(d, "#hostname").get_attribute("aria-invalid") == "true"
    _shot(d, shots, "install-form")
    _css(d, "#hostname").clear()
    _css(d, "#hostname").send_keys("node1")
    _go(d, _css(d, "main button[type=submit]"))
    assert _css(d, "#state").text == "install_queued"

    # a simulated install: the machine boots, posts progress, log lines and syslog
    status, script = call_from(b, NODE[1], "GET", f"/dispatch?mac={NODE[0]}")
    token = script.split("token=")[1].split()[0].split("&")[0]
    for percent, stage in ((10, "partitioning"), (45, "packages")):
        status, body = call_from(b, NODE[1], "POST", "/api/progress",
                                 {"mac": NODE[0], "token": token, "stage": stage, "percent": percent, "message": stage})
        assert status == 200, body
        _wait(d, f"progress bar at {percent}", lambda d, p=percent: _css(d, "#progress").get_attribute("value") == str(p))
    status, body = call_from(b, NODE[1], "POST", "/api/log",
                             {"mac": NODE[0], "token": token, "lines": ["Installing kernel <not markup>", "Installing k3s"]})
    assert status == 200, body
    send_udp(udp_port(b), b"<30>Nov 26 12:00:00 node1 anaconda: syslog line from the installer", source=NODE[1])
    _wait(d, "log lines", lambda d: "syslog line from the installer" in _css(d, "#log").text)
    assert "Installing kernel <not markup>" in _css(d, "#log").text
    # the page's own poll brings the history up to date (no reload)
    _wait(d, "history with the progress", lambda d: "packages" in _css(d, "#history").text)
    _shot(d, shots, "machine-installing")
    _shot(d, shots, "machine-phone", width=390)
    status, body = call_from(b, NODE[1], "POST", "/api/progress", {"mac": NODE[0], "token": token, "stage": "complete", "percent": 100})
    assert status == 200, body
    _wait(d, "installed", lambda d: _css(d, "#state").text == "installed")
    _wait(d, "end of the stream", lambda d: "ended: installed" in _css(d, "#log-status").text)
    assert _css(d, "#progress").get_attribute("value") == "100"

    # cancel one (queued through the API this time), forget another
    r = requests.post(b.url + "/api/install", headers=b.headers, timeout=10,
                      json={"mac": OTHER[0], "hostname": "node2", "role": "infra", "os": "fedora-43"})
    assert r.status_code == 202, r.text
    d.get(f"{b.url}/console/machines/{OTHER[0]}")
    _go(d, _link(d, "Cancel install"))
    _css(d, "#reason").send_keys("wrong rack")
    _go(d, _css(d, "#confirm"))
    assert _css(d, "#state").text == "discovered"
    assert "wrong rack" in d.page_source
    d.get(f"{b.url}/console/machines/{GONE[0]}")
    _go(d, _link(d, "Forget"))
    _go(d, _css(d, "#confirm"))
    assert d.current_url.split("?")[0].endswith("/console/machines")
    assert [r.get_attribute("data-mac") for r in _all(d, "tbody tr[data-mac]")] == [NODE[0], OTHER[0]]
    assert f"{GONE[0]} forgotten" in _css(d, ".flash").text
    _shot(d, shots, "machines")
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    d.get(f"{b.url}/console/machines/{NODE[0]}")
    _wait(d, "the log replayed", lambda d: "syslog line from the installer" in _css(d, "#log").text)
    _shot(d, shots, "machine-dark")
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    # a post without the CSRF token, with the browser's own session cookie, is refused
    cookies = {c["name"]: c["value"] for c in d.get_cookies()}
    r = requests.post(f"{b.url}/console/machines/{OTHER[0]}/forget", cookies=cookies, data={"reason": "x"}, timeout=10)
    assert r.status_code == 403
    assert requests.get(f"{b.url}/api/machines/{OTHER[0]}", headers=b.headers, timeout=10).status_code == 200

    # keyboard only: Tab reaches the skip link first, then real links and buttons
    from selenium.webdriver.common.keys import Keys

    d.get(b.url + "/console/machines")
    _css(d, "body").send_keys(Keys.TAB)
    assert d.switch_to.active_element.text == "Skip to content"
    d.switch_to.active_element.send_keys(Keys.TAB)
    assert d.switch_to.active_element.tag_name in ("a", "button")
