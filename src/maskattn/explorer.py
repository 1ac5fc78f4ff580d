"""The attention explorer: one self-contained HTML page (inline data, CSS and JS, no network).

The reader picks the attention kind, layer and head (or the mean of the heads) and hovers a query
token to see which keys it attends to: lines from the query to every key, as thick and opaque as the
weight, and the key tokens shaded by weight; a heatmap of the whole matrix sits beside it. Masked keys
(weight exactly 0) are grey, apart from allowed weights too small for the page's rounding ("<0.002").
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskattn.io import atomic_write_text

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maskattn attention explorer</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
header { display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }
select { font: inherit; }
#title { font-weight: 600; margin: 0.8em 0; }
#view { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
#lines { flex: none; }
#heatbox { flex: none; max-width: 100%; overflow-x: auto; }
svg text { font: 13px ui-monospace, monospace; cursor: default; }
svg text.query:hover, svg text.query.active { fill: #c00; font-weight: 700; }
#heat { border-collapse: collapse; }
#heat td { padding: 0; }
#heat th { font: 10px ui-monospace, monospace; font-weight: normal; padding: 0 2px; white-space: pre; }
#heat th.col { writing-mode: vertical-rl; padding: 2px 0; max-width: 14px; overflow: hidden; }
#note { color: #555; font-size: 12px; }
</style></head>
<body>
<h1>Attention explorer</h1>
<header>
  <label>attention <select id="kind"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span>hover a query token (left) to see what it attends to (right)</span>
</header>
<p id="note">__NOTE__</p>
<div id="title"></div>
<div id="view"><svg id="lines" width="520" height="100"></svg><div id="heatbox"><table id="heat"></table></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const kinds = [...new Set(DATA.attentions.map((a) => a.kind))];
const LEVELS = DATA.levels;  // weights travel as bytes: round(w * LEVELS), base64
function decode(att) {
  // (H, Lq, Lk) nested arrays of weights, decoded once per attention.
  if (att.decoded) return att.decoded;
  const bytes = Uint8Array.from(atob(att.weights), (c) => c.charCodeAt(0));
  const lq = att.queries.length, lk = att.keys.length;
  att.decoded = Array.from({length: att.heads}, (_, h) => Array.from({length: lq}, (_, i) =>
    Array.from(bytes.subarray((h * lq + i) * lk, (h * lq + i + 1) * lk), (b) => b / LEVELS)));
  return att.decoded;
}
function decodeMasked(att) {
  // (H, Lq, Lk) nested arrays of booleans: the keys the mask hides (bits, most significant first).
  if (att.maskedDecoded) return att.maskedDecoded;
  const bytes = Uint8Array.from(atob(att.masked), (c) => c.charCodeAt(0));
  const lq = att.queries.length, lk = att.keys.length, bit = (n) => (bytes[n >> 3] >> (7 - (n & 7))) & 1;
  att.maskedDecoded = Array.from({length: att.heads}, (_, h) => Array.from({length: lq}, (_, i) =>
    Array.from({length: lk}, (_, j) => bit((h * lq + i) * lk + j) === 1)));
  return att.maskedDecoded;
}
function hidden(att) {  // masked in the head shown (the mean: in every head)
  const h = $("head").value, all = decodeMasked(att);
  if (h !== "mean") return all[Number(h)];
  return all[0].map((row, i) => row.map((_, j) => all.every((m) => m[i][j])));
}
function shown(v, masked) { return masked ? "masked" : v === 0 ? "<" + DATA.tiny : v.toFixed(3); }
function fill(select, values, labels) {
  select.innerHTML = "";
  values.forEach((v, i) => { const o = document.createElement("option"); o.value = v;
    o.textContent = labels ? labels[i] : v; select.appendChild(o); });
}
function current() {
  return DATA.attentions.find((a) => a.kind === $("kind").value && String(a.layer) === $("layer").value);
}
function weights(att) {
  const h = $("head").value, all = decode(att);
  if (h !== "mean") return all[Number(h)];
  return all[0].map((row, i) => row.map((_, j) => all.reduce((s, w) => s + w[i][j], 0) / all.length));
}
function onKind() {
  const layers = DATA.attentions.filter((a) => a.kind === $("kind").value).map((a) => a.layer);
  fill($("layer"), layers); onLayer();
}
function onLayer() {
  const att = current(), heads = Array.from({length: att.heads}, (_, i) => String(i));
  fill($("head"), ["mean", ...heads], ["mean of heads", ...heads.map((h) => "head " + h)]); draw();
}
function textWidth(tokens) {  // px of the longest label in the 13px monospace font (about 8 px a character)
  return 16 + 8 * Math.min(24, Math.max(1, ...tokens.map((t) => t.length)));
}
let layout = null;
function draw() {
  const att = current(), w = weights(att), m = hidden(att), svg = $("lines");
  const n = Math.max(att.queries.length, att.keys.length), rowH = n > 64 ? 16 : 22;
  const qw = textWidth(att.queries), kw = textWidth(att.keys), gap = 220;
  layout = {rowH, x1: qw, x2: qw + gap, width: qw + gap + kw + 12};
  svg.setAttribute("width", layout.width);
  svg.setAttribute("height", n * rowH + 20);
  $("title").textContent = att.name + " \\u2014 " + ($("head").value === "mean" ? "mean of " +
    att.heads + " heads" : "head " + $("head").value);
  let out = '<g id="links">' + links(w) + "</g>";
  att.queries.forEach((t, i) => { out += `<text class="query" data-q="${i}" x="${qw - 10}" ` +
    `y="${i * rowH + rowH - 2}" text-anchor="end">${esc(short(t))}</text>`; });
  att.keys.forEach((t, j) => {
    out += `<rect class="keybox" data-k="${j}" data-w="0" x="${layout.x2 + 8}" y="${j * rowH + 4}" ` +
      `width="${kw}" height="${rowH - 4}" fill="#1565c0" fill-opacity="0"/>` +
      `<text class="key" data-k="${j}" x="${layout.x2 + 12}" y="${j * rowH + rowH - 2}">${esc(short(t))}</text>`;
  });
  svg.innerHTML = out;
  svg.querySelectorAll("text.query").forEach((el) => {
    el.addEventListener("mouseenter", () => focus(w, m, Number(el.dataset.q)));
  });
  svg.onmouseleave = () => focus(w, m);
  heat(att, w, m);
}
function links(w, only) {
  // Lines from queries to keys, as thick and opaque as the weight: every weight of the hovered query,
  // and in the overview of a long input only those of at least 0.05 (thousands of faint lines hide all).
  const floor = only === undefined && w.length > 64 ? 0.05 : 0;
  let out = "";
  w.forEach((row, i) => { if (only !== undefined && i !== only) return; row.forEach((v, j) => {
    if (v <= floor) return;
    out += `<line class="link" data-q="${i}" data-k="${j}" data-w="${v}" x1="${layout.x1}" ` +
      `y1="${i * layout.rowH + layout.rowH / 2 + 4}" x2="${layout.x2}" y2="${j * layout.rowH + layout.rowH / 2 + 4}" ` +
      `stroke="#1565c0" stroke-opacity="${v}" stroke-width="${1 + 4 * v}"/>`; }); });
  return out;
}
function focus(w, m, active) {
  // Hovering query `active` keeps only its lines and shades every key by its weight (masked keys grey).
  const svg = $("lines");
  svg.querySelector("#links").innerHTML = links(w, active);
  svg.querySelectorAll("text.query").forEach((el) => {
    el.classList.toggle("active", Number(el.dataset.q) === active); });
  svg.querySelectorAll("rect.keybox").forEach((el) => {
    const k = Number(el.dataset.k), v = active === undefined ? 0 : w[active][k];
    const masked = active !== undefined && m[active][k];
    el.setAttribute("data-w", v); el.setAttribute("data-masked", masked ? "1" : "0");
    el.setAttribute("fill", masked ? "#9e9e9e" : "#1565c0"); el.setAttribute("fill-opacity", masked ? 0.35 : v); });
}
function heat(att, w, m) {
  // The whole matrix; cells shrink with the length so that it stays about 600 px wide, and beyond 64 tokens
  // the labels move into tooltips (they would stretch the cells). Masked keys are grey.
  const n = Math.max(att.queries.length, att.keys.length), cell = Math.max(3, Math.min(14, Math.floor(600 / n)));
  const label = (t) => n > 64 ? "" : esc(short(t));
  let out = "<tr><th></th>" + att.keys.map((t) => `<th class="col" title="${esc(t)}">${label(t)}</th>`).join("") +
    "</tr>";
  w.forEach((row, i) => { out += `<tr style="height:${cell}px"><th title="${esc(att.queries[i])}">` +
    `${label(att.queries[i])}</th>` +
    row.map((v, j) => `<td title="${shown(v, m[i][j])}" style="width:${cell}px;height:${cell}px;` +
    `background:${m[i][j] ? "#d6d6d6" : `rgba(21,101,192,${v})`}"></td>`).join("") + "</tr>"; });
  $("heat").innerHTML = out;
}
function short(t) { return t.length > 24 ? t.slice(0, 23) + "\\u2026" : t; }
function esc(t) { return t.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
fill($("kind"), kinds);
$("kind").onchange = onKind; $("layer").onchange = onLayer; $("head").onchange = () => draw();
onKind();
</script></body></html>
"""

