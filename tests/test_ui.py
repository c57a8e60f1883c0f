"""``prospect ui``: the presets and the actions through the API, the CLI's checks, and an end-to-end run in a
real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium): upload → train
(a few steps) → generate, and the images appear."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prospect.ui import PRESETS, Studio, parse_rows, preset_rows

gradio = pytest.importorskip("gradio", reason="the web app needs gradio (the test extra installs it)")


def test_presets_put_the_concept_in_their_stages():
    assert preset_rows("material", 10, 3, "*", "a blue square") == ["*"] * 3 + ["a blue square"] * 7
    assert preset_rows("layout", 10, 6, "a *", "x") == ["x"] * 6 + ["a *"] * 4
    assert preset_rows("content", 10, 5, "*", "x") == ["x"] * 3 + ["*"] * 4 + ["x"] * 3
    assert preset_rows("style", 4, 4, "*", "x") == ["*"] * 4
    assert set(PRESETS) == {"material", "style", "content", "layout", "custom"}
    with pytest.raises(ValueError, match="split"):
        preset_rows("material", 10, 11, "*", "x")
    assert parse_rows(["*", " 3 ", "a 3", "-1"]) == ["*", 3, "a 3", -1]


@pytest.fixture()
def studio(tmp_path, tiny_model_dir):
    from prospect.pipeline import ProSpectPipeline

    def load():
        pp = ProSpectPipeline.from_pretrained(tiny_model_dir)
        pp.pipe.set_progress_bar_config(disable=True)
        return pp

    return Studio(load, tmp_path / "app")


def _reference(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "ref.png"
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(path)
    return path


def test_train_generate_visualize_through_the_studio(studio, tmp_path):
    seen = []
    path = studio.train([str(_reference(tmp_path))], "my cat", 3, on_step=lambda s, n: seen.append((s, n)))
    assert path.name == "my-cat.safetensors" and studio.concept_files() == ["my-cat"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    rows = preset_rows("material", 10, 5, "*", "a photo of a dog")
    pngs = studio.generate("my-cat", rows, None, 0.6, 3, 5.0, 7, 2)
    assert len(pngs) == 2 and all(p.exists() for p in pngs)
    meta = Image.open(pngs[1]).info
    params = json.loads(meta["prospect"])
    assert params["generator_seed"] == 8 and "a photo of a dog" in params["stage_prompts"]
    edited = studio.generate("my-cat", rows, str(_reference(tmp_path)), 0.7, 4, 5.0, 0, 1)
    assert len(edited) == 1
    assert studio.visualize("my-cat", 2, 5.0, 0).exists()


def test_the_studio_trains_and_generates_on_sdxl(tiny_sdxl, tmp_path):
    from prospect.concept import Concept
    from prospect.pipeline import ProSpectPipeline

    studio = Studio(lambda: ProSpectPipeline(tiny_sdxl), tmp_path / "out")
    path = studio.train([str(_reference(tmp_path))], "teddy", 2)
    assert Concept.load(path).family == "sdxl"
    rows = preset_rows("layout", 10, 5, "*", "a photo of a dog")
    assert len(studio.generate("teddy", rows, None, 0.6, 3, 5.0, 0, 1)) == 1
    assert studio.visualize("teddy", 2, 5.0, 0).exists()


@pytest.mark.parametrize("call, match", [
    (lambda s, t: s.train([], "x", 3), "upload"),
    (lambda s, t: s.train([str(_reference(t))], "  ", 3), "name"),
    (lambda s, t: s.train([str(_reference(t))], "x", 0), "steps"),
    (lambda s, t: s.generate("nope", ["*"] * 10, None, 0.6, 3, 5.0, 0, 1), "no concept named"),
    (lambda s, t: s.generate(None, ["a"] * 10, None, 0.6, 0, 5.0, 0, 1), "num_inference_steps"),
    (lambda s, t: s.generate(None, ["a"] * 10, str(_reference(t)), 0.01, 3, 5.0, 0, 1), "denoises nothing"),
    (lambda s, t: s.generate(None, ["a"] * 10, None, 0.6, 3, 5.0, 0, 99), "images"),
])
def test_bad_input_is_one_line(studio, tmp_path, call, match):
    with pytest.raises(Exception, match=match) as info:
        call(studio, tmp_path)
    assert "\n" not in str(info.value)


def test_cli_ui_refuses_a_bad_port_and_binds_localhost_by_default(capsys):
    from prospect.cli import build_parser, main

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.share is False
    assert main(["ui", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "prospect: error: --port must be in [1, 65535], got 70000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    """Headless Chromium through Selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser: install Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver); .ci/run does")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(until, seconds=120.0, what=""):
    end = time.time() + seconds
    while time.time() < end:
        try:
            value = until()
        except Exception:  # noqa: BLE001  (the page is still rendering)
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_upload_train_generate_in_a_real_browser(tmp_path):
    """The embedded model, a rendered toy-world reference: upload it, train 6 steps, pick the concept, generate
    four images with the material preset; the gallery shows them and the PNGs are written."""
    from prospect.pipeline import ProSpectPipeline
    from prospect.toyworld import world
    from prospect.ui import launch

    browser = _browser()
    from selenium.webdriver.common.by import By

    def load():
        pp = ProSpectPipeline.from_pretrained()
        pp.pipe.set_progress_bar_config(disable=True)
        return pp

    studio = Studio(load, tmp_path / "app")
    port = _free_port()
    app = launch(studio, port=port, block=False)
    reference = tmp_path / "reference.png"
    world.render_pil(world.Scene("left", "triangle", "red", "checkered", "light")).save(reference)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#images input[type=file]"), what="the upload field")
        browser.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(str(reference))
        _wait(lambda: "reference\n.png" in browser.find_element(By.ID, "images").text, what="the upload")  # name, ext
        steps = browser.find_element(By.CSS_SELECTOR, "#train-steps input")
        steps.clear()
        steps.send_keys("6")
        browser.find_element(By.ID, "train").click()
        _wait(lambda: "saved concept.safetensors" in
              browser.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value"), what="training")
        assert studio.concept_files() == ["concept"]
        gen_steps = browser.find_element(By.CSS_SELECTOR, "#gen-steps input")
        gen_steps.clear()
        gen_steps.send_keys("10")
        text = browser.find_element(By.CSS_SELECTOR, "#text-prompt textarea")
        text.send_keys("a plain blue square on the top")
        text.send_keys("\n")  # submit: the material preset fills the stage rows
        _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#stage-9 textarea").get_attribute("value")
              == "a plain blue square on the top", what="the preset")
        browser.find_element(By.ID, "generate").click()

        def shown():  # four images in the gallery, each loaded (a decoded picture has a width)
            images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
            return len(images) >= 4 and all(int(im.get_attribute("naturalWidth") or 0) > 0 for im in images)

        _wait(shown, what="the gallery's images")
        assert len(list((tmp_path / "app" / "images").glob("*.png"))) == 4
        shot = os.environ.get("PROSPECT_UI_SCREENSHOT")
        if shot:  # the whole page, for the README
            browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 40)
            browser.execute_script("window.scrollTo(0, 0)")
            time.sleep(1)
            browser.save_screenshot(shot)
    finally:
        browser.quit()
        app.close()


@pytest.mark.slow
def test_two_users_jobs_queue_and_a_bad_one_gets_the_one_line_error(studio):
    """Two clients submit at once: one job runs at a time, both finish; bad input comes back as the CLI's line."""
    from gradio_client import Client

    from prospect.ui import launch

    port = _free_port()
    app = launch(studio, port=port, block=False)
    running, most = [0], [0]
    real = studio.generate

    def counted(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            time.sleep(0.5)  # long enough for the second job to arrive while the first runs
            return real(*args, **kwargs)
        finally:
            running[0] -= 1

    studio.generate = counted
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        rows = ["a photo of a dog"] * 10 + [""] * 10
        args = (None, None, 0.6, 3, 5.0, 0, 1, *rows)
        jobs = [client.submit(*args, api_name="/generate") for _ in range(2)]
        results = [job.result(timeout=120) for job in jobs]
        assert all(len(gallery) == 1 for gallery, _ in results)
        assert most[0] == 1  # never two at once on the one pipeline
        with pytest.raises(Exception, match="prospect: error: num_inference_steps must be an integer") as info:
            client.predict(None, None, 0.6, 0, 5.0, 0, 1, *rows, api_name="/generate")
        assert "\n" not in str(info.value).strip()
    finally:
        app.close()
