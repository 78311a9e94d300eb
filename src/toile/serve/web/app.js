// toile's web page: one ES module, no build step, talking to the native API only
// (/v1/models, /v1/jobs, /v1/jobs/{id}/events, /v1/images/{id}).
//
// Why fetch() everywhere, even for the event stream and images: with an API token every call
// needs an Authorization header, which EventSource and <img src> cannot send. Events are read
// from a streamed fetch and parsed here; images are fetched as blobs.

const $ = (selector, root = document) => root.querySelector(selector);
const TOKEN_KEY = "toile.token";
const TERMINAL = new Set(["finished", "failed", "cancelled"]);
const FIELD_INPUTS = {
  num_images: "num_images",
  image: "image-file",
  mask: "mask-canvas",
  "outpaint.left": "outpaint-left",
  "outpaint.top": "outpaint-top",
  "outpaint.right": "outpaint-right",
  "outpaint.bottom": "outpaint-bottom",
  outpaint: "outpaint-left",
};

// ------------------------------------------------------------------ API with the token
class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.field = error?.field || null;
  }
}

let tokenPrompt = null;

/** Ask for the token once, however many requests are waiting for it. */
function askToken(message) {
  if (!tokenPrompt) {
    tokenPrompt = new Promise((resolve) => {
      const dialog = $("#token-dialog");
      $("#token-error").textContent = message || "";
      $("#token-form").addEventListener(
        "submit",
        () => {
          sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
          tokenPrompt = null;
          resolve();
        },
        { once: true },
      );
      dialog.showModal();
      $("#token").focus();
    });
  }
  return tokenPrompt;
}

async function api(path, options = {}) {
  const init = { ...options };
  const headers = new Headers(options.headers || {});
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(options.json);
    delete init.json;
  }
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(path, { ...init, headers });
    if (response.status === 401) {
      // Ask (again) and retry: the user can always correct a mistyped token.
      await askToken(token ? "That token was not accepted." : "");
      continue;
    }
    if (!response.ok) {
      let error = null;
      try {
        error = (await response.json()).error;
      } catch {
        /* not JSON */
      }
      throw new ApiError(response.status, error);
    }
    return response;
  }
}

const getJSON = async (path) => (await api(path)).json();

/** Server-Sent Events from a streamed fetch: yields {type, data}. */
async function* events(path, signal) {
  const response = await api(path, { headers: { Accept: "text/event-stream" }, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { type, data: JSON.parse(data.join("\n")) };
    }
  }
}

const imageUrls = new Map();