LEVELS = 255  # weights are embedded as round(w * LEVELS) bytes: 1.33 characters a weight in base64
TINY = f"{0.5 / LEVELS:.3f}"  # allowed weights below 0.5 / LEVELS embed as 0: the page shows them as "<0.002"
NOTE = (f"Weights are stored rounded to steps of 1/{LEVELS} (about {1 / LEVELS:.3f}): an allowed weight below "
        f"{TINY} shows as &lt;{TINY}; grey cells and keys are masked (weight exactly 0).")

# JSON inside <script> must not contain "</script", "<!--" (which switches the HTML parser into a mode where
# "<script>" nests) nor the line separators some parsers reject: escape them as JSON \\u escapes.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                              "\u2029": "\\u2029"})


def attention_record(name: str, kind: str, layer: int, weights: Tensor, queries: list[str],
                     keys: list[str]) -> dict[str, Any]:
    """One attention matrix for the page: (H, Lq, Lk) weights, quantised to ``LEVELS`` steps and
    base64-encoded bytes, which keys are masked (weight exactly 0: what a mask gives a key it hides; an
    allowed weight is 0 only below float32's range, e**-103 of its row's largest), as base64 bits, and the
    tokens on both sides."""
    if weights.dim() != 3 or weights.shape[1:] != (len(queries), len(keys)):
        raise ValueError(f"weights must be (H, {len(queries)}, {len(keys)}) for these tokens, got "
                         f"{tuple(weights.shape)}")
    weights = weights.detach().float().cpu()
    levels = (weights.clamp(0, 1) * LEVELS).round().to(torch.uint8)  # (H, Lq, Lk)
    masked = np.packbits((weights == 0).numpy().ravel())  # 1 bit a weight, most significant first
    return {"name": name, "kind": kind, "layer": layer, "queries": queries, "keys": keys,
            "heads": int(weights.shape[0]), "weights": base64.b64encode(levels.numpy().tobytes()).decode("ascii"),
            "masked": base64.b64encode(masked.tobytes()).decode("ascii")}


def decode_weights(record: dict[str, Any]) -> list[list[list[float]]]:
    """The (H, Lq, Lk) weights of a record as the page shows them (multiples of 1 / LEVELS)."""
    raw = base64.b64decode(record["weights"])
    heads, lq, lk = record["heads"], len(record["queries"]), len(record["keys"])
    return [[[raw[(h * lq + i) * lk + j] / LEVELS for j in range(lk)] for i in range(lq)] for h in range(heads)]


def write_page(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the explorer page for ``records`` (from :func:`attention_record`)."""
    if not records:
        raise ValueError("no attention to show")
    data = json.dumps({"levels": LEVELS, "tiny": TINY, "attentions": records}).translate(_SCRIPT_SAFE)
    page = PAGE.replace("__NOTE__", NOTE).replace("__DATA__", data)
    return atomic_write_text(path, page)  # a kill while writing keeps the old page
