// toile's web page: one ES module, no build step, talking to the native API only
// (/v1/models, /v1/events, /v1/jobs, /v1/jobs/{id}/events, /v1/images/{id}).
//
// Why fetch() everywhere, even for the event stream and images: with an API token every call
// needs an Authorization header, which EventSource and <img src> cannot send. Events are read
// from a streamed fetch and parsed here; images are fetched as blobs.

const $ = (selector, root = document) => root.querySelector(selector);
const TOKEN_KEY = "toile.token";
const TERMINAL = new Set(["finished", "failed", "cancelled"]);
const ENDED = new Set(["succeeded", "failed", "cancelled"]);
// The newest jobs the page shows, in the Jobs list and (their images) in the gallery.
const MAX_JOBS = 20;
// Job event streams open at once: a browser allows six connections per server, and the
// server's own stream, image downloads and new submissions need some of them.
const MAX_JOB_STREAMS = 3;
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

// ------------------------------------------------------------------ models, LoRAs and status
const models = { cards: new Map() };

async function loadModels() {
  const listing = await getJSON("/v1/models");
  models.cards = new Map(listing.data.map((card) => [card.id, card]));
  const select = $("#model");
  const current = select.value;
  select.replaceChildren(
    ...listing.models.map((id) => {
      const option = new Option(id === listing.default ? `${id} (default)` : id, id);
      option.selected = current ? id === current : id === listing.default;
      return option;
    }),
  );
  updateRefiners();
  updateSamplers();
  showLoras(listing.loras);
}

/** Offer as refiners only the models the server says can refine the chosen one: refiner
 * checkpoints (or bases) of its own family, not the model itself. */
function updateRefiners() {
  const base = models.cards.get($("#model").value);
  const candidates = [...models.cards.values()].filter(
    (card) => base?.family && card.refiner && card.family === base.family && card.id !== base.id,
  );
  const refiner = $("#refiner");
  const chosen = refiner.value;
  refiner.replaceChildren(new Option("None", ""), ...candidates.map((card) => new Option(card.id, card.id)));
  refiner.value = candidates.some((card) => card.id === chosen) ? chosen : "";
  refiner.disabled = candidates.length === 0;
  $("#refiner_switch").disabled = candidates.length === 0;
}

// A1111's labels of the schedule types the API names (GET /v1/models lists them per sampler).
const SCHEDULE_LABELS = {
  automatic: "Automatic",
  karras: "Karras",
  exponential: "Exponential",
  beta: "Beta",
  sgm_uniform: "SGM Uniform",
};
const scheduleLabel = (value) => SCHEDULE_LABELS[value] || value;

/** The chosen model's samplers ({name, schedules, default}), from its card; [] when the
 * server could not read them (then only "Default" is offered). */
function modelSamplers() {
  return models.cards.get($("#model").value)?.samplers || [];
}

/** The Sampler list follows the chosen model: "Default (its own)" first (sends nothing), then
 * every sampler it can use. A chosen sampler the new model also has stays chosen. */
function updateSamplers() {
  const options = modelSamplers();
  const own = options.find((option) => option.default);
  const select = $("#sampler");
  const chosen = select.value;
  select.replaceChildren(
    new Option(own ? `Default (${own.name})` : "Default", ""),
    ...options.map((option) => new Option(option.name, option.name)),
  );
  select.value = options.some((option) => option.name === chosen) ? chosen : "";
  select.disabled = options.length === 0;
  updateSchedules();
}

/** The Schedule list: automatic, then the schedules the chosen sampler (Default: the model's
 * own) supports on this model. One that no longer applies goes back to automatic. */
function updateSchedules() {
  const options = modelSamplers();
  const name = $("#sampler").value;
  const sampler = options.find((option) => (name ? option.name === name : option.default));
  const values = ["automatic", ...(sampler?.schedules || []).filter((value) => value !== "automatic")];
  const select = $("#schedule");
  const chosen = select.value;
  select.replaceChildren(...values.map((value) => new Option(scheduleLabel(value), value)));
  select.value = values.includes(chosen) ? chosen : "automatic";
  select.disabled = values.length === 1;
}