/** A result image as a blob: URL (fetched with the token), cached per image id. */
async function imageUrl(image) {
  if (!imageUrls.has(image.id)) {
    const blob = await (await api(image.url)).blob();
    imageUrls.set(image.id, URL.createObjectURL(blob));
  }
  return imageUrls.get(image.id);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ announcements
function announce(text) {
  $("#announcer").textContent = text;
}

function short(text, length = 60) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

// ------------------------------------------------------------------ models and status
async function loadModels() {
  const listing = await getJSON("/v1/models");
  const select = $("#model");
  const current = select.value;
  select.replaceChildren(
    ...listing.models.map((id) => {
      const option = new Option(id === listing.default ? `${id} (default)` : id, id);
      option.selected = current ? id === current : id === listing.default;
      return option;
    }),
  );
  const refiner = $("#refiner");
  const chosen = refiner.value;
  refiner.replaceChildren(new Option("None", ""), ...listing.models.map((id) => new Option(id, id)));
  refiner.value = listing.models.includes(chosen) ? chosen : "";
}

async function refreshStatus() {
  try {
    const health = await getJSON("/health");
    $("#server-status").textContent = health.ok
      ? `Ready · ${health.running} running · ${health.queue_length} queued`
      : "The worker is not running";
  } catch {
    $("#server-status").textContent = "Server unreachable";
  }
}

// ------------------------------------------------------------------ image, mask and canvas
const canvas = {
  base: $("#base-canvas"),
  mask: $("#mask-canvas"),
  cursor: $("#brush-cursor"),
  dataUrl: null, // the chosen file, as a data: URL (what the API receives)
  painted: false,
  drawing: false,
  last: null,
  keyboard: { x: 0, y: 0 },
};

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function updateMode() {
  const hasImage = canvas.dataUrl !== null;
  $("#image-tools").hidden = !hasImage;
  const current = hasImage ? mode() : "txt2img";
  $("#mask-tools").hidden = current !== "inpaint";
  $("#outpaint-tools").hidden = current !== "outpaint";
  canvas.mask.tabIndex = current === "inpaint" ? 0 : -1;
  canvas.mask.classList.toggle("painting", current === "inpaint");
  for (const id of ["width", "height"]) $(`#${id}`).disabled = hasImage;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseImage(file) {
  if (!file) return removeImage();
  const dataUrl = await readFile(file);
  const image = new Image();
  image.src = dataUrl;
  try {
    await image.decode();
  } catch {
    showError("That file is not an image this browser can read.", "image");
    return;
  }
  for (const c of [canvas.base, canvas.mask]) {
    c.width = image.naturalWidth;
    c.height = image.naturalHeight;
  }
  canvas.base.getContext("2d").drawImage(image, 0, 0);
  clearMask();
  canvas.dataUrl = dataUrl;
  canvas.keyboard = { x: image.naturalWidth / 2, y: image.naturalHeight / 2 };
  updateMode();
  announce(`Image loaded: ${image.naturalWidth} by ${image.naturalHeight} pixels.`);
}

function removeImage() {
  canvas.dataUrl = null;
  $("#image-file").value = "";
  clearMask();
  updateMode();
}

function clearMask() {
  canvas.mask.getContext("2d").clearRect(0, 0, canvas.mask.width, canvas.mask.height);
  canvas.painted = false;
}

/** Canvas pixels per CSS pixel: the canvas has the image's size, the screen shows it scaled. */
function scale() {
  const rect = canvas.mask.getBoundingClientRect();
  return rect.width ? canvas.mask.width / rect.width : 1;
}

function toCanvas(event) {
  const rect = canvas.mask.getBoundingClientRect();
  const s = scale();
  return { x: (event.clientX - rect.left) * s, y: (event.clientY - rect.top) * s };
}

function brushWidth() {
  return Number($("#brush").value) * scale();
}

function stroke(from, to) {
  const ctx = canvas.mask.getContext("2d");
  ctx.strokeStyle = "#ff2d6f";
  ctx.fillStyle = "#ff2d6f";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = brushWidth();
  ctx.beginPath();
  if (from.x === to.x && from.y === to.y) {
    ctx.arc(to.x, to.y, ctx.lineWidth / 2, 0, Math.PI * 2);
    ctx.fill();
  } else {
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }
  canvas.painted = true;
}

function showCursor(point) {
  const s = scale();
  const size = Number($("#brush").value);
  const style = canvas.cursor.style;
  style.width = style.height = `${size}px`;
  style.left = `${point.x / s - size / 2}px`;
  style.top = `${point.y / s - size / 2}px`;
  canvas.cursor.hidden = mode() !== "inpaint";
}

function setUpCanvas() {
  const mask = canvas.mask;
  mask.addEventListener("pointerdown", (event) => {
    if (mode() !== "inpaint") return;
    event.preventDefault();
    mask.setPointerCapture(event.pointerId);
    canvas.drawing = true;
    canvas.last = toCanvas(event);
    stroke(canvas.last, canvas.last);
  });
  mask.addEventListener("pointermove", (event) => {
    const point = toCanvas(event);
    showCursor(point);
    if (!canvas.drawing) return;
    stroke(canvas.last, point);
    canvas.last = point;
  });
  const stop = () => {
    canvas.drawing = false;
  };
  mask.addEventListener("pointerup", stop);
  mask.addEventListener("pointercancel", stop);
  mask.addEventListener("pointerleave", () => {
    canvas.cursor.hidden = true;
  });
  // Keyboard painting: arrows move the brush (Shift: faster), Space or Enter paints.
  mask.addEventListener("keydown", (event) => {
    if (mode() !== "inpaint") return;
    const step = (event.shiftKey ? 32 : 8) * scale();
    const k = canvas.keyboard;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[event.key]) {
      const [dx, dy] = moves[event.key];
      const next = {
        x: Math.min(Math.max(k.x + dx, 0), mask.width),
        y: Math.min(Math.max(k.y + dy, 0), mask.height),
      };
      if (event.ctrlKey || event.altKey) stroke(k, next); // paint while moving
      canvas.keyboard = next;
      showCursor(next);
      event.preventDefault();
    } else if (event.key === " " || event.key === "Enter") {
      stroke(k, k);
      announce("Painted at the brush position.");
      event.preventDefault();
    }
  });
  mask.addEventListener("focus", () => showCursor(canvas.keyboard));
  mask.addEventListener("blur", () => {
    canvas.cursor.hidden = true;
  });
}

/** The painted strokes as toile's mask: white = repaint, black = keep, the image's size. */
function maskDataUrl() {
  const { width, height } = canvas.mask;
  const painted = canvas.mask.getContext("2d").getImageData(0, 0, width, height);
  const out = new ImageData(width, height);
  for (let i = 0; i < painted.data.length; i += 4) {
    const value = painted.data[i + 3] > 0 ? 255 : 0;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = value;
    out.data[i + 3] = 255;
  }
  const export_ = document.createElement("canvas");
  export_.width = width;
  export_.height = height;
  export_.getContext("2d").putImageData(out, 0, 0);
  return export_.toDataURL("image/png");
}

// ------------------------------------------------------------------ the form
function numberValue(id) {
  const text = $(`#${id}`).value.trim();
  return text === "" ? undefined : Number(text);
}

function buildBody() {
  const body = {
    prompt: $("#prompt").value,
    negative_prompt: $("#negative_prompt").value,
    num_images: numberValue("num_images") ?? 1,
  };
  const model = $("#model").value;
  if (model) body.model = model;
  for (const id of ["steps", "guidance", "seed"]) {
    const value = numberValue(id);
    if (value !== undefined) body[id] = value;
  }
  if (canvas.dataUrl === null) {
    for (const id of ["width", "height"]) {
      const value = numberValue(id);
      if (value !== undefined) body[id] = value;
    }
    const refiner = $("#refiner").value;
    if (refiner) {
      body.refiner = refiner;
      const at = numberValue("refiner_switch");
      if (at !== undefined) body.refiner_switch = at;
    }
    return body;
  }
  body.image = canvas.dataUrl;
  const strength = numberValue("strength");
  if (strength !== undefined) body.strength = strength;
  if (mode() === "inpaint") {
    if (!canvas.painted) throw new ApiError(0, { field: "mask", message: "mask: paint the area to repaint first" });
    body.mask = maskDataUrl();
  } else if (mode() === "outpaint") {
    body.outpaint = {};
    for (const side of ["left", "top", "right", "bottom"]) body.outpaint[side] = numberValue(`outpaint-${side}`) ?? 0;
  }
  return body;
}

function clearErrors() {
  $("#form-error").textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function showError(message, field) {
  $("#form-error").textContent = message;
  const id = FIELD_INPUTS[field] || field;
  const input = id ? document.getElementById(id) : null;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (!$("#prompt").value.trim()) {
    showError("Write a prompt first.", "prompt");
    return;
  }
  const button = $("#generate");
  button.disabled = true;
  try {
    const body = buildBody();
    const accepted = await (await api("/v1/jobs", { method: "POST", json: body })).json();
    trackJob(accepted.id, body);
  } catch (error) {
    showError(error.message, error.field);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ jobs and progress
const jobTemplate = () => {
  const item = document.createElement("li");
  item.className = "job";
  item.innerHTML = `
    <div class="job-head">
      <span class="job-title"></span>
      <span class="job-status">Queued</span>
    </div>
    <div class="job-body">
      <img class="preview" alt="" hidden>
      <div class="job-meter">
        <progress max="1" value="0"></progress>
        <button type="button" class="cancel secondary">Cancel</button>
      </div>
    </div>`;
  return item;
};

function trackJob(id, body) {
  const item = jobTemplate();
  item.dataset.job = id;
  const title = short(body.prompt || "(no prompt)");
  $(".job-title", item).textContent = title;
  $("progress", item).setAttribute("aria-label", `Progress of “${title}”`);
  $(".preview", item).alt = `Preview of “${title}”`;
  $(".cancel", item).setAttribute("aria-label", `Cancel “${title}”`);
  $(".cancel", item).addEventListener("click", async () => {
    $(".job-status", item).textContent = "Cancelling…";
    try {
      await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
    } catch (error) {
      announce(`Could not cancel: ${error.message}`);
    }
  });
  const list = $("#jobs");
  list.prepend(item);
  while (list.children.length > 12) list.lastElementChild.remove();
  announce(`Job submitted: “${title}”.`);
  follow(id, item, title);
}

async function follow(id, item, title) {
  const status = $(".job-status", item);
  const meter = $("progress", item);
  const preview = $(".preview", item);
  let lastQuarter = -1;
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      for await (const { type, data } of events(`/v1/jobs/${id}/events`)) {
        if (type === "queued") {
          status.textContent = `Queued · position ${data.position ?? "?"}`;
        } else if (type === "started") {
          status.textContent = "Running";
          announce(`“${title}” started.`);
        } else if (type === "progress") {
          meter.max = data.total;
          meter.value = data.step;
          status.textContent = `Step ${data.step} of ${data.total}`;
          const quarter = Math.floor((4 * data.step) / data.total);
          if (quarter !== lastQuarter) {
            lastQuarter = quarter;
            announce(`“${title}”: step ${data.step} of ${data.total}.`);
          }
          if (data.preview_png) {
            preview.src = `data:image/png;base64,${data.preview_png}`;
            preview.hidden = false;
          }
        } else if (TERMINAL.has(type)) {
          return finish(item, title, type, data);
        }
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        status.textContent = "Gone";
        return;
      }
    }
    await sleep(1000); // the stream broke: reconnect; the server sends the current state first
  }
  status.textContent = "Lost track of this job; reload the page";
}

async function finish(item, title, type, job) {
  const status = $(".job-status", item);
  item.classList.add(`is-${job.status}`);
  $(".cancel", item).remove();
  const meter = $("progress", item);
  if (type === "finished") {
    meter.value = meter.max;
    const count = job.images.length;
    status.textContent = `Done · ${count} image${count === 1 ? "" : "s"}`;
    announce(`“${title}” finished: ${count} image${count === 1 ? "" : "s"}.`);
    await addToGallery(job);
  } else if (type === "cancelled") {
    status.textContent = "Cancelled";
    announce(`“${title}” was cancelled.`);
  } else {
    status.textContent = `Failed: ${job.error?.message || "unknown error"}`;
    announce(`“${title}” failed: ${job.error?.message || "unknown error"}.`);
  }
  refreshStatus();
}

// ------------------------------------------------------------------ gallery
function recordSummary(record) {
  const rows = [
    ["Model", record.model_id],
    ["Mode", record.mode],
    ["Size", `${record.width}×${record.height}`],
    ["Steps", record.steps],
    ["Guidance", record.guidance],
    ["Seed", record.seed],
  ];
  if (record.strength != null && record.mode !== "txt2img") rows.push(["Strength", record.strength]);
  const list = document.createElement("dl");
  for (const [key, value] of rows) {
    const term = document.createElement("dt");
    term.textContent = key;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    list.append(term, detail);
  }
  return list;
}

async function galleryCard(image, job) {
  const record = image.record;
  const card = document.createElement("li");
  card.className = "card";
  card.dataset.image = image.id;
  card.dataset.job = job.id;
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = `${record.prompt || "image"} (seed ${record.seed})`;
  img.width = record.width;
  img.height = record.height;
  img.decoding = "async";
  img.classList.toggle("small", record.width < 256);
  img.src = await imageUrl(image);
  const caption = document.createElement("figcaption");
  const prompt = document.createElement("p");
  prompt.className = "card-prompt";
  prompt.textContent = record.prompt || "(no prompt)";
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Record";
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(record, null, 2);
  details.append(summary, pre);
  const actions = document.createElement("div");
  actions.className = "actions";
  const use = document.createElement("button");
  use.type = "button";
  use.className = "secondary use-settings";
  use.textContent = "Use these settings";
  use.setAttribute("aria-label", `Use the settings of “${short(record.prompt || "image")}”, seed ${record.seed}`);
  use.addEventListener("click", () => useSettings(record));
  const download = document.createElement("a");
  download.href = img.src;
  download.download = `toile-${record.seed}.png`;
  download.textContent = "Download";
  actions.append(use, download);
  caption.append(prompt, recordSummary(record), details, actions);
  figure.append(img, caption);
  card.append(figure);
  return card;
}

async function addToGallery(job, { append = false } = {}) {
  const gallery = $("#gallery");
  for (const image of job.images) {
    if (gallery.querySelector(`[data-image="${image.id}"]`)) continue;
    try {
      const card = await galleryCard(image, job);
      if (append) gallery.append(card);
      else gallery.prepend(card);
    } catch (error) {
      announce(`Could not load an image: ${error.message}`);
    }
  }
  $("#gallery-empty").hidden = gallery.children.length > 0;
}

function useSettings(record) {
  $("#prompt").value = record.prompt || "";
  $("#negative_prompt").value = record.negative_prompt || "";
  const select = $("#model");
  if ([...select.options].some((option) => option.value === record.model_id)) select.value = record.model_id;
  const refiner = $("#refiner");
  refiner.value = [...refiner.options].some((option) => option.value === record.refiner_id) ? record.refiner_id : "";
  const values = {
    width: record.width, height: record.height, steps: record.steps, guidance: record.guidance, seed: record.seed,
    refiner_switch: record.refiner_switch,
  };
  for (const [id, value] of Object.entries(values)) $(`#${id}`).value = value ?? "";
  $("#prompt").focus();
  announce(`Settings loaded from the image with seed ${record.seed}.`);
}

async function loadGallery() {
  const listing = await getJSON("/v1/jobs?status=succeeded&limit=24");
  for (const job of listing.jobs.reverse()) await addToGallery(job, { append: true });
}

// ------------------------------------------------------------------ start
function bind() {
  $("#generate-form").addEventListener("submit", submit);
  $("#image-file").addEventListener("change", (event) => chooseImage(event.target.files[0]));
  $("#remove-image").addEventListener("click", removeImage);
  $("#clear-mask").addEventListener("click", () => {
    clearMask();
    announce("Mask cleared.");
  });
  $("#brush").addEventListener("input", (event) => {
    $("#brush-value").textContent = `${event.target.value} px`;
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", updateMode);
  // Submit from the prompt with Ctrl/Cmd+Enter, as chat-style tools do.
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#generate-form").requestSubmit();
  });
  $("#token-dialog").addEventListener("cancel", (event) => event.preventDefault());
  setUpCanvas();
  updateMode();
}

async function start() {
  bind();
  try {
    await loadModels();
    await refreshStatus();
    await loadGallery();
    document.body.dataset.ready = "true";
    setInterval(refreshStatus, 15000);
  } catch (error) {
    $("#server-status").textContent = `Could not reach the server: ${error.message}`;
  }
}

start();
