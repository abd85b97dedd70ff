// The histodetect page: uploads patches and regions to the service and shows the answers.
// Plain browser JavaScript, no build step and no network access beyond this service.
"use strict";

const KEY_STORE = "histodetect-api-key";
const EXPLAIN_PARALLEL = 4; // Grad-CAM requests in flight at once
let apiKey = sessionStorage.getItem(KEY_STORE) || "";

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("X-API-Key", apiKey);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.detail) message = body.detail;
    } catch (_) {
      // not JSON (e.g. a proxy's page): keep the status line
    }
    if (response.status === 401) $("key-form").hidden = false;
    throw new ApiError(response.status, message);
  }
  return response;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function cell(row, text, className) {
  const td = row.insertCell();
  if (text !== undefined) td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function loadModel() {
  try {
    const info = await (await api("v1/model")).json();
    const el = $("model");
    el.textContent = "";
    const parts = [
      ["model", info.model_id],
      ["architecture", info.arch],
      ["threshold", info.threshold.toFixed(3)],
      ["TTA", `x${info.tta}`],
    ];
    const auc = info.metrics && info.metrics.valid && info.metrics.valid.auc;
    if (typeof auc === "number") parts.push(["validation AUC", auc.toFixed(4)]);
    if (info.data && info.data.fingerprint) {
      parts.push(["training data", String(info.data.fingerprint).slice(0, 12)]);
    }
    parts.forEach(([name, value], i) => {
      if (i) el.append(" · ");
      el.append(`${name} `);
      const code = document.createElement("code");
      code.textContent = value;
      el.append(code);
    });
    $("synthetic").hidden = !info.synthetic;
    const side = Math.floor(Math.sqrt(info.limits.max_region_pixels));
    $("region-limit").textContent =
      `up to ${info.limits.max_region_pixels.toLocaleString("en")} pixels, e.g. ` +
      `${side}×${side}; at most ${info.limits.max_upload_mb} MB`;
    document.body.dataset.model = info.model_id;
    $("key-form").hidden = true;
  } catch (err) {
    $("model").textContent = `model not available: ${err.message}`;
  }
}

async function explainInto(file, img) {
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const blob = await (await api("v1/explain", { method: "POST", body: form })).blob();
    img.src = URL.createObjectURL(blob);
    await img.decode();
    img.dataset.state = "ready";
  } catch (err) {
    img.alt = `no heat map: ${err.message}`;
    img.dataset.state = "failed";
  }
}

// An out-of-scope flag is a warning that the probability is not to be trusted (not a diagnosis).
function scopeCell(inScope, score) {
  if (inScope === null || inScope === undefined) return ["–", "scope"];
  const text = inScope ? "yes" : "OUT OF SCOPE";
  return [`${text} (${score.toFixed(1)})`, inScope ? "scope" : "scope scope-out"];
}

function scopeNote(body) {
  if (body.scope_threshold === null) return "; out-of-scope scores unavailable for this run";
  if (!body.out_of_scope) return "; all in scope";
  return `; ${body.out_of_scope} OUT OF SCOPE (unlike the training data: do not trust them)`;
}

