// The page of `python -m ctran_jax.serve`: upload or pick an image, see every label's
// probability, give some labels as known (the model runs again), see attention maps.
// No dependencies; talks to /api/info, /api/upload, /api/predict, /api/examples/NAME.
"use strict";

const state = {
  info: null,
  image: null,      // {id, name, blob} of the current image
  view: null,       // HTMLImageElement: the image as the model sees it
  known: {},        // label -> 0 | 1
  record: null,     // the last prediction record (as `predict --json`)
  attention: null,  // {shape: [h, w], maps: [[...h*w], ...]} in label order
  hover: null,      // label under the mouse
  pinned: null,     // label whose map stays shown
  seq: 0,           // the newest request; older answers are dropped
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of [].concat(children)) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e.message}); is it still running?`);
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "busy" : "ready";
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function percent(x) { return `${(100 * x).toFixed(1)}%`; }

// ----------------------------------------------------------------------------- model info

function renderInfo(info) {
  const parts = [el("b", {}, info.name), ` · ${info.labels.length} labels`];
  if (info.dataset) parts.push(` · trained on ${info.dataset}`);
  if (info.step != null) parts.push(` · step ${info.step}`);
  const test = info.results && info.results.test;
  if (test) {
    const maps = Object.entries(test).map(([known, mAP]) =>
      `${percent(mAP)} (${known === "0" ? "no labels known" : known + "% known"})`);
    parts.push(` · test mAP ${maps.join(", ")}`);
  }
  parts.push(info.threshold === "calibrated" ? " · calibrated thresholds"
                                             : ` · threshold ${info.threshold}`);
  $("model-info").replaceChildren(...parts);

  const examples = $("examples");
  examples.replaceChildren();
  $("examples-title").hidden = info.examples.length === 0;
  for (const example of info.examples) {
    const title = example.labels ? `${example.name} (true labels: ${example.labels.join(", ")})`
                                 : example.name;
    const button = el("button", {type: "button", title, dataset: {example: example.name}},
                      el("img", {src: `/api/examples/${encodeURIComponent(example.name)}`,
                                 alt: example.name}));
    button.addEventListener("click", () => useExample(example.name));
    examples.append(button);
  }
}

// ----------------------------------------------------------------------------- images

async function useExample(name) {
  try {
    const response = await fetch(`/api/examples/${encodeURIComponent(name)}`);
    if (!response.ok) throw new ApiError(response.status, `example ${name}: ${response.status}`);
    await useImage(await response.blob(), name);
  } catch (e) {
    showError(e.message);
  }
}

async function useImage(blob, name) {
  const limit = state.info.max_upload_bytes;
  if (blob.size > limit) {
    showError(`${name}: the image is ${(blob.size / 2 ** 20).toFixed(1)} MB; this server ` +
              `accepts images up to ${state.info.max_upload_mb} MB (--max_upload_mb)`);
    return;
  }
  const seq = ++state.seq;
  setBusy(true);
  try {
    const uploaded = await upload(blob, name);
    const view = new Image();
    view.src = uploaded.view;
    await view.decode();
    if (seq !== state.seq) return;
    state.image = {id: uploaded.id, name, blob};
    state.view = view;
    state.known = {};
    state.pinned = null;
    for (const b of $("examples").children) b.classList.toggle("current", b.dataset.example === name);
    await refresh();
  } catch (e) {
    if (seq === state.seq) { showError(e.message); setBusy(false); }
  }
}

async function upload(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  return api("/api/upload", {method: "POST", body: form});
}

// ----------------------------------------------------------------------------- predictions

async function refresh() {
  const seq = ++state.seq;
  setBusy(true);
  const ask = () => api("/api/predict", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({id: state.image.id, name: state.image.name, known: state.known}),
  });
  try {
    let answer;
    try {
      answer = await ask();
    } catch (e) {
      if (e.status !== 404) throw e;
      // The server forgot the image (restarted, or many others since): send it again.
      state.image.id = (await upload(state.image.blob, state.image.name)).id;
      answer = await ask();
    }
    if (seq !== state.seq) return;
    state.record = answer.record;
    state.attention = answer.attention;
    showError("");
    renderLabels();
    draw();
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    setBusy(false);
  } catch (e) {
    if (seq === state.seq) { showError(e.message); setBusy(false); }
  }
}

function setKnown(label, value) {
  if (!state.image) return;
  if (value === "") delete state.known[label];
  else state.known[label] = Number(value);
  refresh();
}

// ----------------------------------------------------------------------------- the list

function renderLabels() {
  const entries = state.record.labels;
  const known = entries.filter((e) => e.known);
  const unknown = entries.filter((e) => !e.known).sort((a, b) => b.probability - a.probability);
  const list = $("labels");
  list.replaceChildren();
  if (known.length) list.append(el("li", {className: "group"}, "given"));
  for (const e of known) list.append(row(e));
  if (known.length) list.append(el("li", {className: "group"}, "predicted"));
  for (const e of unknown) list.append(row(e));

  const predicted = unknown.filter((e) => e.predicted).map((e) => e.label);
  const rule = state.record.threshold === "calibrated" ? "calibrated thresholds"
                                                       : `threshold ${state.record.threshold}`;
  const set = predicted.length ? predicted.map((n) => el("b", {}, n)) : [el("i", {}, "none")];
  const parts = [`Predicted at the ${rule}: `];
  set.forEach((node, i) => parts.push(...(i ? [", ", node] : [node])));
  $("summary").replaceChildren(el("span", {className: "set"}, parts));
}

function row(e) {
  const classes = ["label-row"];
  if (e.predicted && !e.known) classes.push("predicted");
  if (e.known) classes.push("known");
  if (state.pinned === e.label) classes.push("pinned");
  const fill = el("span", {className: "fill"});
  fill.style.width = `${100 * e.probability}%`;
  const bar = el("span", {className: "bar"}, fill);
  if (!e.known && e.threshold != null) {
    const tick = el("span", {className: "tick", title: `threshold ${e.threshold.toFixed(3)}`});
    tick.style.left = `calc(${100 * e.threshold}% - 1px)`;
    bar.append(tick);
  }
  const current = e.label in state.known ? String(state.known[e.label]) : "";
  const toggle = el("span", {className: "toggle", role: "group"});
  for (const [value, text, title] of [["", "?", "unknown: predict it"],
                                      ["1", "yes", "given as present"],
                                      ["0", "no", "given as absent"]]) {
    toggle.append(el("button", {type: "button", title, dataset: {value},
                                "aria-pressed": String(value === current)}, text));
  }
  return el("li", {className: classes.join(" "),
                   dataset: {label: e.label, probability: String(e.probability),
                             known: String(e.known), predicted: String(e.predicted)}},
            [el("span", {className: "name", title: e.label}, e.label), bar,
             el("span", {className: "prob"},
                e.known ? `given ${e.predicted ? "yes" : "no"}` : e.probability.toFixed(3)),
             toggle]);
}

// ----------------------------------------------------------------------------- the image

function jet(v) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function draw() {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.view) return;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(state.view, 0, 0, canvas.width, canvas.height);
  const label = state.hover || state.pinned;
  const index = label && state.record ? state.record.labels.findIndex((e) => e.label === label)
                                      : -1;
  if (index < 0 || !state.attention) {
    $("caption").textContent = `${state.image.name}, as the model sees it ` +
      `(${state.view.naturalWidth}×${state.view.naturalHeight}). Hover a label for its attention.`;
    return;
  }
  const [h, w] = state.attention.shape;
  const values = state.attention.maps[index];
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const pixels = small.getContext("2d").createImageData(w, h);
  values.forEach((v, i) => {
    const [r, g, b] = jet(v);
    pixels.data.set([r, g, b, 255], 4 * i);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);  // bilinear upsampling
  ctx.globalAlpha = 1;
  const e = state.record.labels[index];
  $("caption").textContent = `Attention of “${label}” (${e.known ? "given" : "p = " +
    e.probability.toFixed(3)}): its token's attention to the ${h}×${w} image tokens in the ` +
    "last encoder layer, averaged over heads; red = most.";
}

// ----------------------------------------------------------------------------- events

function labelOf(target) {
  const row = target.closest(".label-row");
  return row ? row.dataset.label : null;
}

function wire() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useImage(file, file.name);
    event.target.value = "";  // choosing the same file again fires again
  });
  const list = $("labels");
  list.addEventListener("click", (event) => {
    const label = labelOf(event.target);
    if (!label) return;
    const button = event.target.closest(".toggle button");
    if (button) {
      setKnown(label, button.dataset.value);
    } else if (event.target.closest(".name")) {
      state.pinned = state.pinned === label ? null : label;
      renderLabels();
      draw();
    }
  });
  list.addEventListener("mouseover", (event) => {
    const label = labelOf(event.target);
    if (label !== state.hover) { state.hover = label; draw(); }
  });
  list.addEventListener("mouseleave", () => { state.hover = null; draw(); });
}

async function start() {
  wire();
  try {
    state.info = await api("/api/info");
    renderInfo(state.info);
    setBusy(false);
  } catch (e) {
    showError(e.message);
    document.body.dataset.state = "error";
  }
}

start();
