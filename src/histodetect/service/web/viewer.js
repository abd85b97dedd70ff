// The slide viewer: the list of analysed slides, and one slide in OpenSeadragon with its
// layers. Plain JS, no build step; OpenSeadragon comes from the server's own pinned copy.
"use strict";

const KEY_STORE = "histodetect-api-key"; // shared with the service's page
const SVG_NS = "http://www.w3.org/2000/svg";
const OSD_MISSING =
  "OpenSeadragon did not load from this server (/vendor/openseadragon): run `make install` " +
  "where histodetect is installed, then restart it.";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let viewer = null;
let detail = null; // GET /v1/slides/{id} of the open slide
const layers = {}; // "slide" | "tissue" | "map" -> OpenSeadragon TiledImage
let vectors = null; // the SVG over the viewer: {svg, root, regions, annotations, detections}
let animating = false;
let cursorTracker = null; // on the viewer's element, which the next slide's viewer reuses
const reported = new Set();

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this server needs its API key: enter it above");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.detail) || `${path}: HTTP ${response.status}`);
  return body;
}

function showProblem(text) {
  if (reported.has(text)) return;
  reported.add(text);
  const li = document.createElement("li");
  li.textContent = text;
  $("problems").appendChild(li);
  $("problems").hidden = false;
}

function clearProblems() {
  reported.clear();
  $("problems").replaceChildren();
  $("problems").hidden = true;
}

// ----------------------------------------------------------------------------- the list

const thumbnails = new IntersectionObserver((seen) => {
  // Thumbnails load as rows scroll into view: a folder of many slides lists at once.
  for (const item of seen) {
    if (!item.isIntersecting) continue;
    thumbnails.unobserve(item.target);
    loadThumbnail(item.target);
  }
});

async function loadThumbnail(img) {
  try {
    const response = await fetch(img.dataset.src, { headers: headers() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    img.src = URL.createObjectURL(await response.blob());
  } catch (err) {
    img.alt = "no thumbnail";
  }
}

async function showList() {
  $("viewer-view").hidden = true;
  $("list-view").hidden = false;
  document.body.dataset.view = "list";
  if (cursorTracker) cursorTracker.destroy();
  cursorTracker = null;
  if (viewer) {
    viewer.destroy();
    viewer = null;
  }
  let data;
  try {
    data = await api("/v1/slides");
  } catch (err) {
    $("list-status").textContent = String(err.message);
    $("list-status").classList.add("error");
    return;
  }
  if (data.openseadragon_problem) showProblem(data.openseadragon_problem);
  const rows = data.slides.slice().sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
  const body = $("slide-table").querySelector("tbody");
  body.replaceChildren();
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.dataset.slide = s.id;
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    thumb.alt = "";
    if (s.has_thumbnail) {
      thumb.dataset.src = `/v1/slides/${encodeURIComponent(s.id)}/thumbnail.jpg`;
      thumbnails.observe(thumb);
    }
    const link = document.createElement("a");
    link.href = `#slide=${encodeURIComponent(s.id)}`;
    link.textContent = s.name;
    const name = document.createElement("td");
    name.append(link);
    if (s.synthetic) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = "SYNTHETIC";
      tag.title = s.warning || "";
      name.append(" ", tag);
    }
    const cells = [
      fmt(s.score),
      s.n_regions ?? "–",
      fmt(s.tissue_area_mm2, 2),
      fmt(s.tumour_area_mm2, 3),
      s.out_of_scope_share === null ? "–" : `${(100 * s.out_of_scope_share).toFixed(0)} %`,
    ].map((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = "num";
      return td;
    });
    const first = document.createElement("td");
    first.append(thumb);
    tr.append(first, name, ...cells);
    tr.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") location.hash = link.getAttribute("href");
    });
    body.append(tr);
  }
  $("list-status").textContent = `${rows.length} slide(s)`;
  document.body.dataset.list = "ready";
}

// ----------------------------------------------------------------------------- one slide

function dzi(info, layer) {
  // An inline Deep Zoom descriptor: no XML fetch, and every tile request carries the key.
  return {
    Image: {
      xmlns: "http://schemas.microsoft.com/deepzoom/2008",
      Url: `/v1/slides/${encodeURIComponent(detail.id)}/tiles/${layer}/`,
      Format: info.format,
      Overlap: String(info.overlap),
      TileSize: String(info.tile_size),
      Size: { Width: String(info.width), Height: String(info.height) },
    },
  };
}

