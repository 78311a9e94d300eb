// toile's web page: one ES module, no build step, talking to the native API only
// (/v1/models, /v1/events, /v1/jobs, /v1/jobs/{id}/events, /v1/images/{id}).
// Tabs: Generate, Edit, Caption & Ask, Upscale. Every tab sends a job (`task` names it) and
// follows it in the same Jobs list; images go to the gallery, captions and answers are text.
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
// Each form of the page: its error line, and the input that an API field (a 422's `field`)
// names there. Generate's other fields are inputs of the same id ("seed" is #seed); the task
// forms list all of theirs, so an edit's "seed" never marks Generate's.
const FORMS = {
  generate: {
    error: "form-error",
    fields: {
      image: "image-file",
      mask: "mask-canvas",
      "outpaint.left": "outpaint-left",
      "outpaint.top": "outpaint-top",
      "outpaint.right": "outpaint-right",
      "outpaint.bottom": "outpaint-bottom",
      outpaint: "outpaint-left",
    },
  },
  edit: {
    error: "edit-error",
    fields: {
      image: "edit-image", prompt: "edit-prompt", model: "edit-model", steps: "edit-steps",
      guidance: "edit-guidance", image_guidance: "edit-image-guidance", seed: "edit-seed",
    },
  },
  // Caption and Ask share the tab's image and its error line.
  caption: { error: "read-error", fields: { image: "read-image", model: "caption-model", detail: "detail-short" } },
  answer: { error: "read-error", fields: { image: "read-image", model: "answer-model", question: "question" } },
  upscale: {
    error: "upscale-error",
    fields: {
      image: "upscale-image", model: "upscaler", scale: "upscale-scale", prompt: "upscale-prompt",
      noise_level: "noise-level",
    },
  },
};
// The model picker of each task, and its submit button (disabled while no model serves it).
const PICKERS = {
  edit: { select: "edit-model", button: "edit-submit" },
  caption: { select: "caption-model", button: "caption-submit" },
  answer: { select: "answer-model", button: "ask-submit" },
  upscale: { select: "upscaler", button: "upscale-submit" },
};
// The family of the built-in resampling filters (lanczos, bicubic, nearest): no prompt, no noise.
const FILTER_FAMILY = "resize";

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

/** Whether a model serves a task, from its card's `tasks`. A card without them (its family
 * could not be read) is offered for Generate only, as before tasks: the server decides. */
function serves(id, task) {
  const tasks = models.cards.get(id)?.tasks || [];
  return tasks.includes(task) || (task === "generate" && tasks.length === 0);
}

/** Fill a model picker with ``ids``: the current choice stays if it is still there, else
 * ``preferred``, else the first. ``marked`` is labelled as the server's default. */
function fillPicker(select, ids, preferred, marked = null) {
  const current = select.value;
  const chosen = [current, preferred, ids[0]].find((id) => id && ids.includes(id));
  select.replaceChildren(...ids.map((id) => new Option(id === marked ? `${id} (default)` : id, id)));
  if (chosen) select.value = chosen;
}

async function loadModels() {
  const listing = await getJSON("/v1/models");
  models.cards = new Map(listing.data.map((card) => [card.id, card]));
  const generators = listing.models.filter((id) => serves(id, "generate"));
  fillPicker($("#model"), generators, listing.default, listing.default);
  // Each task's picker starts on the model the server runs that task on by default
  // (task_defaults), labelled so; with none, on its first model.
  const taskDefaults = listing.task_defaults || {};
  for (const [task, picker] of Object.entries(PICKERS)) {
    const ids = listing.models.filter((id) => serves(id, task));
    const own = taskDefaults[task] ?? null;
    fillPicker($(`#${picker.select}`), ids, own, own);
  }
  const upscalers = listing.models.filter((id) => serves(id, "upscale"));
  fillPicker($("#hires_upscaler"), upscalers, "lanczos");
  updateAvailability();
  updateRefiners();
  updateSamplers();
  updateUpscaler();
  showLoras(listing.loras);
}

/** A task no model serves: its picker and button are disabled and a hint says why. */
function updateAvailability() {
  for (const picker of Object.values(PICKERS)) {
    const select = $(`#${picker.select}`);
    const none = select.options.length === 0;
    select.disabled = none;
    $(`#${picker.button}`).disabled = none;
    $(`.no-models[data-for="${picker.select}"]`).hidden = !none;
  }
}

