r"""An interactive page and a JSON API for a trained C-Tran, on a local web server.

    python -m ctran_jax.serve --model=/tmp/ctran_demo_model          # http://127.0.0.1:8000/
    python -m ctran_jax.serve --workdir=/tmp/ctran_demo --checkpoint=best --port=8080
    curl -F image=@photo.jpg -F 'known={"disc": 1, "grid": 0}' http://127.0.0.1:8000/predict

The page: upload an image or pick an example, see every label's probability (sorted, the
predicted set at the model's thresholds highlighted), tell the model some labels (unknown /
yes / no per label: the model runs again with them as known states and the others move),
and see a label's attention map over the image on hover (click the name to pin it).

Endpoints:

  GET  /                    the page (static HTML/JS/CSS in ctran_jax/serve_page/, no CDN)
  POST /predict             multipart: ``image`` (the file), optional ``known`` (a JSON
                            object, label name -> 0 or 1); answers the record that
                            ``python -m ctran_jax.predict --json`` prints for that image
  GET  /api/info            model name, labels, dataset, step, test mAP, threshold rule,
                            upload limit, examples
  GET  /api/examples/NAME   an example image
  POST /api/upload          multipart ``image`` -> {"id", "view": PNG data URL of the image
                            as the model sees it (eval transform)}; the model input is kept
                            (the last 16 images) so that a toggle sends no image again
  POST /api/predict         JSON {"id", "known"} -> {"record", "attention": {"shape": [h, w],
                            "maps": L flat lists, each scaled to max 1}} (for display)

Bad input is answered ``{"error": "..."}`` with status 400 (no image field, bad ``known``:
not a JSON object, an unknown label name, with close names suggested, or a value other than
0/1), 413 (larger than ``--max_upload_mb``) or 415 (not a readable image); 404 for an
unknown image id or example. Images are decoded and transformed as ``predict`` does.

The model runs with batch size 1: one compiled function, compiled (and the eval transform
warmed) on a blank image before the server accepts requests. Calls are serialised.

The server binds 127.0.0.1 unless ``--host`` says otherwise, and has no authentication.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import tempfile
import threading

import numpy as np

from ctran_jax import predict

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page")
CACHE_SIZE = 16      # model inputs kept for toggles (/api/predict)
MAX_EXAMPLES = 12
FORM_SLACK = 64 * 1024  # multipart overhead and the `known` field, beyond the image itself
DEMO_DATASET = "ctran_demo"
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".bmp": "image/bmp", ".gif": "image/gif", ".webp": "image/webp"}


class BadInput(ValueError):
  """A request the server refuses: answered ``{"error": message}`` with `status`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


# ----------------------------------------------------------------------------- the model side

