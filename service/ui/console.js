// dede operator console: plain JavaScript, no libraries, no build step. It talks to the same API as
// any client: GET /v1/models, POST /detect?explain=true, GET /v1/stats.
"use strict";

const KEY_STORE = "dede-api-key";
const STATS_EVERY_MS = 5000;
const RATE_WINDOW_MS = 5 * 60 * 1000; // the "recent" in recent flag rate
const state = { model: null, samples: [] };

const $ = (id) => document.getElementById(id);

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY_STORE) ? "The API key was refused: enter the right one." : "");
    throw new Error("this service needs an API key");
  }
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? (body.error.message || body.error) : response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function askForKey(message) {
  $("key-panel").hidden = false;
  if (message) say(message, true);
  $("api-key").focus();
}

function fact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toPrecision(4));

async function loadModel() {
  const list = $("model-facts");
  try {
    const model = (await api("/v1/models")).models[0];
    state.model = model;
    list.replaceChildren();
    const cal = model.calibration || {};
    fact(list, "Model", `${model.name} ${model.version}`);
    fact(list, "Encoder", `${model.encoder.architecture} (sha256 ${String(model.encoder.sha256 || "none").slice(0, 12)})`);
    fact(list, "Threshold", fmt(model.threshold));
    fact(list, "Calibrated for", `${(100 * model.fpr_target).toFixed(2)}% false positives on ${cal.n_calibration} clean images (${cal.calibration_source})`);
    if (cal.realised_fpr !== null && cal.realised_fpr !== undefined) {
      const ci = cal.realised_fpr_ci95 ? ` (95% CI ${(100 * cal.realised_fpr_ci95[0]).toFixed(2)}–${(100 * cal.realised_fpr_ci95[1]).toFixed(2)}%)` : "";
      fact(list, "Measured FPR", `${(100 * cal.realised_fpr).toFixed(2)}% on ${cal.n_holdout} held-out images${ci}`);
    }
    const quantiles = Object.entries(cal.score_quantiles || {}).map(([q, v]) => `${q.slice(1)}: ${fmt(v)}`);
    if (quantiles.length) fact(list, "Clean score quantiles", quantiles.join(", "));
    fact(list, "Runs on", model.provider);
    fact(list, "Explanations", model.explains ? "yes (heat map and rebuild)" : "not in this bundle");
    $("key-panel").hidden = true;
    say("");
    refreshStats();
  } catch (error) {
    $("model-status").textContent = error.message;
  }
}

async function refreshStats() {
  if (!state.model) return;
  let stats;
  try { stats = await api("/v1/stats"); } catch (_) { return; }
  const now = Date.now();
  const scored = stats.images.clean + stats.images.flagged;
  state.samples.push({ at: now, flagged: stats.images.flagged, scored });
  state.samples = state.samples.filter((s) => now - s.at <= RATE_WINDOW_MS);
  const oldest = state.samples[0];
  const flagged = stats.images.flagged - (state.samples.length > 1 ? oldest.flagged : 0);
  const total = scored - (state.samples.length > 1 ? oldest.scored : 0);
  $("flag-rate").textContent = total
    ? `${(100 * flagged / total).toFixed(1)}% flagged: ${flagged} of ${total} images${state.samples.length > 1 ? " in the last minutes" : " since the service started"}`
    : "no images scored recently";
  $("stats-totals").textContent = `Since start: ${stats.images.clean} clean, ${stats.images.flagged} flagged, ${stats.images.error} errors; queue ${stats.queue_depth}.`;
}

function image(src, alt, className) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  if (className) img.className = className;
  return img;
}

function figure(children, caption) {
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(...children, cap);
  return fig;
}

