"""The interactive page (`python -m ctran_jax.serve`): its JSON API in-process, bad input,
then the page in a real headless Chromium against a real server on 127.0.0.1.

The model is the tiny trained demo model of conftest's ``trained_tiny``; images are demo
test images written as PNG files.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from starlette.testclient import TestClient

from ctran_jax import predict, serve

MAX_UPLOAD_MB = 0.05  # small, so that "too large" needs no big file


@pytest.fixture(scope="module")
def service(trained_tiny):
  _, model_dir = trained_tiny
  predictor = predict.Predictor.from_directory(model_dir, batch_size=1)
  return serve.Service(predictor, name="tiny", max_upload_mb=MAX_UPLOAD_MB,
                       examples=serve.demo_examples("ctran_demo/tiny", count=3))


@pytest.fixture(scope="module")
def client(service):
  with TestClient(serve.create_app(service)) as c:
    yield c


@pytest.fixture(scope="module")
def images(demo_data_dir, tmp_path_factory):
  """Paths of three demo test images, as PNG files."""
  folder = tmp_path_factory.mktemp("serve_images")
  ds = tfds.builder("ctran_demo/tiny", data_dir=demo_data_dir).as_dataset(split="test")
  paths = []
  for i, example in enumerate(tfds.as_numpy(ds.take(3))):
    paths.append(str(folder / f"test_{i}.png"))
    Image.fromarray(example["image"]).save(paths[-1])
  return paths


def post_predict(client, path, known=None):
  with open(path, "rb") as f:
    data = {"known": json.dumps(known)} if known is not None else {}
    return client.post("/predict", files={"image": (os.path.basename(path), f.read())},
                       data=data)


def predict_records(predictor, paths, known):
  out, err = io.StringIO(), io.StringIO()
  status = predict.run(paths, predictor, known=known, top=0, threshold=None, as_json=True,
                       attention_dir=None, out=out, err=err)
  assert status == 0, err.getvalue()
  return [json.loads(line) for line in out.getvalue().splitlines()]


# ----------------------------------------------------------------------------- the API

@pytest.mark.parametrize("known", [None, {"disc": 1, "grid": 0}])
def test_predict_endpoint_answers_the_predict_json_record(client, service, trained_tiny,
                                                          images, known):
  answers = [post_predict(client, path, known) for path in images]
  assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
  got = [a.json() for a in answers]
  # The same Predictor through `predict.run`: the same record, but for the image's name.
  expected = predict_records(service.predictor, images, known or {})
  for rec, exp, path in zip(got, expected, images, strict=True):
    assert rec["image"] == os.path.basename(path)
    assert {**rec, "image": exp["image"]} == exp
  # `predict`'s own default (batch 8, its own compilation): the same probabilities.
  default = predict.Predictor.from_directory(trained_tiny[1])
  for rec, exp in zip(got, predict_records(default, images, known or {}), strict=True):
    np.testing.assert_allclose([e["probability"] for e in rec["labels"]],
                               [e["probability"] for e in exp["labels"]], rtol=1e-5, atol=1e-6)
  if known:
    assert got[0]["known"] == known
    given = {e["label"]: e for e in got[0]["labels"] if e["known"]}
    assert given["disc"]["probability"] == 1.0 and given["grid"]["predicted"] is False


def test_known_labels_move_the_others(client, images):
  plain = post_predict(client, images[0]).json()
  told = post_predict(client, images[0], {"disc": 1}).json()
  moved = [a["probability"] != b["probability"]
           for a, b in zip(plain["labels"], told["labels"], strict=True) if a["label"] != "disc"]
  assert any(moved)


def test_page_api_upload_predict_info_examples(client, service, images):
  info = client.get("/api/info").json()
  assert info["name"] == "tiny" and len(info["labels"]) == 16
  assert info["dataset"] == "ctran_demo/tiny" and info["step"] == 8
  assert set(info["results"]["test"]) == {"0", "50"} and info["threshold"] == "calibrated"
  assert [e["name"] for e in info["examples"]] == ["test_0000.png", "test_0001.png",
                                                   "test_0002.png"]
  example = client.get("/api/examples/test_0000.png")
  assert example.headers["content-type"] == "image/png"
  assert example.content == service.examples["test_0000.png"][0]

  with open(images[1], "rb") as f:
    uploaded = client.post("/api/upload", files={"image": ("x.png", f.read())}).json()
  view = Image.open(io.BytesIO(base64.b64decode(uploaded["view"].split(",", 1)[1])))
  assert view.size == (32, 32)  # the model's input size
  answer = client.post("/api/predict", json={"id": uploaded["id"], "name": "x.png",
                                             "known": {"disc": 0}}).json()
  via_api = post_predict(client, images[1], {"disc": 0}).json()
  assert answer["record"] == {**via_api, "image": "x.png"}
  h, w = answer["attention"]["shape"]
  maps = np.asarray(answer["attention"]["maps"])
  assert maps.shape == (16, h * w) and np.allclose(maps.max(-1), 1.0)

  page = client.get("/")
  assert page.status_code == 200 and "/static/app.js" in page.text
  assert "default-src 'self'" in page.headers["content-security-policy"]
  assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("case, status, message", [
    ("not an image", 415, "notes.txt: not a readable image"),
    ("empty file", 415, "the file is empty"),
    ("too large", 413, "the image is 0.1 MB; this server accepts images up to 0.05 MB"),
    ("too large request", 413, "the request is 0.3 MB; this server accepts images up to 0.05"),
    ("unknown label", 400, "unknown label 'dsic'; did you mean disc, dots?"),
    ("value 2", 400, "label 'disc' given as 2; expected 0 (absent) or 1 (present)"),
    ("value true", 400, "label 'disc' given as 'true'; expected 0 (absent) or 1"),
    ("value string", 400, "label 'disc' given as '\"1\"'; expected 0"),
    ("known not JSON", 400, "known: not JSON"),
    ("known a list", 400, "known: expected a JSON object"),
    ("no image", 400, "no image: send the file as the multipart field 'image'"),
])
def test_bad_input_is_a_4xx_with_a_json_error_and_the_server_goes_on(client, images, case,
                                                                     status, message):
  with open(images[0], "rb") as f:
    png = ("test.png", f.read())
  noise = np.random.default_rng(0).integers(0, 256, 100_000, np.uint8).tobytes()
  files, data = {"image": png}, {}
  if case == "not an image":
    files = {"image": ("notes.txt", b"not an image at all")}
  elif case == "empty file":
    files = {"image": ("empty.png", b"")}
  elif case == "too large":
    files = {"image": ("big.png", noise)}
  elif case == "too large request":
    files = {"image": ("huge.png", noise * 3)}
  elif case == "unknown label":
    data = {"known": '{"dsic": 1}'}
  elif case.startswith("value"):
    data = {"known": json.dumps({"disc": {"value 2": 2, "value true": True,
                                          "value string": "1"}[case]})}
  elif case == "known not JSON":
    data = {"known": "disc=1"}
  elif case == "known a list":
    data = {"known": '["disc"]'}
  elif case == "no image":
    files = {"picture": png}
  answer = client.post("/predict", files=files, data=data)
  assert answer.status_code == status, answer.text
  assert answer.headers["content-type"] == "application/json"
  assert message in answer.json()["error"]
  # The page's API refuses the same things with the same words.
  if case.startswith(("unknown", "value", "known")):
    uploaded = client.post("/api/upload", files={"image": png}).json()
    known = json.loads(data["known"]) if case != "known not JSON" else data["known"]
    page = client.post("/api/predict", json={"id": uploaded["id"], "known": known})
    assert page.status_code == status and message in page.json()["error"]
  elif case != "no image":
    page = client.post("/api/upload", files=files)
    assert page.status_code == status and message in page.json()["error"]
  # ... and the server still answers.
  assert post_predict(client, images[0], {"disc": 1}).status_code == 200


def test_unknown_image_id_and_example_are_404(client):
  answer = client.post("/api/predict", json={"id": "0" * 24, "known": {}})
  assert answer.status_code == 404 and "upload it again" in answer.json()["error"]
  answer = client.get("/api/examples/nope.png")
  assert answer.status_code == 404 and "test_0000.png" in answer.json()["error"]
  assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_command_line_refuses_bad_arguments(capsys, trained_tiny):
  assert serve.main(["--port=8000"]) == 2
  assert "give --model=DIR" in capsys.readouterr().err
  assert serve.main(["--model", trained_tiny[1], "--max_upload_mb=0"]) == 2
  assert "--max_upload_mb=0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1200,900")


@pytest.fixture
def browser(tmp_path):
  webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROME_FLAGS + (f"--user-data-dir={tmp_path / 'profile'}",):
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
  try:
    yield driver
  finally:
    driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no chromium / chromedriver on PATH: `apt-get install -y chromium "
                    "chromium-driver` (Debian) to run the browser test")
def test_page_in_a_real_browser(browser, service, images, tmp_path):
  import httpx2
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  wait = WebDriverWait(browser, 30)
  body = lambda: browser.find_element(By.TAG_NAME, "body")  # noqa: E731

  def updated(count):
    wait.until(lambda _: body().get_attribute("data-state") == "ready"
               and body().get_attribute("data-updates") == str(count))

  def shown():
    return {row.get_attribute("data-label"): row
            for row in browser.find_elements(By.CSS_SELECTOR, ".label-row")}

  with serve.running(serve.create_app(service)) as url:
    assert url.startswith("http://127.0.0.1:")
    browser.get(url + "/")
    wait.until(lambda _: body().get_attribute("data-state") == "ready")
    assert "tiny" in browser.find_element(By.ID, "model-info").text
    assert "ctran_demo/tiny" in browser.find_element(By.ID, "model-info").text

    # Not an image: a clear message on the page, and the page goes on.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    error = browser.find_element(By.ID, "error")
    wait.until(lambda _: error.is_displayed())
    assert "notes.txt: not a readable image" in error.text

    browser.find_element(By.ID, "file").send_keys(images[0])
    updated(1)
    assert not error.is_displayed()
    rows = shown()
    assert len(rows) == 16
    before = {name: float(row.get_attribute("data-probability")) for name, row in rows.items()}
    shown_order = [before[name] for name in rows]
    assert shown_order == sorted(shown_order, reverse=True)  # sorted by probability

    given = max(before, key=before.get)  # tell it the most likely label is absent
    rows[given].find_element(By.CSS_SELECTOR, 'button[data-value="0"]').click()
    updated(2)
    rows = shown()
    assert rows[given].get_attribute("data-known") == "true"
    assert rows[given].find_element(By.CSS_SELECTOR, ".prob").text == "given no"

    with open(images[0], "rb") as f:
      api = httpx2.post(url + "/predict", files={"image": ("a.png", f.read())},
                       data={"known": json.dumps({given: 0})}).json()
    expected = {e["label"]: e["probability"] for e in api["labels"]}
    moved = [n for n in rows if n != given and expected[n] != before[n]]
    assert moved, "giving a label changed no other label's probability"
    for name in moved:
      row = rows[name]
      assert float(row.get_attribute("data-probability")) == expected[name]
      assert row.find_element(By.CSS_SELECTOR, ".prob").text == f"{expected[name]:.3f}"
    predicted = {e["label"] for e in api["labels"] if e["predicted"] and not e["known"]}
    assert {n for n, r in rows.items() if "predicted" in r.get_attribute("class")} == predicted

    # Hover a label: its attention map over the image, named in the caption.
    ActionChains(browser).move_to_element(rows[moved[0]].find_element(By.CLASS_NAME, "name")
                                          ).perform()
    caption = browser.find_element(By.ID, "caption")
    wait.until(lambda _: f"Attention of “{moved[0]}”" in caption.text)
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    print(f"screenshot: {shot}")
    if os.environ.get("SERVE_SCREENSHOT"):
      shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])