class Service:
  """A `predict.Predictor` (batch size 1) behind the web app: input checks, the image cache,
  records, attention maps for display. Thread-safe; model calls are serialised."""

  def __init__(self, predictor: predict.Predictor, *, name: str,
               examples: dict[str, tuple[bytes, list[str] | None]] | None = None,
               max_upload_mb: float = 10.0):
    if predictor.batch_size != 1:
      raise ValueError("the server compiles one function for batch size 1; build the "
                       "Predictor with batch_size=1")
    if not max_upload_mb > 0:
      raise ValueError(f"--max_upload_mb={max_upload_mb}; expected a positive number")
    self.predictor, self.name = predictor, name
    self.examples = dict(examples or {})
    self.max_upload_mb = max_upload_mb
    self.max_upload_bytes = int(max_upload_mb * 2**20)
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self._warm()

  def _warm(self) -> None:
    """Compile the model for batch size 1 and run the eval transform once, on a blank image."""
    size = int(self.predictor.transform["image_size"])
    blank = self.predictor.model_input(np.zeros((size, size, 3), np.uint8))
    self.run(blank, self.predictor.label_states({}))

  # --- inputs

  def check_size(self, size: int, what: str = "the image is") -> None:
    if size > self.max_upload_bytes:
      raise BadInput(413, f"{what} {size / 2**20:.1f} MB; this server accepts images up to "
                     f"{self.max_upload_mb:g} MB (--max_upload_mb)")

  def image(self, data: bytes, filename: str = "image") -> tuple[str, np.ndarray]:
    """(id, model input) of an uploaded file; kept in the cache under its id."""
    self.check_size(len(data))
    key = hashlib.sha256(data).hexdigest()[:24]
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return key, self._cache[key]
    if not data:
      raise BadInput(415, f"{filename}: the file is empty; send a JPEG, PNG, BMP, GIF or WebP "
                     "image")
    try:
      model_input = self.predictor.model_input(predict.decode_image(data))
    except ValueError as e:
      raise BadInput(415, f"{filename}: {e}; send a JPEG, PNG, BMP, GIF or WebP image") from None
    with self._lock:
      self._cache[key] = model_input
      while len(self._cache) > CACHE_SIZE:
        self._cache.popitem(last=False)
    return key, model_input

  def cached(self, key: str) -> np.ndarray:
    with self._lock:
      if key not in self._cache:
        raise BadInput(404, f"no image {key!r} on the server (it keeps the last {CACHE_SIZE}); "
                       "upload it again")
      self._cache.move_to_end(key)
      return self._cache[key]

  def states(self, known) -> np.ndarray:
    """(L,) label states of `known`: a dict, a JSON object's text, or None / "" (none)."""
    if known is None or (isinstance(known, str) and not known.strip()):
      known = {}
    elif isinstance(known, str):
      try:
        known = json.loads(known)
      except json.JSONDecodeError as e:
        raise BadInput(400, f"known: not JSON ({e}); expected an object such as "
                       '{"disc": 1, "grid": 0}') from None
    if not isinstance(known, dict):
      raise BadInput(400, f"known: expected a JSON object of label name -> 0 or 1, got "
                     f"{type(known).__name__}")
    # JSON true/false and "1" are refused (by label_states, which checks the names first).
    known = {name: json.dumps(value) if isinstance(value, bool | str)
             else int(value) if isinstance(value, int | float) and value in (0, 1) else value
             for name, value in known.items()}
    try:
      return self.predictor.label_states(known)
    except ValueError as e:
      raise BadInput(400, str(e)) from None

  # --- the model

  def run(self, model_input: np.ndarray, states: np.ndarray):
    """Probabilities (L,) and attention maps (L, h, w) of one image."""
    with self._lock:
      probs, maps = self.predictor.predict(model_input[None], states[None])
    return probs[0], maps[0]

  def record(self, filename: str, probs: np.ndarray, states: np.ndarray) -> dict:
    """The record ``predict --json`` writes (calibrated thresholds when the model has them)."""
    per_label, rule = self.predictor.decide(probs, None)
    return predict.record(filename, probs, states, per_label, rule, self.predictor.labels)

  def view(self, model_input: np.ndarray) -> str:
    """The image as the model sees it (eval transform undone to pixels), a PNG data URL."""
    from PIL import Image

    t = self.predictor.transform
    pixels = np.clip(model_input * np.asarray(t["std"]) + np.asarray(t["mean"]), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

  def info(self) -> dict:
    source = self.predictor.info.get("source") or {}
    return {"name": self.name, "labels": list(self.predictor.labels),
            "dataset": source.get("dataset"), "step": source.get("step"),
            "checkpoint": source.get("checkpoint"), "results": source.get("results"),
            "threshold": "calibrated" if self.predictor.thresholds is not None else 0.5,
            "image_size": self.predictor.transform["image_size"],
            "max_upload_bytes": self.max_upload_bytes, "max_upload_mb": self.max_upload_mb,
            "examples": [{"name": n, "labels": labels}
                         for n, (_, labels) in self.examples.items()]}


def display_maps(maps: np.ndarray) -> dict:
  """(L, h, w) attention maps -> {"shape": [h, w], "maps": L flat lists scaled to max 1}."""
  top = maps.reshape(len(maps), -1).max(-1, keepdims=True)
  scaled = maps.reshape(len(maps), -1) / np.maximum(top, 1e-12)
  return {"shape": list(maps.shape[1:]), "maps": np.round(scaled, 3).tolist()}


# ----------------------------------------------------------------------------- examples

def demo_examples(dataset: str | None, count: int = 6) -> dict:
  """{file name: (PNG bytes, true labels)}: test images of the demo dataset the model was
  trained on (the same pixels the dataset holds); empty for any other dataset."""
  if not dataset or dataset.split("/")[0] != DEMO_DATASET:
    return {}
  from ctran_jax.data import demo

  config = dataset.split("/")[1] if "/" in dataset else "default"
  with tempfile.TemporaryDirectory() as folder:
    written = demo.write_images(folder, split="test", count=count, config=config)
    out = {}
    for path, names in written:
      with open(path, "rb") as f:
        out[os.path.basename(path)] = (f.read(), names)
  return out


def folder_examples(folder: str) -> dict:
  """{file name: (bytes, None)}: the first images of a folder, by name."""
  paths = [p for p in predict.expand_inputs([folder]) if os.path.isfile(p)][:MAX_EXAMPLES]
  if not paths:
    raise ValueError(f"--examples={folder}: no images there (JPEG, PNG, BMP, GIF, WebP)")
  out = {}
  for path in paths:
    with open(path, "rb") as f:
      out[os.path.basename(path)] = (f.read(), None)
  return out


# ----------------------------------------------------------------------------- the web app

class _TooLarge(Exception):
  pass


def create_app(service: Service):
  """The Starlette app: the page, its static files, the page's API and ``POST /predict``."""
  from starlette.applications import Starlette
  from starlette.concurrency import run_in_threadpool
  from starlette.datastructures import UploadFile
  from starlette.exceptions import HTTPException
  from starlette.requests import Request
  from starlette.responses import FileResponse, JSONResponse, Response
  from starlette.routing import Mount, Route
  from starlette.staticfiles import StaticFiles

  async def read_image_field(request: Request) -> tuple[str, bytes, object]:
    """(file name, bytes, the form) of the multipart ``image`` field, the size limit enforced
    while the body arrives (a declared Content-Length over it is refused unread)."""
    limit = service.max_upload_bytes + FORM_SLACK
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
      service.check_size(int(declared), "the request is")
    received = 0

    async def receive():
      nonlocal received
      message = await request.receive()
      received += len(message.get("body", b""))
      if received > limit:
        raise _TooLarge
      return message

    try:
      form = await Request(request.scope, receive).form(max_files=1, max_fields=4,
                                                        max_part_size=FORM_SLACK)
    except _TooLarge:
      service.check_size(received, "the request is over")
      raise
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
      raise BadInput(400, "no image: send the file as the multipart field 'image' "
                     "(curl -F image=@photo.jpg ...)")
    data = await upload.read()
    return upload.filename or "image", data, form

  async def page(request: Request):
    return FileResponse(os.path.join(PAGE_DIR, "index.html"))

  async def info(request: Request):
    return JSONResponse(service.info())

  async def example(request: Request):
    name = request.path_params["name"]
    if name not in service.examples:
      raise BadInput(404, f"no example {name!r}; the examples: {', '.join(service.examples)}")
    media = MEDIA_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
    return Response(service.examples[name][0], media_type=media)

  async def api_predict(request: Request):
    """``POST /predict``: the same record as ``predict --json``."""
    filename, data, form = await read_image_field(request)
    states = service.states(form.get("known"))
    _, model_input = await run_in_threadpool(service.image, data, filename)
    probs, _ = await run_in_threadpool(service.run, model_input, states)
    return JSONResponse(service.record(filename, probs, states))

  async def upload(request: Request):
    filename, data, _ = await read_image_field(request)
    key, model_input = await run_in_threadpool(service.image, data, filename)
    return JSONResponse({"id": key, "name": filename, "view": service.view(model_input)})

  async def page_predict(request: Request):
    try:
      body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as e:
      raise BadInput(400, f"the body is not JSON ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
      raise BadInput(400, 'expected {"id": "<from /api/upload>", "known": {...}}')
    states = service.states(body.get("known"))
    model_input = service.cached(body["id"])
    probs, maps = await run_in_threadpool(service.run, model_input, states)
    return JSONResponse({"record": service.record(body.get("name") or "image", probs, states),
                         "attention": display_maps(maps)})

  async def bad_input(request: Request, exc: BadInput):
    return JSONResponse({"error": str(exc)}, status_code=exc.status)

  async def http_error(request: Request, exc: HTTPException):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))

  routes = [Route("/", page), Route("/api/info", info),
            Route("/api/examples/{name}", example),
            Route("/predict", api_predict, methods=["POST"]),
            Route("/api/upload", upload, methods=["POST"]),
            Route("/api/predict", page_predict, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=PAGE_DIR), name="static")]
  app = Starlette(routes=routes, exception_handlers={BadInput: bad_input,
                                                     HTTPException: http_error})
  return _SecurityHeaders(app)