async function predictFiles(files) {
  files = Array.from(files);
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  setStatus("patch-status", `predicting ${files.length} patch(es)…`);
  document.body.dataset.patches = "busy";
  let body;
  try {
    body = await (await api("v1/predict?include_image=true", { method: "POST", body: form })).json();
  } catch (err) {
    setStatus("patch-status", err.message, true);
    document.body.dataset.patches = "error";
    return;
  }
  const tbody = $("patch-table").tBodies[0];
  const jobs = [];
  body.results.forEach((r, i) => {
    const row = tbody.insertRow(i); // the newest upload on top, in upload order
    row.dataset.file = r.file;
    row.dataset.probability = String(r.probability);
    row.dataset.label = String(r.label);
    cell(row, r.file + (r.cropped ? ` (centre of ${r.width}×${r.height})` : ""), "file");
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.alt = `patch ${r.file}`;
    img.src = `data:image/png;base64,${r.image_png}`;
    const box = document.createElement("span");
    box.className = "centre";
    thumb.append(img, box);
    cell(row).append(thumb);
    const heat = document.createElement("img");
    heat.className = "heat";
    heat.alt = `Grad-CAM of ${r.file}`;
    heat.dataset.state = "loading";
    cell(row).append(heat);
    cell(row, r.probability.toFixed(4), "num probability");
    cell(row, r.label ? "tumour" : "no tumour", `label label-${r.label}`);
    row.dataset.inScope = String(r.in_scope);
    cell(row, ...scopeCell(r.in_scope, r.scope_score));
    jobs.push(() => explainInto(files[i], heat));
  });
  $("patch-table").hidden = false;
  const summary =
    `${body.results.length} patch(es) at threshold ${body.threshold.toFixed(3)} ` +
    `(model ${body.model_id})${scopeNote(body)}`;
  setStatus("patch-status", `${summary}; computing heat maps…`);
  // A few Grad-CAM requests at a time, so a large drop does not flood the service.
  const workers = Array.from({ length: Math.min(EXPLAIN_PARALLEL, jobs.length) }, async () => {
    while (jobs.length) await jobs.shift()();
  });
  await Promise.all(workers);
  setStatus("patch-status", summary);
  document.body.dataset.patches = "done";
}

async function mapRegion(files) {
  const file = Array.from(files)[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  const mpp = parseFloat($("mpp-input").value);
  const query = mpp > 0 ? `?mpp=${encodeURIComponent(mpp)}` : "";
  setStatus("region-status", `mapping ${file.name}…`);
  document.body.dataset.region = "busy";
  let body;
  try {
    body = await (await api(`v1/region${query}`, { method: "POST", body: form })).json();
  } catch (err) {
    setStatus("region-status", err.message, true);
    document.body.dataset.region = "error";
    return;
  }
  $("region-overlay").src = `data:image/png;base64,${body.overlay_png}`;
  $("region-summary").textContent =
    `${body.file}: ${body.width}×${body.height} px, stride ${body.stride} px, ` +
    `${(100 * body.tissue_fraction).toFixed(0)} % tissue, highest P(tumour) ` +
    `${body.max_probability.toFixed(3)}, ${body.regions.length} region(s) at or above ` +
    `${body.threshold.toFixed(3)}` +
    (body.out_of_scope_share === null
      ? ""
      : `; ${(100 * body.out_of_scope_share).toFixed(0)} % of the tissue OUT OF SCOPE (greyed)`);
  const tbody = $("region-table").tBodies[0];
  tbody.replaceChildren();
  for (const r of body.regions) {
    const row = tbody.insertRow();
    cell(row, String(r.id));
    cell(row, Math.round(r.area_px).toLocaleString("en"), "num");
    cell(row, r.area_mm2 === null ? "–" : r.area_mm2.toFixed(4), "num");
    cell(row, r.max_prob.toFixed(3), "num");
    cell(row, r.mean_prob.toFixed(3), "num");
    const share = r.out_of_scope_share;
    cell(
      row,
      share === null ? "–" : `${(100 * share).toFixed(0)} %${r.out_of_scope ? " (flagged)" : ""}`,
      r.out_of_scope ? "num scope-out" : "num",
    );
  }
  $("region-table").hidden = !body.regions.length;
  $("region-result").hidden = false;
  setStatus("region-status", "");
  document.body.dataset.region = "done";
}

function dropZone(zoneId, inputId, handler) {
  const zone = $(zoneId);
  const input = $(inputId);
  input.addEventListener("change", () => {
    handler(input.files);
    input.value = ""; // the same file can be chosen again
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    handler(e.dataTransfer.files);
  });
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  loadModel();
});
dropZone("patch-drop", "patch-input", predictFiles);
dropZone("region-drop", "region-input", mapRegion);
loadModel();