function addLayer(name, info, opacity) {
  return new Promise((resolve, reject) => {
    viewer.addTiledImage({
      tileSource: dzi(info, name),
      x: 0,
      y: 0,
      width: 1, // every layer spans the same world rectangle: aligned at every zoom
      opacity,
      success: (event) => {
        layers[name] = event.item;
        resolve(event.item);
      },
      error: (event) => reject(new Error(`${name} layer: ${event.message}`)),
    });
  });
}

function mapOpacity() {
  return $("layer-map").checked ? Number($("map-opacity").value) / 100 : 0;
}

function applyLayers() {
  if (layers.slide) layers.slide.setOpacity($("layer-slide").checked ? 1 : 0);
  if (layers.map) layers.map.setOpacity(mapOpacity());
  if (layers.tissue) layers.tissue.setOpacity($("layer-tissue").checked ? 1 : 0);
  if (vectors) {
    for (const name of ["regions", "annotations", "detections"]) {
      vectors[name].style.display = $(`layer-${name}`).checked ? "" : "none";
    }
  }
}

function pathOf(polygon) {
  return polygon
    .map((ring) => "M" + ring.map(([x, y]) => `${x} ${y}`).join("L") + "Z")
    .join("");
}

function addPolygons(group, polygons, className) {
  for (const polygon of polygons) {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", pathOf(polygon));
    path.setAttribute("class", className);
    group.append(path);
  }
}

function buildVectors() {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "vectors");
  const root = document.createElementNS(SVG_NS, "g");
  svg.append(root);
  const group = (name) => {
    const g = document.createElementNS(SVG_NS, "g");
    g.setAttribute("class", name);
    root.append(g);
    return g;
  };
  vectors = { svg, root, annotations: group("annotations"), regions: group("regions"),
    detections: group("detections") };
  for (const r of detail.regions) {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", pathOf(r.rings));
    path.setAttribute("class", "region");
    path.dataset.region = r.id;
    vectors.regions.append(path);
  }
  if (detail.annotation) {
    addPolygons(vectors.annotations, detail.annotation.tumour, "annotation");
    addPolygons(vectors.annotations, detail.annotation.exclusions, "exclusion");
    for (const [x, y] of detail.annotation.dots) {
      const c = document.createElementNS(SVG_NS, "circle");
      c.setAttribute("cx", x);
      c.setAttribute("cy", y);
      c.setAttribute("class", "annotation-dot");
      vectors.annotations.append(c);
    }
  }
  for (const d of detail.detections || []) {
    const c = document.createElementNS(SVG_NS, "circle");
    c.setAttribute("cx", d.x);
    c.setAttribute("cy", d.y);
    c.setAttribute("class", "detection");
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `detection, confidence ${d.confidence.toFixed(3)}`;
    c.append(title);
    vectors.detections.append(c);
  }
  $("stage").append(svg);
}

function firstItem() {
  return viewer && viewer.world.getItemCount() ? viewer.world.getItemAt(0) : null;
}

// Screen px per level-0 px now (1 = full resolution).
function imageZoom() {
  const item = firstItem();
  return item ? item.viewportToImageZoom(viewer.viewport.getZoom(true)) : 1;
}

function niceLength(um) {
  const p = 10 ** Math.floor(Math.log10(um));
  for (const m of [5, 2, 1]) if (m * p <= um) return m * p;
  return p;
}