class _SecurityHeaders:
  """ASGI middleware: every response may load only this server's scripts, styles and images
  (the page uses no inline script and no other origin), and may not be framed."""

  HEADERS = [(b"content-security-policy",
              b"default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'"),
             (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        message = {**message, "headers": list(message.get("headers", [])) + self.HEADERS}
      await send(message)

    await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------- running it

@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
  """Serve `app` with uvicorn in a background thread (port 0: a free one); yields the base
  URL and stops the server on exit. For tests and benchmarks."""
  import uvicorn

  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    while not server.started:
      if not thread.is_alive():
        raise RuntimeError("the server stopped while starting")
      thread.join(0.02)
    yield f"http://{host}:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(10)
    sock.close()


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ctran_jax.serve",
                              description=__doc__.split("\n\n")[0],
                              epilog="README: 'Use a trained model', 'Interactive page'.")
  p.add_argument("--model", help="a model directory (from ctran_jax.export_model)")
  p.add_argument("--workdir", help="or a training workdir (with --checkpoint)")
  p.add_argument("--checkpoint", default="latest",
                 help="with --workdir: latest (default), best or a checkpoint step directory")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes "
                 "it to the network, without authentication)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max_upload_mb", type=float, default=10.0, help="largest image accepted")
  p.add_argument("--examples", metavar="DIR", help="example images offered on the page "
                 "(default: demo test images when the model was trained on the demo)")
  return p