function card(file, result, threshold) {
  const item = document.createElement("li");
  item.className = "card";
  const name = result.filename || file.name;
  const source = URL.createObjectURL(file);
  if (result.error) {
    item.classList.add("failed");
    item.setAttribute("aria-label", `${name}: not scored`);
    const text = document.createElement("p");
    text.textContent = `${name}: not scored: ${result.error.message}`;
    item.append(text);
    return item;
  }
  const flagged = result.flagged;
  item.classList.toggle("flagged", flagged);
  const verdict = flagged ? "FLAGGED: likely carries a trigger" : "not flagged";
  item.setAttribute("aria-label", `${name}: ${verdict}, score ${fmt(result.score)}, threshold ${fmt(threshold)}`);
  const shown = result.explanation;
  const stack = document.createElement("div");
  stack.className = "stack";
  stack.append(image(source, `uploaded image ${name}`));
  if (shown) stack.append(image(shown.map_png, `heat map of ${name}: strongest cell ${fmt(shown.map_max)} times the threshold`, "heat"));
  item.append(figure([stack], shown ? "image and heat map" : "image"));
  if (shown) item.append(figure([image(shown.rebuild_png, `the detector's rebuild of ${name}`, "rebuild")], "rebuild"));
  else item.append(document.createElement("div"));
  const details = document.createElement("div");
  const head = document.createElement("p");
  head.className = "verdict";
  head.textContent = `${name}: ${verdict}`;
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(2 * threshold));
  bar.setAttribute("aria-valuenow", String(result.score));
  bar.setAttribute("aria-label", `score ${fmt(result.score)} against threshold ${fmt(threshold)} (middle mark)`);
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = `${Math.min(100, 50 * result.score / threshold)}%`;
  const mark = document.createElement("div");
  mark.className = "mark";
  bar.append(fill, mark);
  const scale = document.createElement("div");
  scale.className = "scale";
  scale.setAttribute("aria-hidden", "true");
  for (const label of ["0", `threshold ${fmt(threshold)}`, `${fmt(2 * threshold)}+`]) {
    const span = document.createElement("span");
    span.textContent = label;
    scale.append(span);
  }
  const numbers = document.createElement("p");
  numbers.className = "numbers";
  numbers.textContent = `score ${fmt(result.score)} (${(result.score / threshold).toFixed(2)} × threshold)` +
    (shown ? `; most unusual place: ${fmt(shown.map_max)} × threshold` : "");
  details.append(head, bar, scale, numbers);
  item.append(details);
  return item;
}

async function score(files) {
  files = Array.from(files).filter((f) => f.type.startsWith("image/") || f.type === "");
  if (!files.length) return;
  if (!state.model) await loadModel();
  if (!state.model) { say("The model could not be loaded: see above.", true); return; }
  say(`Scoring ${files.length} image${files.length > 1 ? "s" : ""}…`);
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  const explain = state.model.explains ? "?explain=true" : "";
  try {
    const answer = await api(`/detect${explain}`, { method: "POST", body: form });
    const list = $("results");
    answer.images.forEach((result, i) => list.prepend(card(files[i], result, answer.threshold)));
    const flagged = answer.images.filter((r) => r.flagged).length;
    say(`Scored ${answer.images.length}: ${flagged} flagged.`);
    refreshStats();
  } catch (error) {
    say(`Could not score: ${error.message}`, true);
  }
}

function wire() {
  const drop = $("drop");
  const input = $("files");
  // The label and the input open the picker themselves; a click elsewhere on the zone does too.
  drop.addEventListener("click", (event) => { if (!event.target.closest("label, input")) input.click(); });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    score(event.dataTransfer.files);
  });
  input.addEventListener("change", () => { score(input.files); input.value = ""; });
  $("show-heat").addEventListener("change", (event) => {
    $("results").classList.toggle("hide-heat", !event.target.checked);
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value);
    $("api-key").value = "";
    $("key-panel").hidden = true;
    loadModel();
  });
  loadModel();
  setInterval(refreshStats, STATS_EVERY_MS);
}

document.addEventListener("DOMContentLoaded", wire);