function onViewportChange() {
  const item = firstItem();
  if (!item) return;
  // The SVG follows the slide: level-0 px -> element px is one translate and one scale.
  const p0 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const p1 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
  const s = (p1.x - p0.x) / 1000;
  vectors.root.setAttribute("transform", `translate(${p0.x} ${p0.y}) scale(${s})`);
  for (const c of vectors.svg.querySelectorAll("circle")) c.setAttribute("r", 6 / s);
  const zoom = imageZoom();
  $("zoom").textContent = `zoom ${(100 * zoom).toFixed(zoom < 0.1 ? 1 : 0)} % of full resolution`;
  const mpp = detail.mpp;
  const bar = $("scalebar");
  if (!mpp) {
    bar.hidden = true;
    return;
  }
  bar.hidden = false;
  const umPerPx = mpp / zoom;
  const um = niceLength(130 * umPerPx);
  bar.querySelector(".bar").style.width = `${um / umPerPx}px`;
  bar.querySelector(".label").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

function selectRegion(r) {
  const item = firstItem();
  if (!item) return;
  const [x0, y0, x1, y1] = r.box;
  const pad = 0.3 * Math.max(x1 - x0, y1 - y0) + 2 * (detail.cell_px || 0);
  const rect = item.imageToViewportRectangle(x0 - pad, y0 - pad, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad);
  viewer.viewport.fitBounds(rect);
  for (const el of document.querySelectorAll("[data-region].selected")) el.classList.remove("selected");
  for (const el of document.querySelectorAll(`[data-region="${CSS.escape(r.id)}"]`)) {
    el.classList.add("selected");
  }
  document.body.dataset.region = r.id;
}

function fillSidebar() {
  const body = $("region-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of detail.regions) {
    const tr = document.createElement("tr");
    tr.dataset.region = r.id;
    for (const text of [r.id, fmt(r.max_prob), fmt(r.mean_prob), fmt(r.area_mm2, 4),
      fmt(r.longest_diameter_mm, 2)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.title = "zoom to this region";
    tr.addEventListener("click", () => selectRegion(r));
    body.append(tr);
  }
  $("region-count").textContent = `(${detail.regions.length}, most probable first` +
    (detail.threshold !== null ? `; P ≥ ${fmt(detail.threshold, 2)})` : ")");
  const files = $("files");
  files.replaceChildren();
  const labels = {
    "regions.geojson": "regions.geojson (import into QuPath)",
    "regions.csv": "regions.csv",
    "summary.json": "summary.json",
    "overlay.png": "overlay.png",
  };
  for (const name of detail.files) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `/v1/slides/${encodeURIComponent(detail.id)}/files/${name}`;
    a.textContent = labels[name] || name;
    a.addEventListener("click", (e) => {
      if (!apiKey) return; // a plain link works; with a key the request needs the header
      e.preventDefault();
      fetch(a.href, { headers: headers() })
        .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
        .then((blob) => window.open(URL.createObjectURL(blob), "_blank"))
        .catch((err) => showProblem(`${name}: ${err.message}`));
    });
    li.append(a);
    files.append(li);
  }
  const notes = $("notes");
  notes.replaceChildren();
  const addNote = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    notes.append(li);
  };
  if (detail.annotation) {
    addNote(`annotation: ${detail.annotation.file} (${detail.annotation.tumour.length} tumour outline(s))`);
    for (const n of detail.annotation.notes) addNote(`annotation: ${n}`);
  }
  if (detail.detections) addNote(`${detail.detections.length} slide-eval detection(s)`);
  const ramp = detail.legend
    .map((s) => `rgb(${s.rgba[0]},${s.rgba[1]},${s.rgba[2]}) ${100 * s.p}%`)
    .join(", ");
  $("legend").querySelector(".ramp").style.background = `linear-gradient(to right, ${ramp})`;
  $("legend-note").textContent =
    "drawn 25 % (P = 0) to 75 % (P = 1) opaque on analysed tissue, clear elsewhere";
  for (const [name, has] of [["annotations", !!detail.annotation], ["detections", !!detail.detections]]) {
    const box = $(`layer-${name}`);
    box.disabled = !has;
    box.parentElement.title = has ? "" : name === "annotations"
      ? "no annotation for this slide (start the viewer with --annotations DIR)"
      : "no detections: run histodetect slide-eval on this folder";
  }
}

async function openSlide(id) {
  $("list-view").hidden = true;
  $("viewer-view").hidden = false;
  document.body.dataset.view = "slide";
  delete document.body.dataset.viewer;
  delete document.body.dataset.region;
  if (viewer) {
    viewer.destroy();
    viewer = null;
  }
  if (cursorTracker) cursorTracker.destroy();
  cursorTracker = null;
  if (vectors) vectors.svg.remove();
  vectors = null;
  for (const k of Object.keys(layers)) delete layers[k];
  if (!window.OpenSeadragon) {
    showProblem(OSD_MISSING);
    return;
  }
  try {
    detail = await api(`/v1/slides/${encodeURIComponent(id)}`);
  } catch (err) {
    showProblem(err.message);
    return;
  }
  $("slide-name").textContent = detail.name;
  $("slide-warning").hidden = !detail.warning;
  $("slide-warning").textContent = detail.warning || "";
  for (const p of detail.problems) showProblem(p);
  fillSidebar();
  viewer = OpenSeadragon({
    element: $("osd"),
    prefixUrl: "/vendor/openseadragon/images/",
    drawer: "canvas",
    loadTilesWithAjax: true,
    ajaxHeaders: headers(),
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    showRotationControl: false,
    showFullPageControl: false,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    timeout: 60000,
    gestureSettingsMouse: { clickToZoom: false },
  });
  window.histodetect.viewer = viewer;
  viewer.addHandler("animation-start", () => { animating = true; });
  viewer.addHandler("animation-finish", () => { animating = false; });
  viewer.addHandler("tile-load-failed", (event) => {
    // Ask once for the server's own words on why (its JSON detail), then show them.
    const url = event.tile && event.tile.getUrl ? event.tile.getUrl() : null;
    const key = url ? url.split("/tiles/")[1].split("/")[0] : "tile";
    if (reported.has(`failed:${key}`)) return;
    reported.add(`failed:${key}`);
    if (!url) return showProblem(`a ${key} tile could not be loaded: ${event.message}`);
    fetch(url, { headers: headers() })
      .then((r) => r.json())
      .then((body) => showProblem(`${key} tiles: ${body.detail}`))
      .catch(() => showProblem(`a ${key} tile could not be loaded: ${event.message}`));
  });
  try {
    if (detail.slide) await addLayer("slide", detail.slide, $("layer-slide").checked ? 1 : 0);
    if (detail.layers) {
      await addLayer("tissue", detail.layers, $("layer-tissue").checked ? 1 : 0);
      await addLayer("map", detail.layers, mapOpacity());
    }
  } catch (err) {
    showProblem(err.message);
  }
  if (!firstItem()) return;
  buildVectors();
  applyLayers();
  viewer.addHandler("update-viewport", onViewportChange);
  onViewportChange();
  cursorTracker = new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: (event) => {
      const item = firstItem();
      if (!item) return;
      const p = item.viewerElementToImageCoordinates(event.position);
      let text = `x ${Math.round(p.x)}, y ${Math.round(p.y)} px (level 0)`;
      if (detail.mpp) text += ` = ${(p.x * detail.mpp / 1000).toFixed(3)}, ${(p.y * detail.mpp / 1000).toFixed(3)} mm`;
      $("cursor").textContent = text;
    },
  });
  document.body.dataset.viewer = "ready";
}