def build(args) -> Service:
  if bool(args.model) == bool(args.workdir):
    raise ValueError("give --model=DIR (from export_model) or --workdir=W, not both")
  if args.model:
    predictor = predict.Predictor.from_directory(args.model, batch_size=1)
    name = os.path.basename(os.path.normpath(args.model))
  else:
    predictor = predict.Predictor.from_workdir(args.workdir, args.checkpoint, batch_size=1)
    name = f"{os.path.basename(os.path.normpath(args.workdir))} ({args.checkpoint})"
  source = predictor.info.get("source") or {}
  examples = (folder_examples(args.examples) if args.examples
              else demo_examples(source.get("dataset")))
  return Service(predictor, name=name, examples=examples, max_upload_mb=args.max_upload_mb)


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from ctran_jax import console

  console.quiet_tool()
  try:
    if not 0 <= args.port < 65536:
      raise ValueError(f"--port={args.port}; expected 0..65535")
    print("loading the model and compiling it for one image...", file=sys.stderr, flush=True)
    service = build(args)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import uvicorn

  if args.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"warning: serving on {args.host}: anyone who can reach this port can use the model; "
          "there is no authentication", file=sys.stderr)
  print(f"serving {service.name} ({len(service.predictor.labels)} labels) at "
        f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/ "
        "(Ctrl-C stops)", file=sys.stderr, flush=True)
  uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
  return 0


if __name__ == "__main__":
  sys.exit(main())