/** Resampling filters take no prompt and add no noise: those inputs are off for them. */
function updateUpscaler() {
  const filter = models.cards.get($("#upscaler").value)?.family === FILTER_FAMILY;
  $("#upscale-prompt").disabled = filter;
  $("#noise-level").disabled = filter;
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
    const hires = numberValue("hires_scale");
    if (hires !== undefined) {  // hires fix: only with text to image, as in A1111
      body.hires_scale = hires;
      body.hires_upscaler = $("#hires_upscaler").value || undefined;
      for (const id of ["hires_steps", "hires_strength"]) {
        const value = numberValue(id);
        if (value !== undefined) body[id] = value;
      }
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

/** A mistake the page finds before sending, shown like the server's 422 for that field. */
const fieldError = (field, message) => new ApiError(0, { field, message });

function clearErrors(form = "generate") {
  $(`#${FORMS[form].error}`).textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

/** One line under the form that sent it; the input it names is marked and focused. */
function showError(message, field, form = "generate") {
  const line = $(`#${FORMS[form].error}`);
  line.textContent = message;
  const input = fieldInput(field, form);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  line.scrollIntoView({ block: "nearest" });
}

/** The input a field error names: "loras[1].scale" is the second chosen LoRA's scale. */
function fieldInput(field, form = "generate") {
  if (!field) return null;
  const lora = /^loras\[(\d+)\]\.(id|scale)$/.exec(field);
  if (form === "generate" && lora) {
    const row = loraRows().filter((r) => r.use.checked)[Number(lora[1])];
    return row ? (lora[2] === "id" ? row.use : row.scale) : null;
  }
  const id = FORMS[form].fields[field] || (form === "generate" ? field : null);
  return id ? document.getElementById(id) : null;
}

/** Send a job built by ``build`` (which may throw a fieldError) from ``form``: its button is
 * held while the request is in flight; the job joins the Jobs list, and (its images) the
 * gallery once it ends. ``onEnd(job)`` runs when it has ended. */
async function submitJob(form, button, build, onEnd = null) {
  clearErrors(form);
  button.disabled = true;
  try {
    const body = build();
    const accepted = await (await api("/v1/jobs", { method: "POST", json: body })).json();
    const job = { id: accepted.id, status: accepted.status, request: body, images: [], texts: [], onEnd };
    addJob(job);
    announce(`Job submitted: “${jobTitle(job)}”.`);
    job.item.scrollIntoView({ block: "nearest" }); // its progress, wherever the page was
    return job;
  } catch (error) {
    showError(error.message, error.field, form);
    return null;
  } finally {
    button.disabled = false;
    updateAvailability();
  }
}

function submit(event) {
  event.preventDefault();
  submitJob("generate", $("#generate"), () => {
    if (!$("#prompt").value.trim()) throw fieldError("prompt", "Write a prompt first.");
    return buildBody();
  });
}

// ------------------------------------------------------------------ the task tabs
// The input image of each task tab ({dataUrl, width, height}), as the API receives it.
const taskImages = { edit: null, read: null, upscale: null };

/** A tab's image: decoded here first (its size is shown, and a file the browser cannot read
 * is refused at once), then previewed. */
async function chooseTaskImage(tab, file, form) {
  const preview = $(`#${tab}-preview`);
  taskImages[tab] = null;
  preview.hidden = true;
  clearErrors(form);
  if (file) {
    const dataUrl = await readFile(file);
    const image = new Image();
    image.src = dataUrl;
    try {
      await image.decode();
    } catch {
      showError("That file is not an image this browser can read.", "image", form);
      updateUpscaleSize();
      return;
    }
    const { naturalWidth: width, naturalHeight: height } = image;
    taskImages[tab] = { dataUrl, width, height };
    const img = $("img", preview);
    img.src = dataUrl;
    img.alt = `The chosen image, ${width} by ${height} pixels`;
    img.classList.toggle("small", width < 256);
    $("figcaption", preview).textContent = `${file.name} · ${width} × ${height} px`;
    preview.hidden = false;
    announce(`Image loaded: ${width} by ${height} pixels.`);
  }
  updateUpscaleSize();
}

/** The tab's image, or the error asking for one. */
function taskImage(tab, what) {
  if (!taskImages[tab]) throw fieldError("image", `Choose an image to ${what} first.`);
  return taskImages[tab].dataUrl;
}

/** Optional number inputs into ``body``: blank ones are left out (the model's defaults). */
function putNumbers(body, inputs) {
  for (const [key, id] of Object.entries(inputs)) {
    const value = numberValue(id);
    if (value !== undefined) body[key] = value;
  }
  return body;
}

function editBody() {
  const image = taskImage("edit", "edit");
  const prompt = $("#edit-prompt").value;
  if (!prompt.trim()) throw fieldError("prompt", "Write an instruction first, e.g. “make the sky blue”.");
  const body = { task: "edit", prompt, model: $("#edit-model").value, image };
  return putNumbers(body, {
    steps: "edit-steps", guidance: "edit-guidance", image_guidance: "edit-image-guidance", seed: "edit-seed",
  });
}

function captionBody() {
  const image = taskImage("read", "describe");
  const detail = document.querySelector('input[name="detail"]:checked').value;
  return { task: "caption", model: $("#caption-model").value, image, detail };
}

function answerBody() {
  const image = taskImage("read", "ask about");
  const question = $("#question").value;
  if (!question.trim()) throw fieldError("question", "Write a question first.");
  return { task: "answer", model: $("#answer-model").value, image, question };
}

function upscaleBody() {
  const body = { task: "upscale", model: $("#upscaler").value, image: taskImage("upscale", "upscale") };
  putNumbers(body, { scale: "upscale-scale" });
  // What a filter cannot use is not sent (its inputs are disabled then).
  if (!$("#upscale-prompt").disabled && $("#upscale-prompt").value.trim()) body.prompt = $("#upscale-prompt").value;
  if (!$("#noise-level").disabled) putNumbers(body, { noise_level: "noise-level" });
  return body;
}

/** Under the scale: the size the upscale will have (the server rounds each side). */
function updateUpscaleSize() {
  const image = taskImages.upscale;
  const factor = numberValue("upscale-scale");
  let text = "1 to 8 times the input's sides.";
  if (image && factor >= 1 && factor <= 8) {
    const [width, height] = [image.width, image.height].map((side) => Math.max(1, Math.round(side * factor)));
    text = `${image.width} × ${image.height} px becomes ${width} × ${height} px.`;
  } else if (image && factor === undefined) {
    text = "Blank: the upscaler's own factor.";
  }
  $("#upscale-size").textContent = text;
}

// The Caption & Ask tab shows the text of its latest job (the Jobs list shows every one).
let readJob = null;

function showReadResult(job) {
  if (job.id !== readJob) return;
  const request = job.request;
  $("#read-result").hidden = false;
  $("#read-result-heading").textContent = request.task === "answer" ? "Answer" : "Caption";
  const question = $("#read-question");
  question.hidden = request.task !== "answer";
  question.textContent = request.task === "answer" ? `Q: ${request.question}` : "";
  const output = $("#read-output");
  output.classList.toggle("muted", job.status !== "succeeded");
  if (job.status === "succeeded") output.textContent = job.texts.map((text) => text.text).join("\n\n");
  else if (job.status === "failed") output.textContent = `Failed: ${job.error?.message || "unknown error"}`;
  else if (job.status === "cancelled") output.textContent = "Cancelled.";
  else output.textContent = "Working…";
}

async function submitRead(form, button, build) {
  const job = await submitJob(form, button, build, showReadResult);
  if (job) {
    readJob = job.id;
    showReadResult(job);
  }
}

const TAB_KEYS = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -1, ArrowDown: 1 };

/** Show one tab's panel (the ARIA tabs pattern: only the chosen tab is in the Tab order). */
function selectTab(tab, { focus = false } = {}) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) tab.addEventListener("click", () => selectTab(tab));
  $('[role="tablist"]').addEventListener("keydown", (event) => {
    const index = tabs.indexOf(document.activeElement);
    if (index < 0) return;
    let next = null;
    if (event.key in TAB_KEYS) next = (index + TAB_KEYS[event.key] + tabs.length) % tabs.length;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = tabs.length - 1;
    if (next === null) return;
    event.preventDefault();
    selectTab(tabs[next], { focus: true });
  });
  // The skip link goes to the shown tab's first control (Generate's prompt is hidden on others).
  $(".skip-link").addEventListener("click", (event) => {
    const panel = document.querySelector('[role="tabpanel"]:not([hidden])');
    const first = panel?.querySelector("input, textarea, select");
    if (!first) return;
    event.preventDefault();
    first.focus();
  });

  const forms = [
    ["edit-form", "edit", "edit-submit", editBody],
    ["upscale-form", "upscale", "upscale-submit", upscaleBody],
  ];
  for (const [id, form, button, build] of forms) {
    $(`#${id}`).addEventListener("submit", (event) => {
      event.preventDefault();
      submitJob(form, $(`#${button}`), build);
    });
  }
  $("#caption-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitRead("caption", $("#caption-submit"), captionBody);
  });
  $("#ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitRead("answer", $("#ask-submit"), answerBody);
  });
  for (const [tab, form] of [["edit", "edit"], ["read", "caption"], ["upscale", "upscale"]]) {
    $(`#${tab}-image`).addEventListener("change", (event) => chooseTaskImage(tab, event.target.files[0], form));
  }
  $("#upscaler").addEventListener("change", updateUpscaler);
  $("#upscale-scale").addEventListener("input", updateUpscaleSize);
  // Ctrl/Cmd+Enter sends from a text box, as on Generate's prompt.
  for (const [box, form] of [["edit-prompt", "edit-form"], ["upscale-prompt", "upscale-form"]]) {
    $(`#${box}`).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $(`#${form}`).requestSubmit();
    });
  }
}