/** One row per LoRA id of the server: a checkbox to use it, and its scale. */
function showLoras(ids) {
  $("#loras").replaceChildren(
    ...ids.map((id, index) => {
      const item = document.createElement("li");
      item.className = "lora";
      item.dataset.lora = id;
      const use = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "lora-use";
      use.append(box, ` ${id}`);
      const scale = document.createElement("input");
      Object.assign(scale, {
        type: "number", className: "lora-scale", id: `lora-scale-${index}`,
        min: "-10", max: "10", step: "0.05", value: "1.0",
      });
      scale.setAttribute("aria-label", `Scale of ${id}`);
      const scaleLabel = document.createElement("label");
      scaleLabel.htmlFor = scale.id;
      scaleLabel.textContent = "Scale";
      scale.disabled = true;
      box.addEventListener("change", () => {
        scale.disabled = !box.checked;
      });
      item.append(use, scaleLabel, scale);
      return item;
    }),
  );
  $("#loras-empty").hidden = ids.length > 0;
}

function loraRows() {
  return [...document.querySelectorAll("#loras .lora")].map((item) => ({
    id: item.dataset.lora,
    use: $(".lora-use", item),
    scale: $(".lora-scale", item),
  }));
}

function showStatus(health) {
  $("#server-status").textContent = health.ok
    ? `Ready · ${health.running} running · ${health.queue_length} queued`
    : "The worker is not running";
}

async function refreshStatus() {
  try {
    showStatus(await getJSON("/health"));
  } catch {
    $("#server-status").textContent = "Server unreachable";
  }
}

/** The header follows the server's event stream: a status at once, then one whenever a job is
 * queued, starts or ends. Only while the stream is down is /health read instead, once per
 * attempt to reconnect (1 s, doubling up to 15 s). */
