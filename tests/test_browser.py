"""End to end in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The inspector is served by uvicorn on 127.0.0.1 with a small model fitted on a few bottle images; the
page is driven like a person would: upload, read the score, move the slider, click a pixel, upload a
corrupt file, upload a good image. Screenshots go to test-artifacts/. If the browser cannot start,
these tests fail (they never skip).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_app

from spade_ad import Spade
from spade_ad.delivery.inspector import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LIMIT_MB = 5


def _model(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = sorted((bottle / "train" / "good").glob("*.png"))[::26][:8]
    model_dir = tmp_path_factory.mktemp("browser") / "model"
    Spade(k=4, k_image=3, image_size=224, calibration_images=4).fit(train).save(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def server(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve_app(create_app(_model(bottle, tmp_path_factory), max_upload_bytes=LIMIT_MB * 1024 * 1024))


TOKEN = "browser-test-token-0123456789"


@pytest.fixture(scope="module")
def update_server(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve_app(create_app(_model(bottle, tmp_path_factory), allow_updates=True, token=TOKEN))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the Debian packages chromium and chromium-driver")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as exc:  # noqa: BLE001 - any failure to start the browser fails the tests
            pytest.fail(f"headless Chromium could not start: {exc}")
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.js_errors = []
    pg.requests = []
    pg.on("pageerror", lambda exc: pg.js_errors.append(str(exc)))
    pg.on("request", lambda req: pg.requests.append(req.url))
    yield pg
    context.close()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def number(text: str) -> float:
    m = re.search(r"-?\d+(\.\d+)?(e[-+]?\d+)?", text)
    assert m, text
    return float(m.group(0))


def upload(page: Any, path: Path | None = None, *, name: str = "", data: bytes = b"") -> None:
    if path is not None:
        page.set_input_files("#file", str(path))
    else:
        page.set_input_files("#file", {"name": name, "mimeType": "image/png", "buffer": data})


def test_inspector_end_to_end(page: Any, server: str, bottle: Path) -> None:
    t0 = time.monotonic()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('model:')")

    # upload a defective bottle: score, verdict and overlay appear
    defective = bottle / "test" / "broken_large" / "000.png"
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        upload(page, defective)
    regions = answer.value.json()["regions"]
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('overlay').complete && "
                           "document.getElementById('overlay').naturalWidth > 0")
    assert page.inner_text("#filename").startswith("000.png (900×900)")
    score = number(page.inner_text("#score"))
    norm = number(page.inner_text("#norm-score"))
    thr = number(page.inner_text("#image-thr"))
    assert score > 0 and norm == pytest.approx(score / thr, rel=2e-3)
    verdict = page.inner_text("#verdict")
    assert verdict == ("defective" if score >= thr else "good")
    assert verdict == "defective"  # a large break is far from 8 normal bottles
    assert page.eval_on_selector("#overlay", "e => e.clientWidth") > 200
    assert page.eval_on_selector("#colour-bar", "e => e.naturalHeight") == 256
    assert page.locator("#neighbours img").count() == 4
    page.wait_for_function("Array.from(document.querySelectorAll('#neighbours img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert page.is_hidden("#message")

    # the defect regions are listed (largest first) and outlined on the overlay, where the server found them
    assert len(regions) >= 1 and regions == sorted(regions, key=lambda r: -r["area"])
    rows = page.locator("#regions tbody tr")
    assert rows.count() == page.locator(".region-box").count() == len(regions)
    first = rows.nth(0).locator("td").all_inner_texts()
    assert first[:3] == ["1", ", ".join(map(str, regions[0]["box"])), str(regions[0]["area"])]
    over = page.locator("#overlay").bounding_box()
    drawn = page.locator(".region-box").nth(0).bounding_box()
    x, y, w, h = regions[0]["box"]
    scale = over["width"] / 900
    assert drawn["x"] == pytest.approx(over["x"] + x * scale, abs=2)
    assert drawn["y"] == pytest.approx(over["y"] + y * scale, abs=2)
    assert drawn["width"] == pytest.approx(w * scale, abs=2) and drawn["height"] == pytest.approx(h * scale, abs=2)
    assert page.inner_text("#regions-note").startswith(f"{len(regions)} at the pixel threshold")
    shot(page, "inspector_regions.png")

    # the slider recomputes the mask in the page, without a new upload
    n_predicts = sum(u.endswith("/predict") for u in page.requests)
    flagged_1 = int(page.get_attribute("#mask", "data-flagged"))
    mask_1 = page.eval_on_selector("#mask", "c => c.toDataURL()")
    page.fill("#threshold", "0.5")
    page.wait_for_function(f"document.getElementById('mask').dataset.flagged !== '{flagged_1}'")
    flagged_lo = int(page.get_attribute("#mask", "data-flagged"))
    assert flagged_lo > flagged_1
    assert page.eval_on_selector("#mask", "c => c.toDataURL()") != mask_1
    assert page.inner_text("#threshold-value").startswith("0.50 × calibrated")
    page.fill("#threshold", "1.8")
    page.wait_for_function(f"document.getElementById('mask').dataset.flagged !== '{flagged_lo}'")
    assert int(page.get_attribute("#mask", "data-flagged")) < flagged_1
    page.click("#reset-threshold")
    assert int(page.get_attribute("#mask", "data-flagged")) == flagged_1
    assert sum(u.endswith("/predict") for u in page.requests) == n_predicts
    shot(page, "inspector_slider.png")

    # click a pixel: the matching normal image appears with the matched patch highlighted
    box = page.locator("#overlay").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.3)
    page.wait_for_selector("#explain:not([hidden])")
    page.wait_for_function("document.getElementById('neighbour-thumb').complete && "
                           "document.getElementById('neighbour-thumb').naturalWidth > 0")
    assert page.is_visible("#marker")
    thumb = page.locator("#neighbour-thumb").bounding_box()
    hl = page.locator("#match-box").bounding_box()
    assert thumb is not None and hl is not None and hl["width"] >= 10 and hl["height"] >= 10
    assert thumb["x"] - 3 <= hl["x"] and hl["x"] + hl["width"] <= thumb["x"] + thumb["width"] + 3
    assert thumb["y"] - 3 <= hl["y"] and hl["y"] + hl["height"] <= thumb["y"] + thumb["height"] + 3
    assert page.eval_on_selector("#match-box", "e => getComputedStyle(e).borderTopColor") == "rgb(0, 255, 255)"
    assert page.is_hidden("#tile-box")  # an untiled model has no tiles to show
    assert number(page.inner_text("#match-distance")) > 0
    assert page.inner_text("#pixel-pos").startswith("(y ")
    assert re.search(r"\d+\.png \(#\d+\)", page.inner_text("#neighbour-name"))
    shot(page, "inspector_explain.png")

    # a corrupt file: a clear message in the page, the last result stays
    data = defective.read_bytes()
    upload(page, name="corrupt.png", data=data[:5000])
    page.wait_for_selector("#message:not([hidden])")
    msg = page.inner_text("#message")
    assert "Error 400" in msg and "corrupt.png: corrupt or truncated image" in msg
    assert page.eval_on_selector("#message", "e => e.classList.contains('error')")
    shot(page, "inspector_error.png")
    upload(page, name="notes.png", data=b"just some text, not a picture")
    page.wait_for_function("document.getElementById('message').textContent.includes('not an image file')")
    # a file over the limit is refused with a message, before any upload
    upload(page, name="huge.png", data=b"\0" * (LIMIT_MB * 1024 * 1024 + 1))
    page.wait_for_function("document.getElementById('message').textContent.includes('too large')")

    # ... and the page keeps working: a good bottle
    upload(page, bottle / "test" / "good" / "000.png")
    page.wait_for_selector("#message", state="hidden")
    page.wait_for_function("document.getElementById('filename').textContent.startsWith('000.png')"
                           " && document.getElementById('explain').hidden")
    good_score = number(page.inner_text("#score"))
    assert good_score < score
    assert page.inner_text("#verdict") in ("good", "defective")
    shot(page, "inspector_good.png")

    # everything came from this server (no CDN), and no script error happened
    assert all(u.startswith((server, "data:", "blob:")) for u in page.requests), page.requests
    assert page.js_errors == []
    assert time.monotonic() - t0 < 60


def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A new page on ``url`` (the inspector of a model served for one test) and the list its script errors go to."""
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    return page, errors


