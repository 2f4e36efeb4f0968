"""The web inspector's API through FastAPI's TestClient: predictions, explanations, errors, concurrency."""

from __future__ import annotations

import base64
import io
import re
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from spade_ad import Spade
from spade_ad.delivery.inspector import STATIC_DIR, create_app
from spade_ad.io import decode_image, load_image

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("server") / "model"
    Spade(k=3, k_image=2, image_size=64, calibration_images=3).fit(small_train / "train" / "good").save(d)
    return d


@pytest.fixture(scope="module")
def client(model_dir: Path) -> TestClient:
    return TestClient(create_app(model_dir, max_upload_bytes=LIMIT), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def test_files(small_train: Path) -> list[Path]:
    files = sorted((small_train / "test").rglob("*.png"))
    assert len(files) >= 4
    return files


def post(client: TestClient, path: Path | None = None, data: bytes | None = None, name: str = "x.png",
         mime: str = "image/png") -> Any:
    payload = path.read_bytes() if path is not None else data
    return client.post("/predict", files={"file": (path.name if path else name, payload, mime)})


def decode_uri(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_predict(client: TestClient, model_dir: Path, test_files: list[Path]) -> None:
    f = test_files[0]
    r = post(client, f)
    assert r.status_code == 200, r.text
    j = r.json()
    model = Spade.load(model_dir)
    ref = model.predict([load_image(f)])
    h, w = load_image(f).shape[:2]
    assert (j["height"], j["width"]) == (h, w) and j["filename"] == f.name
    assert j["score"] == pytest.approx(float(ref.scores[0]), rel=1e-5)
    assert j["image_threshold"] == pytest.approx(model.image_threshold_)
    assert j["pixel_threshold"] == pytest.approx(model.pixel_threshold_)
    assert j["normalised_score"] == pytest.approx(j["score"] / j["image_threshold"])
    assert j["verdict"] == ("defective" if j["score"] >= j["image_threshold"] else "good")
    assert [n["index"] for n in j["neighbours"]] == [int(i) for i in ref.neighbours[0][:5]]
    assert all(n["name"] == Path(model.train_names_[n["index"]]).name for n in j["neighbours"])  # no folders
    mask = np.asarray(decode_uri(j["mask"]))
    assert mask.shape == (h, w)
    assert np.array_equal(mask.astype(bool), ref.maps[0] >= model.pixel_threshold_)
    assert decode_uri(j["overlay"]).size == (w, h)  # small images are not downscaled
    m = j["map"]
    raw = np.frombuffer(base64.b64decode(m["data"]), dtype="<f4").reshape(m["height"], m["width"])
    assert raw.shape == (h, w) and np.allclose(raw, ref.maps[0], rtol=1e-5, atol=1e-5)
    assert j["max_pixel_score"] == pytest.approx(float(ref.maps[0].max()), rel=1e-5)


def test_large_images_are_sent_downsampled(client: TestClient, test_files: list[Path]) -> None:
    big = np.asarray(Image.open(test_files[0]).convert("RGB").resize((600, 300)))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG")
    j = post(client, data=buf.getvalue(), name="big.jpg", mime="image/jpeg").json()
    assert (j["width"], j["height"]) == (600, 300)
    assert (j["map"]["width"], j["map"]["height"]) == (256, 128)
    assert decode_uri(j["overlay"]).size == (600, 300)
    assert decode_uri(j["mask"]).size == (600, 300)


def test_upload_over_the_limit_is_413_and_the_server_keeps_serving(client: TestClient,
                                                                   test_files: list[Path]) -> None:
    r = post(client, data=b"\x89PNG" + b"0" * (LIMIT + 100_000), name="huge.png")
    assert r.status_code == 413
    assert "too large" in r.json()["detail"] and f"{LIMIT:,} bytes" in r.json()["detail"]
    # just over the limit (within the multipart allowance): refused by the endpoint itself
    r = post(client, data=b"0" * (LIMIT + 1), name="huge.png")
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert post(client, test_files[1]).status_code == 200


def test_streamed_upload_over_the_limit_is_413(client: TestClient, test_files: list[Path]) -> None:
    def body() -> Any:  # chunked: no Content-Length, the limit is enforced while reading
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(LIMIT // 10_000 + 10):
            yield b"0" * 10_000
        yield b"\r\n--xx--\r\n"

    r = client.post("/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert post(client, test_files[0]).status_code == 200


def test_text_file_is_400_with_a_clear_message(client: TestClient, test_files: list[Path]) -> None:
    r = post(client, data=b"this is not an image\n", name="notes.txt", mime="text/plain")
    assert r.status_code == 400
    assert r.json()["detail"] == "notes.txt: not an image file (cannot identify its format)"
    assert post(client, test_files[0]).status_code == 200


def test_truncated_png_is_400(client: TestClient, test_files: list[Path]) -> None:
    data = test_files[0].read_bytes()
    r = post(client, data=data[: len(data) // 2], name="cut.png")
    assert r.status_code == 400
    assert r.json()["detail"].startswith("cut.png: corrupt or truncated image")
    r = post(client, data=b"", name="empty.png")
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/predict")  # no file at all
    assert r.status_code == 422


def test_decode_image_refuses_huge_pixel_counts() -> None:
    buf = io.BytesIO()
    Image.new("L", (400, 300)).save(buf, format="PNG")
    with pytest.raises(Exception, match="too large"):
        decode_image(buf.getvalue(), "wide.png", max_pixels=100_000)
    assert decode_image(buf.getvalue(), "wide.png").shape == (300, 400, 3)


def test_openapi_and_offline_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/predict" in spec["paths"] and "post" in spec["paths"]["/predict"]
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"200", "400", "413"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert "/correspondence" in spec["paths"]
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), page
        for asset in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", html):
            assert client.get(asset).status_code == 200, asset


def test_index_page_and_static_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "spade-ad inspector" in r.text
    assert not re.search(r"https?://", r.text)
    for name in ("app.js", "style.css", "index.html"):
        assert (STATIC_DIR / name).is_file()
        assert client.get(f"/static/{name}").status_code == 200
    assert not re.search(r"https?://", (STATIC_DIR / "app.js").read_text())
    info = client.get("/info").json()
    assert info["max_upload_bytes"] == LIMIT and info["pixel_threshold"] > 0
    bar = Image.open(io.BytesIO(client.get("/colour-bar.png").content))
    assert bar.size[1] == 256


def test_concurrent_requests_match_sequential_results(client: TestClient, test_files: list[Path]) -> None:
    files = test_files[:4] * 4  # 16 requests, 4 distinct images
    sequential: dict[Path, dict[str, Any]] = {}
    for f in test_files[:4]:
        s = post(client, f).json()
        s["explain"] = client.get("/correspondence", params={"id": s["id"], "y": 10, "x": 20}).json()
        sequential[f] = s

    def one(f: Path) -> tuple[Path, dict[str, Any]]:
        r = post(client, f)
        assert r.status_code == 200, r.text
        j = r.json()
        e = client.get("/correspondence", params={"id": j["id"], "y": 10, "x": 20})
        assert e.status_code == 200, e.text
        return f, {**j, "explain": e.json()}

    with ThreadPool(8) as pool:
        results = pool.map(one, files)
    assert len({j["id"] for _, j in results}) == len(files)
    for f, j in results:
        s = sequential[f]
        assert j["score"] == pytest.approx(s["score"], rel=1e-6)
        assert [n["index"] for n in j["neighbours"]] == [n["index"] for n in s["neighbours"]]
        assert j["mask"] == s["mask"]
        assert j["map"]["data"] == s["map"]["data"]
        keys = ("neighbour", "box_frac", "distance")
        assert {k: s["explain"][k] for k in keys} == {k: j["explain"][k] for k in keys}


def test_explain_returns_a_neighbour_and_box(client: TestClient, model_dir: Path, test_files: list[Path]) -> None:
    f = test_files[-1]
    j = post(client, f).json()
    model = Spade.load(model_dir)
    n_train = len(model.train_names_)
    ref = model.predict([load_image(f)], keep_features=True)
    h, w = j["height"], j["width"]
    for y, x in ((0, 0), (h // 2, w // 3), (h - 1, w - 1)):
        r = client.get("/correspondence", params={"id": j["id"], "y": y, "x": x})
        assert r.status_code == 200, r.text
        e = r.json()
        assert 0 <= e["neighbour"] < n_train and e["neighbour_name"] == Path(model.train_names_[e["neighbour"]]).name
        y0, x0, y1, x1 = e["box_frac"]
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        assert y0 <= e["y_frac"] <= y1 and x0 <= e["x_frac"] <= x1
        assert e["distance"] >= 0 and e["pixel_score"] >= 0
        # the same answer as the Python API
        c = ref.correspondence(0, y, x)
        assert (c.neighbour, tuple(c.box_frac)) == (e["neighbour"], tuple(e["box_frac"]))
        assert c.distance == pytest.approx(e["distance"], rel=1e-4)
        thumb = client.get(e["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).mode == "RGB"
    assert client.get("/correspondence", params={"id": j["id"], "y": h, "x": 0}).status_code == 400
    assert client.get("/correspondence", params={"id": "nope", "y": 0, "x": 0}).status_code == 404
    assert client.get("/thumbnail/9999").status_code == 404


def test_a_tiled_model_shows_the_match_in_its_normal_tile(small_train: Path, tmp_path: Path,
                                                         test_files: list[Path]) -> None:
    model = Spade(k=3, k_image=2, image_size=64, calibration_images=3, tile=64, tile_span=2)
    model.fit(small_train / "train" / "good").save(tmp_path / "m")
    assert model.grid is not None and len(model.grid) > 1
    c = TestClient(create_app(tmp_path / "m"), base_url="http://localhost")
    j = post(c, test_files[-1]).json()
    ref = model.predict([load_image(test_files[-1])], keep_features=True)
    for y, x in ((0, 0), (j["height"] // 2, j["width"] // 2), (j["height"] - 1, j["width"] - 1)):
        e = c.get("/correspondence", params={"id": j["id"], "y": y, "x": x}).json()
        want = ref.correspondence(0, y, x)
        assert e["tile"] == want.tile is not None and e["tile_box_frac"] == list(model.grid.box_frac(e["tile"]))
        ty0, tx0, ty1, tx1 = e["tile_box_frac"]
        y0, x0, y1, x1 = e["box_frac"]
        assert ty0 <= y0 < y1 <= ty1 and tx0 <= x0 < x1 <= tx1  # the matched patch lies in the tile shown
    untiled = post(client := TestClient(create_app(model=Spade(k=3, k_image=2, image_size=64, calibration_images=3)
                                                   .fit(small_train / "train" / "good")),
                                        base_url="http://localhost"), test_files[-1]).json()
    e = client.get("/correspondence", params={"id": untiled["id"], "y": 0, "x": 0}).json()
    assert e["tile"] is None and e["tile_box_frac"] is None


def test_explain_cache_keeps_the_last_uploads(model_dir: Path, test_files: list[Path]) -> None:
    c = TestClient(create_app(model_dir, cache_size=2), base_url="http://localhost")
    ids = [post(c, f).json()["id"] for f in test_files[:3]]
    r = c.get("/correspondence", params={"id": ids[0], "y": 0, "x": 0})
    assert r.status_code == 404 and "upload the image again" in r.json()["detail"]
    assert c.get("/correspondence", params={"id": ids[2], "y": 0, "x": 0}).status_code == 200


def test_create_app_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        create_app(tmp_path / "missing")


TOKEN = "token-for-the-read-side-tests-0123"


def _thumb_pixels(client: TestClient, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"  # never kept by the browser across generations
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_thumbnails_and_explanations_name_their_generation(model_dir: Path, test_files: list[Path],
                                                           tmp_path: Path) -> None:
    import gc
    import shutil
    import weakref

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    first = Spade.load(folder)
    old = weakref.ref(first)
    c = TestClient(create_app(folder, model=first, allow_updates=True, token=TOKEN), base_url="http://localhost")
    del first
    j = post(c, test_files[0]).json()
    assert j["generation"] == 1
    url = j["neighbours"][0]["thumbnail_url"]
    n0 = j["neighbours"][0]
    assert n0["id"] and url == f"/thumbnail/{n0['index']}?generation=1&id={n0['id']}"
    assert np.array_equal(_thumb_pixels(c, url), Spade.load(folder).thumbnail(j["neighbours"][0]["index"]))
    e = c.get("/correspondence", params={"id": j["id"], "y": 3, "x": 4}).json()
    assert e["generation"] == 1
    assert e["thumbnail_url"] == f"/thumbnail/{e['neighbour']}?generation=1&id={e['neighbour_id']}"
    # another generation: the image just scored becomes a training image
    r = c.post("/normals", json={"id": j["id"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["generation"] == 2
    # the first model is not kept alive by the upload cache (nor its bank file, deleted if replaced)
    gc.collect()
    assert old() is None
    # the old generation's references are refused, not answered from the new model
    r = c.get(url)
    assert r.status_code == 409 and "generation 1" in r.json()["detail"] and "generation 2" in r.json()["detail"]
    r = c.get("/correspondence", params={"id": j["id"], "y": 3, "x": 4})
    assert r.status_code == 409 and "upload the image again" in r.json()["detail"]
    # scored again: its nearest normal image is itself, listed first, and its thumbnail is that image
    again = post(c, test_files[0]).json()
    model = Spade.load(folder)
    assert again["generation"] == 2 and again["neighbours"][0]["index"] == model.bank_.n - 1
    assert np.array_equal(_thumb_pixels(c, again["neighbours"][0]["thumbnail_url"]), model.thumbnail(model.bank_.n - 1))
    for y, x in ((0, 0), (20, 30)):
        e = c.get("/correspondence", params={"id": again["id"], "y": y, "x": x}).json()
        assert e["generation"] == 2
        assert np.array_equal(_thumb_pixels(c, e["thumbnail_url"]), model.thumbnail(e["neighbour"]))


def test_thumbnail_urls_name_the_image_id(model_dir: Path, test_files: list[Path]) -> None:
    model = Spade.load(model_dir)
    model.train_ids_ = [f"{i:064x}" for i in range(model.bank_.n)]  # (models saved with image ids)
    c = TestClient(create_app(model=model), base_url="http://localhost")
    j = post(c, test_files[1]).json()
    n = j["neighbours"][0]
    assert n["id"] == f"{n['index']:064x}" and n["thumbnail_url"].endswith(f"&id={n['id']}")
    e = c.get("/correspondence", params={"id": j["id"], "y": 0, "x": 0}).json()
    assert e["neighbour_id"] == f"{e['neighbour']:064x}" and e["thumbnail_url"].endswith(f"&id={e['neighbour_id']}")
    assert c.get(n["thumbnail_url"]).status_code == 200
    r = c.get(f"/thumbnail/{n['index']}", params={"generation": 1, "id": f"{n['index'] + 1:064x}"})
    assert r.status_code == 409 and "is not image" in r.json()["detail"]


def test_error_bodies_quote_client_values_shortened(client: TestClient, model_dir: Path) -> None:
    huge = "A" * 50_000  # (URLs: the test client's limit; bodies: a megabyte)
    writer = TestClient(create_app(model_dir, allow_updates=True, token=TOKEN), base_url="http://localhost")
    for r in (client.get("/correspondence", params={"id": huge, "y": 0, "x": 0}),
              client.get(f"/thumbnail/{huge}"),
              client.get("/thumbnail/0", params={"generation": 1, "id": huge}),
              client.get("/correspondence", params={"id": "x", "y": huge, "x": 0}),
              client.get("/info", headers={"host": huge}),
              writer.post("/normals", json={"id": "C" * 1_000_000}, headers={"Authorization": f"Bearer {TOKEN}"})):
        assert 400 <= r.status_code < 500
        assert len(r.content) < 2000, (r.status_code, len(r.content))
    r = post(client, data=b"not an image", name="B" * 300 + ".png")  # (longer names: the multipart parser refuses)
    assert r.status_code == 400 and "B" * 100 not in r.text
    assert r.json()["detail"].endswith("(cannot identify its format)")
    r = client.get("/correspondence", params={"id": "a\nb\x1b[31m", "y": 0, "x": 0})
    assert r.status_code == 404 and "'a\\nb\\x1b[31m'" in r.json()["detail"]  # escaped, not raw