// For tests and the curious: the viewer, its layers, and whether drawing has settled.
window.histodetect = {
  viewer: null,
  layers,
  detail: () => detail,
  idle: () => {
    if (!viewer || animating) return false;
    return Object.values(layers).every((item) => item.getOpacity() === 0 || item.getFullyLoaded());
  },
  fullResolution: () => {
    const item = firstItem();
    viewer.viewport.zoomTo(item.imageToViewportZoom(1));
  },
};

// ----------------------------------------------------------------------------- wiring

function route() {
  const found = location.hash.match(/^#slide=(.+)$/);
  if (found) openSlide(decodeURIComponent(found[1]));
  else showList();
}

for (const id of ["layer-slide", "layer-map", "layer-tissue", "layer-regions",
  "layer-annotations", "layer-detections"]) {
  $(id).addEventListener("change", applyLayers);
}
$("map-opacity").addEventListener("input", applyLayers);
$("home").addEventListener("click", () => viewer && viewer.viewport.goHome());
$("full-res").addEventListener("click", () => viewer && window.histodetect.fullResolution());
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  $("key-form").hidden = true;
  clearProblems();
  route();
});
window.addEventListener("hashchange", () => {
  clearProblems();
  route();
});
if (!window.OpenSeadragon) showProblem(OSD_MISSING);
route();