def test_a_zoned_model_shows_its_zone_and_regions(browser: Any, bottle: Path,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """A model with an inspection zone (the bottle's inner disc): the page shades what it ignores, outlines and
    lists the regions inside it."""
    import numpy as np

    train = sorted((bottle / "train" / "good").glob("*.png"))[::26][:8]
    folder = tmp_path_factory.mktemp("browser_zone") / "model"
    yy, xx = np.mgrid[:900, :900]
    zone = (yy - 450) ** 2 + (xx - 450) ** 2 <= 300**2
    Spade(k=4, k_image=3, calibration_images=4, min_area=200).fit(train, zone=zone).save(folder)
    serving = serve_app(create_app(folder))
    page, errors = _open(browser, next(serving))
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        upload(page, bottle / "test" / "broken_large" / "000.png")
    body = answer.value.json()
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('zone-shade').complete && "
                           "document.getElementById('zone-shade').naturalWidth === 900")
    assert body["zone"].startswith("data:image/png;base64,") and page.is_visible("#zone-shade")
    # the shade is transparent inside the zone, dark outside: read back two of its pixels in the page
    alpha = page.evaluate("""() => { const i = document.getElementById('zone-shade');
        const c = document.createElement('canvas'); c.width = 900; c.height = 900;
        const g = c.getContext('2d'); g.drawImage(i, 0, 0);
        return [g.getImageData(450, 450, 1, 1).data[3], g.getImageData(10, 10, 1, 1).data[3]]; }""")
    assert alpha == [0, 150]
    over = page.locator("#overlay").bounding_box()
    assert page.locator("#zone-shade").bounding_box() == over
    regions = body["regions"]
    assert regions and all(r["area"] >= 200 for r in regions) and body["min_area"] == 200
    for r in regions:  # every region lies in the disc (the map is 0 outside it)
        x, y, w, h = r["box"]
        assert 150 <= x and x + w <= 750 and 150 <= y and y + h <= 750
    assert page.locator(".region-box").count() == page.locator("#regions tbody tr").count() == len(regions)
    assert "at least 200 px each" in page.inner_text("#regions-note")
    shot(page, "inspector_zone_regions.png")
    assert errors == []
    page.context.close()
    next(serving, None)  # stops the server


