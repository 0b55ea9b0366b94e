// deconvnet explorer: plain JavaScript over the JSON API (see /docs). No external code.
"use strict";

const THUMB = 44; // px, must match .map in app.css
const state = { model: null, image: null, layer: null, maps: null, selected: null, request: 0 };
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
}

function rfText(size) { return size == null ? "covers the whole image" : `${size} px`; }

function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }

// The projection cropped to the receptive field and enlarged (the paper's Fig. 2), from the full
// frame: the frame is scaled so that the box fills the container; small fields show their pixels.
function placeCrop(container, img, src, box, size) {
  const [y0, x0, y1, x1] = box, [h, w] = size, bh = y1 - y0, bw = x1 - x0;
  container.style.aspectRatio = `${bw} / ${bh}`;
  img.src = src;
  img.style.width = `${(100 * w) / bw}%`;
  img.style.height = `${(100 * h) / bh}%`;
  img.style.left = `${(-100 * x0) / bw}%`;
  img.style.top = `${(-100 * y0) / bh}%`;
  img.classList.toggle("pixelated", Math.max(bh, bw) <= 48);
}

function placeBox(el, box, size) {
  const [y0, x0, y1, x1] = box, [h, w] = size;
  el.style.top = `${(100 * y0) / h}%`;
  el.style.left = `${(100 * x0) / w}%`;
  el.style.height = `${(100 * (y1 - y0)) / h}%`;
  el.style.width = `${(100 * (x1 - x0)) / w}%`;
  el.hidden = false;
}

// ------------------------------------------------------------------ model and sources
async function loadModel() {
  const m = await api("/api/model");
  state.model = m;
  $("model-info").textContent = `model ${m.source} · ${m.arch} · ${m.classes.length} classes · input ${m.input_size[0]}×${m.input_size[1]} px`;
  $("occlusion-panel").hidden = !m.occlusion;
  const tabs = $("layer-tabs");
  tabs.innerHTML = "";
  for (const layer of m.layers) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = layer.name;
    b.title = `${layer.channels} maps of ${layer.map_size.join("×")}, receptive field ${rfText(layer.rf_size)}`;
    b.dataset.layer = layer.name;
    if (!m.overview_layers.includes(layer.name)) b.className = "block"; // a block inside a top-level layer
    b.addEventListener("click", () => showLayer(layer.name));
    tabs.appendChild(b);
  }
}

async function loadSources() {
  const list = await api("/api/sources");
  const box = $("source-list");
  box.innerHTML = "";
  for (const s of list) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "source";
    b.dataset.id = s.id;
    b.title = `${s.name} (${s.kind})`;
    const img = document.createElement("img");
    img.src = s.thumbnail; img.alt = s.name; img.loading = "lazy";
    const label = document.createElement("span");
    label.textContent = s.name;
    b.append(img, label);
    b.addEventListener("click", () => openSource(s.id, b));
    box.appendChild(b);
  }
}

async function openSource(id, button) {
  document.querySelectorAll(".source").forEach((el) => el.classList.toggle("active", el === button));
  await openWith(() => api(`/api/sources/${encodeURIComponent(id)}/open`, { method: "POST" }), button ? button.title : id);
}

