"""Driving Debian's Chromium through Label Studio's web UI, as a person would (Selenium, no browser download).

Every step saves a screenshot under `out/browser/<test>/` (kept after the run: a failing run shows where it
broke). The steps are the ones a person takes: log in, Settings > Model > Connect Model, open a task, switch
on Auto-Annotation, pick a label, pick the smart tool, click, type, Submit.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must not try to download a driver or a browser

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Browser:
    def __init__(self, base: str, name: str):
        assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
            "Chromium and ChromeDriver are part of the test environment: `make browser` installs them "
            "(Debian packages chromium and chromium-driver)")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000"]:
            options.add_argument(arg)
        self.d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.base = base
        self.shots = ROOT / "out" / "browser" / name
        shutil.rmtree(self.shots, ignore_errors=True)
        self.shots.mkdir(parents=True)
        self.step = 0

    def close(self):
        self.d.quit()

    def shot(self, what: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.step:02d}-{re.sub(r'[^a-z0-9]+', '-', what.lower())}.png"
        self.d.save_screenshot(str(path))
        return path

    def wait(self, condition, timeout: float = 20, what: str = "condition"):
        """Poll `condition()` until it is truthy; on timeout, a screenshot and an error naming `what`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = condition()
                if value:
                    return value
            except Exception:  # the page is still rendering
                pass
            time.sleep(0.25)
        path = self.shot(f"timeout {what}")
        raise AssertionError(f"timed out waiting for {what}; screenshot: {path}")

    def visible(self, css: str):
        return [e for e in self.d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]

    def button(self, text: str):
        return self.wait(lambda: [b for b in self.d.find_elements(By.TAG_NAME, "button")
                                  if b.is_displayed() and b.text.strip() == text][0], what=f"button {text!r}")

    def text_present(self, words: str, timeout: float = 20):
        return self.wait(lambda: [e for e in self.d.find_elements(By.XPATH, f"//*[contains(text(), {words!r})]")
                                  if e.is_displayed()], timeout, f"text {words!r}")

    # ---- Label Studio -------------------------------------------------------------------------
    def login(self, email: str, password: str):
        self.d.get(self.base + "/user/login/")
        self.wait(lambda: self.d.find_element(By.NAME, "email"), what="the login form").send_keys(email)
        self.d.find_element(By.NAME, "password").send_keys(password)
        self.shot("login")
        self.d.find_element(By.CSS_SELECTOR, "button[type=submit], .ls-button").click()
        self.wait(lambda: "/user/login" not in self.d.current_url, what="logged in")

    def connect_model(self, project: int, url: str, title: str = "SAM 3", extra_params: str = "",
                      interactive: bool = True):
        """Settings > Model > Connect Model, filled in as a person types it."""
        self.d.get(f"{self.base}/projects/{project}/settings/ml")
        self.button("Connect Model").click()
        self.wait(lambda: self.d.find_element(By.NAME, "title"), what="the Connect Model form").send_keys(title)
        self.d.find_element(By.NAME, "url").send_keys(url)
        if extra_params:
            self.d.find_element(By.NAME, "extra_params").send_keys(extra_params)
        if interactive:  # the toggle's input is hidden behind its styled label
            self.d.execute_script("arguments[0].click()", self.d.find_element(By.NAME, "is_interactive"))
        self.shot("connect model form")
        self.button("Validate and Save").click()

    def open_task(self, project: int, task: int):
        self.d.get(f"{self.base}/projects/{project}/data?task={task}")
        self.wait(lambda: self.visible(".konvajs-content"), 40, "the image in the labelling view")
        self.wait(lambda: self.js("return !!(window.dataManager && window.dataManager.lsf && "
                                  "window.dataManager.lsf.lsf && window.dataManager.lsf.lsf.annotationStore.selected)"),
                  what="the editor")

    def toggle(self, label: str):
        """Switch on the editor's Auto-Annotation or Auto-Accept Suggestions (and wait until it is on)."""
        flag = {"Auto-Annotation": "_autoAnnotation", "Auto-Accept Suggestions": "_autoAcceptSuggestions"}[label]

        def on():
            if self.js(f"return window.dataManager.lsf.lsf.{flag}"):
                return True
            self.d.find_element(By.XPATH, f"//span[text()={label!r}]").click()
            time.sleep(0.3)
            return self.js(f"return window.dataManager.lsf.lsf.{flag}")

        self.wait(on, what=f"{label} switched on")

    def pick_label(self, label: str, control_index: int = 0):
        labels = [e for e in self.visible("span.lsf-label_clickable") if e.text.split("\n")[0] == label]
        labels[control_index].click()

    def smart_tool(self):
        self.wait(lambda: self.visible("button.lsf-tool_smart"), what="the smart tool")[0].click()

    def click_image(self, dx: int = 0, dy: int = 0):
        stage = self.visible(".konvajs-content")[0]
        ActionChains(self.d).move_to_element_with_offset(stage, dx, dy).pause(0.2).click().perform()

    def type_prompt(self, text: str):
        box = self.wait(lambda: self.d.find_element(By.CSS_SELECTOR, "[data-testid=textarea-input]"),
                        what="the text prompt box")
        box.click()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def show(self, element) -> None:
        """Scroll `element` to the middle of the window (for the screenshot that follows)."""
        self.js("arguments[0].scrollIntoView({block: 'center'})", element)
        time.sleep(0.3)

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def regions(self) -> list[tuple[str, list[str]]]:
        """(region type, labels) of the annotation open in the editor."""
        return self.js("""const a = window.dataManager.lsf.lsf.annotationStore.selected;
            return a.regions.map(r => [r.type, (r.labeling && r.labeling.selectedLabels || []).map(l => l.value)]);""")