def test_a_folder_of_models_lets_the_user_pick_one_and_shows_its_health(browser: Any, bottle: Path,
                                                                        tmp_path_factory: pytest.TempPathFactory
                                                                        ) -> None:
    from spade_ad.delivery.models_server import create_models_app

    root = tmp_path_factory.mktemp("browser_models")
    train = sorted((bottle / "train" / "good").glob("*.png"))
    Spade(k=4, k_image=3, calibration_images=4).fit(train[::26][:8]).save(root / "bottle-a")
    Spade(k=4, k_image=3, calibration_images=4).fit(train[1::20][:6]).save(root / "bottle-b")
    serving = serve_app(create_models_app(root))
    page, errors = _open(browser, next(serving))
    page.wait_for_selector("#model-picker:not([hidden])")
    assert page.eval_on_selector_all("#model-pick option", "os => os.map(o => o.value)") == ["bottle-a", "bottle-b"]
    page.wait_for_function("document.getElementById('model-info').textContent.includes('8 normal images')")
    page.select_option("#model-pick", "bottle-b")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('6 normal images')")
    with page.expect_response(lambda r: r.url.endswith("/models/bottle-b/predict")) as answer:
        upload(page, bottle / "test" / "good" / "000.png")
    assert answer.value.status == 200
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('health').textContent.includes('1 recent image')")
    assert page.inner_text("#health").startswith("health: warming up")
    page.wait_for_function("Array.from(document.querySelectorAll('#neighbours img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")  # thumbnails under the model's root
    assert page.eval_on_selector("#colour-bar", "e => e.naturalHeight") == 256
    shot(page, "inspector_models.png")
    assert errors == []
    page.context.close()
    next(serving, None)


def test_a_click_on_a_tiled_model_shows_the_matching_normal_tile(browser: Any, bottle: Path,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    train = sorted((bottle / "train" / "good").glob("*.png"))[::26][:8]
    folder = tmp_path_factory.mktemp("browser_tiled") / "model"
    Spade(k=4, k_image=3, image_size=112, tile=112, tile_span=2, calibration_images=4).fit(train).save(folder)
    serving = serve_app(create_app(folder))
    page, errors = _open(browser, next(serving))
    upload(page, bottle / "test" / "broken_large" / "000.png")
    page.wait_for_selector("#result:not([hidden])")
    box = page.locator("#overlay").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7)
    page.wait_for_selector("#explain:not([hidden])")
    page.wait_for_function("document.getElementById('neighbour-thumb').complete && "
                           "document.getElementById('neighbour-thumb').naturalWidth > 0")
    tile = page.locator("#tile-box").bounding_box()
    hl = page.locator("#match-box").bounding_box()
    thumb = page.locator("#neighbour-thumb").bounding_box()
    assert tile is not None and hl is not None and thumb is not None
    assert tile["width"] < thumb["width"] - 10 or tile["height"] < thumb["height"] - 10  # one tile, not all
    centre = (hl["x"] + hl["width"] / 2, hl["y"] + hl["height"] / 2)
    assert tile["x"] <= centre[0] <= tile["x"] + tile["width"]
    assert tile["y"] <= centre[1] <= tile["y"] + tile["height"]
    assert page.eval_on_selector("#tile-box", "e => getComputedStyle(e).borderTopStyle") == "dashed"
    assert re.fullmatch(r"tile \d+", page.get_attribute("#tile-box", "title") or "")
    shot(page, "inspector_tiled_explain.png")
    assert errors == []
    page.context.close()
    next(serving, None)  # stops the server