async function watchServer() {
  let wait = 1000;
  for (;;) {
    try {
      for await (const { type, data } of events("/v1/events")) {
        if (type !== "status") continue;
        showStatus(data);
        wait = 1000;
      }
    } catch {
      /* the stream broke or could not open: fall back and reconnect below */
    }
    await refreshStatus();
    await sleep(wait);
    wait = Math.min(wait * 2, 15000);
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
  // The model's own sampler and its own spacing are the API's defaults: sent as nothing.
  const sampler = $("#sampler").value;
  if (sampler) body.sampler = sampler;
  const schedule = $("#schedule").value;
  if (schedule && schedule !== "automatic") body.schedule = schedule;
  const loras = loraRows().filter((row) => row.use.checked);
  if (loras.length) {
    body.loras = loras.map((row) => {
      const text = row.scale.value.trim();
      return { id: row.id, scale: text === "" ? 1.0 : Number(text) };
    });
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
  const input = fieldInput(field);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  $("#form-error").scrollIntoView({ block: "nearest" });
}

/** The input a field error names: "loras[1].scale" is the second chosen LoRA's scale. */
function fieldInput(field) {
  const lora = /^loras\[(\d+)\]\.(id|scale)$/.exec(field || "");
  if (lora) {
    const row = loraRows().filter((r) => r.use.checked)[Number(lora[1])];
    return row ? (lora[2] === "id" ? row.use : row.scale) : null;
  }
  const id = FIELD_INPUTS[field] || field;
  return id ? document.getElementById(id) : null;
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
    const job = { id: accepted.id, status: accepted.status, request: body, images: [] };
    addJob(job);
    announce(`Job submitted: “${jobTitle(job)}”.`);
    job.item.scrollIntoView({ block: "nearest" }); // its progress, wherever the page was
  } catch (error) {
    showError(error.message, error.field);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ jobs: one list for both panels
// The page's jobs, newest first: {id, status, request, images, error, queue_position, progress,
// item, done}. The Jobs list and the gallery are both drawn from it, so they always agree; on
// load it is filled from GET /v1/jobs, so they agree after a reload too.
const jobs = [];

function jobTitle(job) {
  return short(job.request?.prompt || "(no prompt)");
}

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

function jobElement(job) {
  const item = jobTemplate();
  item.dataset.job = job.id;
  const title = jobTitle(job);
  $(".job-title", item).textContent = title;
  $(".job-title", item).title = job.request?.prompt || "";
  $("progress", item).setAttribute("aria-label", `Progress of “${title}”`);
  $(".preview", item).alt = `Preview of “${title}”`;
  $(".cancel", item).setAttribute("aria-label", `Cancel “${title}”`);
  $(".cancel", item).addEventListener("click", async () => {
    $(".job-status", item).textContent = "Cancelling…";
    try {
      const after = await (await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" })).json();
      if (ENDED.has(after.status)) jobEnded(job, after); // a queued job ends at once
    } catch (error) {
      announce(`Could not cancel: ${error.message}`);
    }
  });
  return item;
}

/** Add a job to both panels: a new submission on top, or (``older``) a listed one below. */
function addJob(job, { older = false } = {}) {
  if (jobs.some((known) => known.id === job.id)) return;
  job.item = jobElement(job);
  const list = $("#jobs");
  if (older) {
    jobs.push(job);
    list.append(job.item);
  } else {
    jobs.unshift(job);
    list.prepend(job.item);
  }
  for (const dropped of jobs.splice(MAX_JOBS)) dropped.item.remove();
  $("#jobs-empty").hidden = true;
  if (ENDED.has(job.status)) {
    job.done = true;
    showEnded(job);
  } else {
    follow(job);
  }
  renderGallery();
}

async function loadJobs() {
  const listing = await getJSON(`/v1/jobs?limit=${MAX_JOBS}`);
  for (const job of listing.jobs.reverse()) addJob(job, { older: true }); // newest first
  await renderGallery();
}

const streams = { free: MAX_JOB_STREAMS, waiting: [] };

async function streamSlot() {
  if (streams.free > 0) {
    streams.free--;
    return;
  }
  await new Promise((resolve) => streams.waiting.push(resolve));
}

function releaseStreamSlot() {
  const next = streams.waiting.shift();
  if (next) next();
  else streams.free++;
}

function showQueued(job, position) {
  $(".job-status", job.item).textContent = position == null ? "Queued" : `Queued · position ${position}`;
}

function showProgress(job, progress) {
  const meter = $("progress", job.item);
  meter.max = progress.total;
  meter.value = progress.step;
  $(".job-status", job.item).textContent = `Step ${progress.step} of ${progress.total}`;
}

async function follow(job) {
  const status = $(".job-status", job.item);
  const preview = $(".preview", job.item);
  const title = jobTitle(job);
  if (job.status === "queued") showQueued(job, job.queue_position);
  else if (job.progress) showProgress(job, job.progress);
  else if (job.status === "running") status.textContent = "Running";
  let lastQuarter = -1;
  await streamSlot();
  try {
    for (let attempt = 0; attempt < 30; attempt++) {
      if (job.done) return; // ended meanwhile (cancelled while queued)
      try {
        for await (const { type, data } of events(`/v1/jobs/${job.id}/events`)) {
          if (type === "queued") {
            showQueued(job, data.position);
          } else if (type === "started") {
            status.textContent = "Running";
            announce(`“${title}” started.`);
          } else if (type === "progress") {
            showProgress(job, data);
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
            jobEnded(job, data);
            return;
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
  } finally {
    releaseStreamSlot();
  }
}

/** A followed job ended (``data`` is the job as the API shows it): say so, once. */
function jobEnded(job, data) {
  if (job.done) return;
  job.done = true;
  Object.assign(job, { status: data.status, images: data.images || [], error: data.error });
  showEnded(job);
  const title = jobTitle(job);
  if (job.status === "succeeded") {
    const count = job.images.length;
    announce(`“${title}” finished: ${count} image${count === 1 ? "" : "s"}.`);
  } else if (job.status === "cancelled") {
    announce(`“${title}” was cancelled.`);
  } else {
    announce(`“${title}” failed: ${job.error?.message || "unknown error"}.`);
  }
  renderGallery();
}

function showEnded(job) {
  const item = job.item;
  const status = $(".job-status", item);
  item.classList.add(`is-${job.status}`);
  $(".cancel", item)?.remove();
  const meter = $("progress", item);
  if (job.status === "succeeded") {
    meter.value = meter.max;
    const count = job.images.length;
    status.textContent = `Done · ${count} image${count === 1 ? "" : "s"}`;
  } else if (job.status === "cancelled") {
    status.textContent = "Cancelled";
  } else {
    status.textContent = `Failed: ${job.error?.message || "unknown error"}`;
  }
}

// ------------------------------------------------------------------ gallery
function recordSummary(record, request) {
  const rows = [
    ["Model", record.model_id],
    ["Mode", record.mode],
    ["Size", `${record.width}×${record.height}`],
    ["Steps", record.steps],
    ["Guidance", record.guidance],
    ["Seed", record.seed],
  ];
  if (record.sampler) rows.push(["Sampler", record.sampler]);
  if (record.schedule && record.schedule !== "automatic") rows.push(["Schedule", scheduleLabel(record.schedule)]);
  if (record.strength != null && record.mode !== "txt2img") rows.push(["Strength", record.strength]);
  if (record.refiner_id) rows.push(["Refiner", `${record.refiner_id} from ${record.refiner_switch}`]);
  const loras = request?.loras || [];
  if (loras.length) rows.push(["LoRAs", loras.map((lora) => `${lora.id} × ${lora.scale}`).join(", ")]);
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
  use.addEventListener("click", () => useSettings(record, job.request));
  const download = document.createElement("a");
  download.href = img.src;
  download.download = `toile-${record.seed}.png`;
  download.textContent = "Download";
  actions.append(use, download);
  caption.append(prompt, recordSummary(record, job.request), details, actions);
  figure.append(img, caption);
  card.append(figure);
  return card;
}

const cards = new Map(); // image id -> Promise of its card
let galleryQueue = Promise.resolve();

/** Redraw the gallery from the jobs list: newest job first, each job's images in batch order
 * (the API lists them by index). Draws run one after another; cards are made once. */
function renderGallery() {
  galleryQueue = galleryQueue.then(drawGallery, drawGallery);
  return galleryQueue;
}

async function drawGallery() {
  const wanted = jobs
    .filter((job) => job.status === "succeeded")
    .flatMap((job) => job.images.map((image) => ({ job, image })));
  const drawn = [];
  for (const { job, image } of wanted) {
    if (!cards.has(image.id)) cards.set(image.id, galleryCard(image, job));
    try {
      drawn.push(await cards.get(image.id));
    } catch (error) {
      cards.delete(image.id); // try again at the next draw
      announce(`Could not load an image: ${error.message}`);
    }
  }
  const gallery = $("#gallery");
  drawn.forEach((card, index) => {
    if (gallery.children[index] !== card) gallery.insertBefore(card, gallery.children[index] ?? null);
  });
  while (gallery.children.length > drawn.length) gallery.lastElementChild.remove();
  const kept = new Set(wanted.map(({ image }) => image.id));
  for (const id of [...cards.keys()]) {
    if (kept.has(id)) continue;
    cards.delete(id);
    if (imageUrls.has(id)) URL.revokeObjectURL(imageUrls.get(id));
    imageUrls.delete(id);
  }
  $("#gallery-empty").hidden = drawn.length > 0;
}

function useSettings(record, request) {
  $("#prompt").value = record.prompt || "";
  $("#negative_prompt").value = record.negative_prompt || "";
  const select = $("#model");
  if ([...select.options].some((option) => option.value === record.model_id)) select.value = record.model_id;
  updateRefiners();
  const refiner = $("#refiner");
  refiner.value = [...refiner.options].some((option) => option.value === record.refiner_id) ? record.refiner_id : "";
  const values = {
    width: record.width, height: record.height, steps: record.steps, guidance: record.guidance, seed: record.seed,
    refiner_switch: record.refiner_switch,
  };
  for (const [id, value] of Object.entries(values)) $(`#${id}`).value = value ?? "";
  restoreSampler(record, request);
  // The record names LoRA files; the job's request names the ids this server knows them by.
  const used = new Map((request?.loras || []).map((lora) => [lora.id, lora.scale]));
  for (const row of loraRows()) {
    row.use.checked = used.has(row.id);
    row.scale.value = used.has(row.id) ? String(used.get(row.id)) : "1.0";
    row.scale.disabled = !row.use.checked;
  }
  $("#prompt").focus();
  announce(`Settings loaded from the image with seed ${record.seed}.`);
}

/** Sampler and schedule as the job asked for them: no sampler in its request is "Default"; a
 * named one is restored by the name the record resolved it to (an alias such as "k_euler", or
 * an old "DPM++ 2M Karras", is the list's "Euler" / "DPM++ 2M" with karras). */
function restoreSampler(record, request) {
  updateSamplers();
  const named = (request?.sampler || "").trim();
  const isDefault = ["", "default", "automatic"].includes(named.toLowerCase());
  const sampler = $("#sampler");
  const wanted = isDefault ? "" : [named, record.sampler].find((name) => hasOption(sampler, name));
  sampler.value = wanted ?? "";
  updateSchedules();
  const schedule = $("#schedule");
  // A client may have sent the label ("SGM Uniform"): the list's values are the API's names.
  const asked = (request?.schedule || "").trim().toLowerCase().replace(/ /g, "_")
    || (isDefault ? "automatic" : record.schedule);
  schedule.value = [asked, record.schedule].find((value) => hasOption(schedule, value)) ?? "automatic";
}

const hasOption = (select, value) => [...select.options].some((option) => option.value === value);

// ------------------------------------------------------------------ start
function bind() {
  $("#generate-form").addEventListener("submit", submit);
  $("#model").addEventListener("change", () => {
    updateRefiners();
    updateSamplers();
  });
  $("#sampler").addEventListener("change", updateSchedules);
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
    watchServer();
    await loadJobs();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("#server-status").textContent = `Could not reach the server: ${error.message}`;
  }
}

start();
