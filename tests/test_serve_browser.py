"""The rater page in a real browser: headless Chromium (Debian's package) driven by Selenium.

A rater opens the page with ``?token=``, picks the best answer with the keyboard, undoes it
(U) and judges again, looks at where the answers differ (D), ranks all answers, marks all
unacceptable with an answer of their own (W) and flags one as unsafe, all without a mouse; every
judgement must be in the database, the undone one gone, and the progress line must count done and remaining tasks.
With ``PREFTUNE_SCREENSHOTS=<dir>`` the test saves the page (the difference view) there: that is
how docs/img/rater-page.png is made. Without /usr/bin/chromium the test skips on a developer machine and fails in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.browser import wait_for as _wait
from support.serve import ADMIN_TOKEN, candidates, jsonl, make_settings, running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(chromium):  # the shared headless Chromium (tests/support/browser.py)
    return chromium


def test_rater_judges_with_the_keyboard_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from sqlalchemy import select

    from preftune.serve import db, service
    from preftune.serve.models import Judgement

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.make_sessionmaker(engine)
    hostile = '<img src=x id="xss" onerror="document.title=\'pwned\'">'
    recs = candidates(4, family="tone", n_candidates=3)
    recs[0]["candidates"][1]["text"] = hostile
    with sessions() as s:
        service.import_tasks(
            s, service.parse_candidates_jsonl(jsonl(recs).splitlines(), source="t", max_text_chars=8000)
        )
        _rater, token = service.create_rater(s, "browser-rater")

    def stored() -> list[Judgement]:
        with sessions() as s:
            rows = list(s.scalars(select(Judgement).order_by(Judgement.id)))
            s.commit()
            return rows

    def shown_task():
        cards = browser.find_elements(By.CSS_SELECTOR, "#candidates .candidate")
        if len(cards) != 3 or browser.find_element(By.ID, "task").get_attribute("hidden") is not None:
            return None
        return browser.find_element(By.ID, "prompt").text, [int(c.get_attribute("data-index")) for c in cards]

    with running_server(make_settings(url)) as base:
        browser.get(f"{base}/?token={token}")
        prompt1, order1 = _wait(shown_task, what="the first task")
        assert "token=" not in browser.current_url  # the token left the address bar ...
        assert browser.execute_script("return window.localStorage.getItem('preftune.raterToken')") == token
        _wait(lambda: "browser-rater" in browser.find_element(By.ID, "who").text, what="the rater name")
        # candidate text is shown as text, never as HTML
        assert browser.find_elements(By.ID, "xss") == [] and browser.title != "pwned"
        assert hostile in browser.find_element(By.ID, "candidates").text

        _wait(lambda: "0 judged · 4 remaining" in browser.find_element(By.ID, "progress").text, what="progress")

        # 0. A first pick, taken back with U within the undo window: the same task comes back.
        ActionChains(browser).send_keys("3").perform()
        _wait(lambda: len(stored()) == 1, what="the judgement to undo")
        _wait(lambda: browser.find_element(By.ID, "undo").is_displayed(), what="the undo button")
        _wait(lambda: (t := shown_task()) and t[0] != prompt1, what="the next task after the first pick")
        ActionChains(browser).send_keys("u").perform()
        _wait(lambda: len(stored()) == 0, what="the undone judgement gone from the database")
        assert _wait(lambda: (t := shown_task()) and t[0] == prompt1 and t, what="the undone task back") == (
            prompt1,
            order1,
        )
        _wait(lambda: "0 judged · 4 remaining" in browser.find_element(By.ID, "progress").text, what="progress")

        # D shows where the answers differ (word by word), D again hides it.
        ActionChains(browser).send_keys("d").perform()
        marks = _wait(
            lambda: browser.find_elements(By.CSS_SELECTOR, "#candidates mark.diff"), what="highlighted differences"
        )
        assert all(m.text.strip() for m in marks)
        if os.environ.get("PREFTUNE_SCREENSHOTS"):
            browser.save_screenshot(str(Path(os.environ["PREFTUNE_SCREENSHOTS"]) / "rater-page.png"))
        ActionChains(browser).send_keys("d").perform()
        _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, "#candidates mark.diff"), what="the plain view")

        # 1. Shift+1 flags the first shown answer unsafe, then key "2" picks the second shown answer as best.
        ActionChains(browser).key_down(Keys.SHIFT).send_keys("1").key_up(Keys.SHIFT).perform()
        ActionChains(browser).send_keys("2").perform()
        _wait(lambda: len(stored()) == 1, what="the first judgement in the database")
        first = stored()[0]
        assert (first.best, first.unsafe, first.all_unacceptable, first.ranking) == (
            order1[1],
            [order1[0]],
            False,
            None,
        )
        browser.save_screenshot(str(tmp_path / "rater-page.png"))
        _wait(lambda: "1 judged · 3 remaining" in browser.find_element(By.ID, "progress").text, what="progress")

        # 2. The next task loads at once; R, 3, 1 ranks all three (the last one fills itself), Enter sends.
        prompt2, order2 = _wait(lambda: (t := shown_task()) and t[0] != prompt1 and t, what="the second task")
        ActionChains(browser).send_keys("r").perform()
        ActionChains(browser).send_keys("3").send_keys("1").perform()
        _wait(lambda: browser.find_element(By.ID, "send-ranking").is_displayed(), what="the send-ranking button")
        ActionChains(browser).send_keys(Keys.ENTER).perform()
        _wait(lambda: len(stored()) == 2, what="the ranking in the database")
        second = stored()[1]
        assert second.ranking == [order2[2], order2[0], order2[1]] and second.best == order2[2]

        # 3. W opens the box for the rater's own answer (typing there is text, not shortcuts: it has x, s, r,
        # d, u and a digit), Esc leaves it, X sends "all unacceptable" with it; 4. S: skip (no judgement).
        prompt3, _ = _wait(lambda: (t := shown_task()) and t[0] != prompt2 and t, what="the third task")
        own = "I can't explain that: 1 risk is serious. Ask a pharmacist, they will discuss it."
        ActionChains(browser).send_keys("w").perform()
        _wait(lambda: browser.find_element(By.ID, "written").is_displayed(), what="the answer box")
        ActionChains(browser).send_keys(own).send_keys(Keys.ESCAPE).perform()
        assert len(stored()) == 2 and shown_task()[0] == prompt3  # typing sent nothing
        ActionChains(browser).send_keys("x").perform()
        _wait(lambda: len(stored()) == 3, what="the all-unacceptable judgement")
        third = stored()[2]
        assert (third.best, third.all_unacceptable, third.written) == (None, True, own)
        _wait(lambda: (t := shown_task()) and t[0] != prompt3 and t, what="the fourth task")
        ActionChains(browser).send_keys("s").perform()
        _wait(lambda: browser.find_element(By.ID, "done").is_displayed(), what="the 'no tasks left' message")
        assert len(stored()) == 3
        assert "3 judged" in browser.find_element(By.ID, "progress").text
        browser.save_screenshot(str(tmp_path / "rater-page-done.png"))

        # A reload remembers the token (localStorage): no login form.
        browser.get(base + "/")
        _wait(lambda: browser.find_element(By.ID, "done").is_displayed(), what="the page after a reload")
        assert not browser.find_element(By.ID, "login").is_displayed()

        # The admin page shows progress and agreement per family for the admin token.
        browser.get(base + "/admin")
        browser.find_element(By.ID, "admin-token").send_keys(ADMIN_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        agreement = _wait(
            lambda: browser.find_element(By.CSS_SELECTOR, "#agreement table").text, what="the agreement table"
        )
        assert "alpha" in agreement and "tone" in agreement
        assert "3 judgements" in browser.find_element(By.ID, "stats").text
        assert "browser-rater" in browser.find_element(By.ID, "raters").text
        browser.save_screenshot(str(tmp_path / "admin-page.png"))
    engine.dispose()
    shot = tmp_path / "rater-page.png"
    assert shot.exists() and shot.stat().st_size > 5000


def test_the_token_form_and_a_wrong_token(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from preftune.serve import db, service

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    with db.make_sessionmaker(engine)() as s:
        _rater, token = service.create_rater(s, "formuser")
    engine.dispose()
    with running_server(make_settings(url)) as base:
        browser.get(base + "/?token=ptr_not-a-real-token")
        _wait(lambda: browser.find_element(By.ID, "login").is_displayed(), what="the login form after a bad token")
        assert "not valid" in _wait(lambda: browser.find_element(By.ID, "status").text, what="the error message")
        field = browser.find_element(By.ID, "token-input")
        field.send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        _wait(lambda: browser.find_element(By.ID, "done").is_displayed(), what="the empty task list")
        assert "formuser" in browser.find_element(By.ID, "who").text
        browser.get(base + "/admin")
        _wait(lambda: browser.find_element(By.ID, "admin-token").is_displayed(), what="the admin page")
        browser.find_element(By.ID, "admin-token").send_keys("not-the-admin-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        assert "invalid admin token" in _wait(lambda: browser.find_element(By.ID, "status").text, what="the error")