async function upload(file) {
  document.querySelectorAll(".source").forEach((el) => el.classList.remove("active"));
  if (state.model && file.size > state.model.max_upload_bytes) {
    setStatus(`${file.name}: too large (${(file.size / 1e6).toFixed(1)} MB; limit ${(state.model.max_upload_bytes / 1e6).toFixed(0)} MB)`, "error");
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  await openWith(() => api("/api/upload", { method: "POST", body: form }), file.name);
}

async function openWith(request, what) {
  const ticket = ++state.request;
  setStatus(`opening ${what}…`, "busy");
  try {
    const info = await request();
    if (ticket !== state.request) return;
    state.image = info;
    showImage(info);
    setStatus("");
    const overview = state.model ? state.model.overview_layers : info.layers;
    await showLayer(state.layer || overview[overview.length - 1]);
  } catch (e) {
    if (ticket === state.request) setStatus(e.message, "error");
  }
}

function showImage(info) {
  $("placeholder").hidden = true;
  $("image-view").hidden = false;
  $("layer-panel").hidden = false;
  $("detail").hidden = true;
  $("rules").hidden = true;
  $("rules-grid").innerHTML = "";
  clearScores();
  $("input-rf").hidden = true;
  $("image-name").textContent = info.name;
  $("input-img").src = info.input_url;
  $("d-input").src = info.input_url;
  $("image-size").textContent = `model input ${info.size[0]}×${info.size[1]} px (from ${info.original_size[1]}×${info.original_size[0]})`;
  const ol = $("top5");
  ol.innerHTML = "";
  for (const c of info.top5) {
    const li = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * c.probability).toFixed(1)}%`;
    const name = document.createElement("span");
    name.textContent = c.label;
    const p = document.createElement("span");
    p.textContent = `${(100 * c.probability).toFixed(1)} %`;
    li.append(bar, name, p);
    ol.appendChild(li);
  }
  const note = $("note");
  note.textContent = info.note || "";
  note.hidden = !info.note;
  note.classList.toggle("unsure", !!info.unsure);
  $("occlusion-panels").innerHTML = "";
  $("occlusion-progress").hidden = true;
  $("occlusion-run").disabled = false;
}

// ------------------------------------------------------------------ layer browser
async function showLayer(layer) {
  if (!state.image) return;
  state.layer = layer;
  document.querySelectorAll("#layer-tabs button").forEach((b) => b.classList.toggle("active", b.dataset.layer === layer));
  const imageId = state.image.id;
  const grid = $("map-grid");
  grid.setAttribute("aria-busy", "true");
  try {
    const maps = await api(`/api/images/${imageId}/layers/${layer}`);
    if (!state.image || state.image.id !== imageId || state.layer !== layer) return;
    state.maps = maps;
    grid.innerHTML = "";
    const size = `${maps.sprite_cols * THUMB}px ${maps.sprite_rows * THUMB}px`;
    maps.order.forEach((channel, rank) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "map";
      b.dataset.index = channel;
      b.dataset.max = maps.maxima[channel];
      b.title = `map ${channel} · max ${fmt(maps.maxima[channel])}`;
      b.setAttribute("aria-label", b.title);
      b.style.backgroundImage = `url(${maps.sprite_url})`;
      b.style.backgroundSize = size;
      const col = rank % maps.sprite_cols, row = Math.floor(rank / maps.sprite_cols);
      b.style.backgroundPosition = `${-col * THUMB}px ${-row * THUMB}px`;
      b.addEventListener("mouseenter", () => hover(channel, rank));
      b.addEventListener("focus", () => hover(channel, rank));
      b.addEventListener("click", () => selectMap(layer, channel, b));
      grid.appendChild(b);
    });
    grid.removeAttribute("aria-busy");
    $("map-hover").textContent = `${layer}: ${maps.channels} maps of ${maps.map_size.join("×")}, strongest first. Hover for index and maximum; click for its projection.`;
    selectMap(layer, maps.order[0], grid.firstChild);
  } catch (e) {
    setStatus(e.message, "error");
  }
}

function hover(channel, rank) {
  const m = state.maps;
  $("map-hover").textContent = `${state.layer} map ${channel} · max ${fmt(m.maxima[channel])} · rank ${rank + 1} of ${m.channels}`;
}

async function selectMap(layer, channel, button) {
  if (layer !== state.layer) return; // a click on the grid of a layer being replaced
  document.querySelectorAll(".map.active").forEach((el) => el.classList.remove("active"));
  if (button) button.classList.add("active");
  const imageId = state.image.id;
  const ticket = ++state.request;
  state.selected = channel;
  clearScores();
  try {
    const v = await api(`/api/images/${imageId}/layers/${layer}/maps/${channel}`);
    if (ticket !== state.request) return;
    $("detail").hidden = false;
    $("detail-title").textContent = `${layer} · map ${channel} (rank ${v.rank + 1}) · max ${fmt(v.max)} at (${v.position.join(", ")})`;
    $("d-projection").src = v.projection;
    $("d-whole").src = v.whole_map;
    $("d-activation").src = v.activation;
    $("d-patch").src = v.patch;
    $("d-patch").classList.toggle("pixelated", Math.max(v.box[2] - v.box[0], v.box[3] - v.box[1]) <= 48);
    placeCrop($("d-crop"), $("d-crop-img"), v.projection, v.box, v.image_size);
    placeBox($("d-input-rf"), v.box, v.image_size);
    placeBox($("d-projection-rf"), v.box, v.image_size);
    placeBox($("input-rf"), v.box, v.image_size);
    $("detail-meta").textContent = `receptive field ${rfText(v.rf_size)}, box y ${v.box[0]}–${v.box[2]}, x ${v.box[1]}–${v.box[3]} · answered in ${v.elapsed_ms.toFixed(0)} ms`;
    const rules = showRules(imageId, layer, channel, ticket).catch((e) => {
      $("rules-meta").textContent = "";
      if (ticket === state.request) setStatus(e.message, "error");
    });
    const atlas = $("atlas"), grid = $("atlas-grid");
    grid.innerHTML = "";
    atlas.hidden = true;
    if (v.atlas_url) {
      const a = await api(v.atlas_url);
      if (ticket !== state.request) return;
      // the paper's Fig. 2 layout: the 3x3 projections beside the 3x3 image patches, strongest first
      const halves = [document.createElement("div"), document.createElement("div")];
      halves.forEach((h) => { h.className = "atlas-half"; grid.appendChild(h); });
      for (const p of a.patches) {
        const label = [p.value != null ? `max ${fmt(p.value)}` : null, p.label].filter(Boolean).join(" · ");
        [[p.projection, "projection"], [p.image, "dataset patch"]].forEach(([src, alt], i) => {
          const img = document.createElement("img");
          img.src = src; img.alt = alt; img.title = label;
          halves[i].appendChild(img);
        });
      }
      if (a.optimised) {
        // what the unit wants to see (`deconvnet atlas --visualize`) beside what excites it in the dataset
        const fig = document.createElement("figure");
        fig.className = "atlas-optimised";
        const img = document.createElement("img");
        img.src = a.optimised; img.alt = "image optimised for the unit";
        const cap = document.createElement("figcaption");
        cap.className = "small muted";
        cap.textContent = "optimised to excite the unit" +
          (a.optimised_peak != null ? ` · reaches ${fmt(a.optimised_peak)}` : "") +
          (a.exemplar != null ? ` (best example ${fmt(a.exemplar)})` : "");
        fig.append(img, cap);
        grid.appendChild(fig);
      }
      atlas.hidden = a.patches.length === 0;
    }
    await rules;
  } catch (e) {
    if (ticket === state.request) setStatus(e.message, "error");
  }
}

// the same unit under each rule (deconvnet, guided, gradient), side by side; asked for after the main
// view is shown (the rules take a way down each)
async function showRules(imageId, layer, channel, ticket) {
  const panel = $("rules"), grid = $("rules-grid");
  panel.setAttribute("aria-busy", "true");
  $("rules-meta").textContent = "(computing…)";
  grid.querySelectorAll("img").forEach((img) => { img.style.opacity = "0.35"; });
  const r = await api(`/api/images/${imageId}/layers/${layer}/maps/${channel}/rules`);
  if (ticket !== state.request) return;
  grid.innerHTML = "";
  for (const p of r.projections) {
    const fig = document.createElement("figure");
    fig.dataset.rule = p.rule;
    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.src = p.image; img.alt = `${p.rule} projection`;
    const box = document.createElement("div");
    box.className = "rf";
    frame.append(img, box);
    placeBox(box, r.box, r.image_size);
    const cap = document.createElement("figcaption");
    cap.textContent = p.title;
    fig.append(frame, cap);
    grid.appendChild(fig);
  }
  $("rules-meta").textContent = `(${layer} map ${channel}, max ${fmt(r.max)} at (${r.position.join(", ")}) · ${r.elapsed_ms.toFixed(0)} ms)`;
  panel.removeAttribute("aria-busy");
  panel.hidden = false;
}

// ------------------------------------------------------------------ sanity measures of the selected unit
function clearScores() {
  $("wanted-result").hidden = true;
  $("wanted-meta").textContent = "";
  $("wanted-run").disabled = false;
  $("scores-result").hidden = true;
  $("scores-table").querySelector("tbody").innerHTML = "";
  $("scores-meta").textContent = "";
  $("scores-run").disabled = false;
}

// computed on demand (seconds: a hundred forward passes), cached by the server per image and unit
async function runScores() {
  if (!state.image || state.selected == null) return;
  const imageId = state.image.id, layer = state.layer, channel = state.selected, ticket = state.request;
  const button = $("scores-run");
  button.disabled = true;
  $("scores-meta").textContent = "computing…";
  try {
    const s = await api(`/api/images/${imageId}/layers/${layer}/maps/${channel}/scores`);
    if (ticket !== state.request) return;
    const body = $("scores-table").querySelector("tbody");
    body.innerHTML = "";
    for (const row of s.rows) {
      const tr = document.createElement("tr");
      tr.dataset.rule = row.rule;
      [row.title, row.other_units, row.deletion_auc, row.insertion_auc].forEach((value, i) => {
        const td = document.createElement("td");
        td.textContent = i === 0 ? value : (value == null ? "–" : value.toFixed(2));
        tr.appendChild(td);
      });
      body.appendChild(tr);
    }
    $("scores-reading").textContent = s.reading;
    $("scores-curves").src = s.curves;
    $("scores-meta").textContent = `${layer} map ${channel} against maps ${s.others.join(", ")} · ${s.elapsed_ms.toFixed(0)} ms`;
    $("scores-result").hidden = false;
  } catch (e) {
    $("scores-meta").textContent = "";
    if (ticket === state.request) setStatus(e.message, "error");
  } finally {
    button.disabled = false;
  }
}

// what the unit wants to see: an image optimised to excite the map's centre unit (a background job,
// cached by the server per unit whatever the image)
async function runWanted() {
  if (!state.image || state.selected == null) return;
  const imageId = state.image.id, layer = state.layer, channel = state.selected, ticket = state.request;
  const shownMax = state.maps ? state.maps.maxima[channel] : null;
  const button = $("wanted-run");
  button.disabled = true;
  $("wanted-meta").textContent = "optimising…";
  try {
    let job = await api(`/api/images/${imageId}/layers/${layer}/maps/${channel}/wanted`, { method: "POST" });
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 500));
      job = await api(`/api/jobs/${job.id}`);
    }
    if (ticket !== state.request) return;
    if (job.status === "error") throw new Error(job.error || "optimisation failed");
    const r = job.result;
    $("wanted-img").src = r.image;
    $("wanted-caption").textContent = `optimised for ${layer} map ${channel}'s centre unit (${r.steps} steps): the map reaches ${fmt(r.peak)}` +
      (shownMax != null ? ` (on this image ${fmt(shownMax)})` : "");
    $("wanted-meta").textContent = "";
    $("wanted-result").hidden = false;
  } catch (e) {
    $("wanted-meta").textContent = "";
    if (ticket === state.request) setStatus(e.message, "error");
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ occlusion
async function runOcclusion() {
  if (!state.image) return;
  const imageId = state.image.id;
  const button = $("occlusion-run"), bar = document.querySelector("#occlusion-progress progress");
  button.disabled = true;
  $("occlusion-progress").hidden = false;
  $("occlusion-panels").innerHTML = "";
  bar.value = 0;
  $("occlusion-text").textContent = "starting…";
  try {
    let job = await api(`/api/images/${imageId}/occlusion`, { method: "POST" });
    while (job.status === "queued" || job.status === "running") {
      bar.value = job.progress;
      $("occlusion-text").textContent = `${Math.round(100 * job.progress)} % ${job.message || ""}`;
      await new Promise((r) => setTimeout(r, 250));
      job = await api(`/api/jobs/${job.id}`);
    }
    if (!state.image || state.image.id !== imageId) return;
    if (job.status === "error") throw new Error(job.error || "occlusion failed");
    bar.value = 1;
    $("occlusion-text").textContent = "done";
    for (const p of job.result.panels) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = p.image; img.alt = p.title;
      const cap = document.createElement("figcaption");
      const strong = document.createElement("strong");
      strong.textContent = p.title;
      cap.append(strong, document.createTextNode(p.caption ? ` ${p.caption}` : ""));
      fig.append(img, cap);
      for (const item of p.legend || []) {
        const key = document.createElement("span");
        key.className = "legend";
        const sw = document.createElement("i");
        sw.style.background = item.color;
        key.append(sw, document.createTextNode(item.label));
        fig.appendChild(key);
      }
      $("occlusion-panels").appendChild(fig);
    }
  } catch (e) {
    $("occlusion-text").textContent = "";
    setStatus(e.message, "error");
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ wiring
function wire() {
  const zone = $("dropzone"), input = $("file-input");
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  for (const type of ["dragenter", "dragover"]) zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) upload(file);
  });
  // a drop outside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("occlusion-run").addEventListener("click", runOcclusion);
  $("scores-run").addEventListener("click", runScores);
  $("wanted-run").addEventListener("click", runWanted);
}

(async function main() {
  wire();
  try {
    await loadModel();
    await loadSources();
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, "error");
  }
})();