// ------------------------------------------------------------------ jobs: one list for both panels
// The page's jobs, newest first: {id, status, request, images, texts, error, queue_position,
// progress, item, done, onEnd}. The Jobs list and the gallery are both drawn from it, so they always agree; on
// load it is filled from GET /v1/jobs, so they agree after a reload too.
const jobs = [];

/** What a job is, in one line, from its request (the page's body, or the API's stored view:
 * both have `task` and the task's inputs). */
function jobTitle(job, length = 60) {
  const request = job.request || {};
  const model = request.model ? ` · ${request.model}` : "";
  let title;
  if (request.task === "edit") title = `Edit: ${request.prompt}`;
  else if (request.task === "caption") title = `Caption (${request.detail || "short"})${model}`;
  else if (request.task === "answer") title = `Ask: ${request.question}`;
  else if (request.task === "upscale") title = `Upscale${request.scale != null ? ` ×${request.scale}` : ""}${model}`;
  else title = request.prompt || "(no prompt)";
  return short(title, length);
}

const isTextJob = (job) => ["caption", "answer"].includes(job.request?.task);

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
  $(".job-title", item).title = jobTitle(job, Infinity);
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
  Object.assign(job, {
    status: data.status, images: data.images || [], texts: data.texts || [], error: data.error,
  });
  showEnded(job);
  job.onEnd?.(job);
  const title = jobTitle(job);
  if (job.status === "succeeded" && isTextJob(job)) {
    announce(`“${title}” finished: ${short(job.texts.map((text) => text.text).join(" "), 100)}`);
  } else if (job.status === "succeeded") {
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
  if (job.status === "succeeded" && isTextJob(job)) {
    meter.value = meter.max;
    status.textContent = `Done · ${job.request.task}`;
    // The caption or answer itself, in full: text results live in the Jobs list.
    const texts = document.createElement("div");
    texts.className = "job-texts";
    for (const text of job.texts || []) {
      const paragraph = document.createElement("p");
      paragraph.className = "job-text";
      paragraph.textContent = text.text;
      texts.append(paragraph);
    }
    item.append(texts);
  } else if (job.status === "succeeded") {
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
/** A card's heading: the prompt, or what an edit or upscale did. */
function recordTitle(record) {
  if (record.task === "edit") return `Edited: ${record.prompt}`;
  if (record.task === "upscale") return `Upscaled ×${record.scale}${record.prompt ? `: ${record.prompt}` : ""}`;
  return record.prompt || "(no prompt)";
}

function recordSummary(record, request) {
  // A resampling filter runs no steps: steps, guidance, seed and sampler mean nothing for it.
  const denoised = record.steps > 0;
  const rows = [
    ["Model", record.model_id],
    ["Mode", record.mode],
    ["Size", `${record.width}×${record.height}`],
  ];
  if (record.scale != null) rows.push(["Scale", `×${record.scale}`]);
  if (denoised) rows.push(["Steps", record.steps], ["Guidance", record.guidance]);
  if (record.image_guidance != null) rows.push(["Image guidance", record.image_guidance]);
  if (record.noise_level != null) rows.push(["Noise level", record.noise_level]);
  if (denoised) rows.push(["Seed", record.seed]);
  if (denoised && record.sampler) rows.push(["Sampler", record.sampler]);
  if (record.schedule && record.schedule !== "automatic") rows.push(["Schedule", scheduleLabel(record.schedule)]);
  if (record.strength != null && record.mode !== "txt2img") rows.push(["Strength", record.strength]);
  if (record.refiner_id) rows.push(["Refiner", `${record.refiner_id} from ${record.refiner_switch}`]);
  if (record.hires) {
    const hires = record.hires;
    rows.push(["Hires fix", `×${hires.scale} with ${hires.upscaler} to ${hires.width}×${hires.height}, ` +
      `${hires.steps} steps at ${hires.strength}`]);
  }
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
  const title = recordTitle(record);
  img.alt = record.steps > 0 ? `${record.prompt || "image"} (seed ${record.seed})` : title;
  img.width = record.width;
  img.height = record.height;
  img.decoding = "async";
  img.classList.toggle("small", record.width < 256);
  img.src = await imageUrl(image);
  const caption = document.createElement("figcaption");
  const prompt = document.createElement("p");
  prompt.className = "card-prompt";
  prompt.textContent = title;
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
  use.setAttribute(
    "aria-label",
    record.steps > 0
      ? `Use the settings of “${short(record.prompt || "image")}”, seed ${record.seed}`
      : `Use the settings of “${short(title)}”`,
  );
  use.addEventListener("click", () => useSettings(record, job.request));
  const download = document.createElement("a");
  download.href = img.src;
  download.download = record.task && record.task !== "generate" ? `toile-${record.task}-${record.seed}.png` : `toile-${record.seed}.png`;
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

/** Put a result's settings back in the form of its task (and show that tab). An edit's or
 * upscale's input image is not kept by the server: the tab keeps whatever image it has. */
function useSettings(record, request) {
  if (record.task === "edit") return useTaskSettings("edit", record, {
    "edit-prompt": record.prompt, "edit-steps": record.steps, "edit-guidance": record.guidance,
    "edit-image-guidance": record.image_guidance, "edit-seed": record.seed,
  }, "edit-model", "edit-prompt");
  if (record.task === "upscale") {
    useTaskSettings("upscale", record, {
      "upscale-scale": record.scale, "upscale-prompt": record.prompt, "noise-level": record.noise_level,
    }, "upscaler", "upscale-scale");
    updateUpscaler();
    updateUpscaleSize();
    return;
  }
  selectTab($("#tab-generate"));
  $("#prompt").value = record.prompt || "";
  $("#negative_prompt").value = record.negative_prompt || "";
  const select = $("#model");
  if ([...select.options].some((option) => option.value === record.model_id)) select.value = record.model_id;
  updateRefiners();
  const refiner = $("#refiner");
  refiner.value = [...refiner.options].some((option) => option.value === record.refiner_id) ? record.refiner_id : "";
  const hires = record.hires || {};
  const values = {
    width: record.width, height: record.height, steps: record.steps, guidance: record.guidance, seed: record.seed,
    refiner_switch: record.refiner_switch, hires_scale: hires.scale, hires_steps: hires.steps,
    hires_strength: hires.strength,
  };
  if (hires.upscaler) $("#hires_upscaler").value = hires.upscaler;
  $("#hires").open = Boolean(record.hires);
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

function useTaskSettings(tab, record, values, picker, focus) {
  selectTab($(`#tab-${tab}`));
  if (hasOption($(`#${picker}`), record.model_id)) $(`#${picker}`).value = record.model_id;
  for (const [id, value] of Object.entries(values)) $(`#${id}`).value = value ?? "";
  $(`#${focus}`).focus();
  announce(`Settings loaded from “${short(recordTitle(record))}”.`);
}

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
  setUpTabs();
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