def test_api_docs_render_offline(page: Any, server: str) -> None:
    page.goto(server + "/docs")
    page.wait_for_selector("text=/predict")
    assert page.locator(".opblock").count() >= 3
    assert all(u.startswith((server, "data:")) for u in page.requests), page.requests


def test_report_filters_in_the_browser(browser: Any, small_train: Path, tmp_path: Path) -> None:
    from spade_ad import SpadeSettings
    from spade_ad.data import load_mvtec_category
    from spade_ad.delivery.report import write_report
    from spade_ad.evaluate import evaluate_category

    cat = load_mvtec_category(small_train)
    ev = evaluate_category(cat, SpadeSettings(k=3, k_image=2, image_size=64, calibration_images=4), "full",
                           keep_maps=True)
    path = write_report(tmp_path / "report.html", ev)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(path.as_uri())
    rows = pg.locator("#rows tbody tr")
    assert rows.count() == len(cat.test)

    def visible() -> list[str]:
        return pg.eval_on_selector_all("#rows tbody tr", "rs => rs.filter(r => r.style.display !== 'none')"
                                                         ".map(r => r.dataset.outcome)")

    assert len(visible()) == len(cat.test)
    for button, outcomes in (("misses", {"fn"}), ("false-alarms", {"fp"}), ("defective", {"tp", "fn"}),
                             ("good", {"tn", "fp"})):
        pg.click(f'button[data-filter="{button}"]')
        shown = visible()
        expected = [o for o in pg.eval_on_selector_all("#rows tbody tr", "rs => rs.map(r => r.dataset.outcome)")
                    if o in outcomes]
        assert sorted(shown) == sorted(expected)
        assert pg.inner_text("#shown").startswith(f"{len(shown)} of {len(cat.test)}")
    pg.click('button[data-filter="all"]')
    pg.click("#sort")
    scores = pg.eval_on_selector_all("#rows tbody tr", "rs => rs.map(r => parseFloat(r.dataset.score))")
    assert scores == sorted(scores)
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "report_synthetic.png"), full_page=False)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    context.close()


def test_mark_as_normal_and_remove_from_normals(browser: Any, update_server: str, bottle: Path) -> None:
    """With --allow-updates: enter the token, mark an upload as normal (it then scores lower), and remove a
    nearest normal image again; the generation and thresholds shown follow each change."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(update_server + "/")
    pg.wait_for_function("document.getElementById('generation').textContent === '1'")
    assert pg.is_visible("#token")
    upload(pg, bottle / "test" / "good" / "001.png")
    pg.wait_for_selector("#result:not([hidden])")
    pg.wait_for_function("document.getElementById('busy').hidden")
    assert pg.is_visible("#mark-normal")
    before = number(pg.inner_text("#score"))
    pg.click("#mark-normal")  # no token yet: refused with a message, nothing changes
    assert "token" in pg.inner_text("#message")
    pg.fill("#token", TOKEN)
    pg.click("#mark-normal")
    pg.wait_for_function("document.getElementById('generation').textContent === '2'")
    pg.wait_for_function(f"parseFloat(document.getElementById('score').textContent) < {before}")
    msg = pg.inner_text("#message")
    assert msg.startswith("Added ") and "001.png" in msg and "generation 2" in msg and "9 normal images" in msg
    after = number(pg.inner_text("#score"))
    assert after < before
    pg.wait_for_selector(".remove-normal")
    # the screenshot waits for the new generation's thumbnails: it used to be taken while they loaded, and
    # only the new image (the one thumbnail the browser had not cached) came out blank
    pg.wait_for_function("Array.from(document.querySelectorAll('#neighbours img'))"
                         ".every(i => i.complete && i.naturalWidth > 0)")
    shot(pg, "inspector_mark_as_normal.png")
    first = pg.locator("#neighbours figure").first
    assert "001.png" in first.inner_text()  # its nearest normal image is now itself
    assert "generation=2" in (first.locator("img").get_attribute("src") or "")
    assert first.locator("img").evaluate("i => i.naturalWidth") == 128  # its thumbnail, not a blank
    first.locator(".remove-normal").click()
    pg.wait_for_function("document.getElementById('generation').textContent === '3'")
    msg = pg.inner_text("#message")
    assert msg.startswith("Removed") and "001.png" in msg and "8 normal images" in msg
    pg.wait_for_function(f"parseFloat(document.getElementById('score').textContent) > {after}")
    shot(pg, "inspector_remove_from_normals.png")
    assert not errors, errors
    context.close()
