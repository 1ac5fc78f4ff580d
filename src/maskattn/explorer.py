"""The attention explorer: one self-contained HTML page (inline data, CSS and JS, no network).

The reader picks the attention kind, layer and head (or the mean of the heads) and hovers a query
token to see which keys it attends to: lines from the query to every key, as thick and opaque as the
weight, and the key tokens shaded by weight; a heatmap of the whole matrix sits beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maskattn attention explorer</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
header { display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }
select { font: inherit; }
#title { font-weight: 600; margin: 0.8em 0; }
#view { display: flex; gap: 2em; align-items: flex-start; }
svg text { font: 13px ui-monospace, monospace; cursor: default; }
svg text.query:hover, svg text.query.active { fill: #c00; font-weight: 700; }
#heat td { width: 14px; height: 14px; padding: 0; }
#heat th { font: 10px ui-monospace, monospace; font-weight: normal; }
</style></head>
<body>
<h1>Attention explorer</h1>
<header>
  <label>attention <select id="kind"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span>hover a query token (left) to see what it attends to (right)</span>
</header>
<div id="title"></div>
<div id="view"><svg id="lines" width="520" height="100"></svg><table id="heat"></table></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const kinds = [...new Set(DATA.attentions.map((a) => a.kind))];
function fill(select, values, labels) {
  select.innerHTML = "";
  values.forEach((v, i) => { const o = document.createElement("option"); o.value = v;
    o.textContent = labels ? labels[i] : v; select.appendChild(o); });
}
function current() {
  return DATA.attentions.find((a) => a.kind === $("kind").value && String(a.layer) === $("layer").value);
}
function weights(att) {
  const h = $("head").value;
  if (h !== "mean") return att.weights[Number(h)];
  return att.weights[0].map((row, i) => row.map((_, j) =>
    att.weights.reduce((s, w) => s + w[i][j], 0) / att.weights.length));
}
function onKind() {
  const layers = DATA.attentions.filter((a) => a.kind === $("kind").value).map((a) => a.layer);
  fill($("layer"), layers); onLayer();
}
function onLayer() {
  const att = current(), heads = att.weights.map((_, i) => String(i));
  fill($("head"), ["mean", ...heads], ["mean of heads", ...heads.map((h) => "head " + h)]); draw();
}
function draw() {
  const att = current(), w = weights(att), svg = $("lines"), rowH = 22;
  const n = Math.max(att.queries.length, att.keys.length);
  svg.setAttribute("height", n * rowH + 20);
  $("title").textContent = att.name + " \\u2014 " + ($("head").value === "mean" ? "mean of " +
    att.weights.length + " heads" : "head " + $("head").value);
  let out = "";
  att.queries.forEach((_, i) => att.keys.forEach((_, j) => {
    const v = w[i][j]; if (v <= 0) return;
    out += `<line class="link" data-q="${i}" data-k="${j}" data-w="${v}" x1="150" y1="${i * rowH + 16}" ` +
      `x2="370" y2="${j * rowH + 16}" stroke="#1565c0" stroke-opacity="${v}" stroke-width="${1 + 4 * v}"/>`;
  }));
  att.queries.forEach((t, i) => { out += `<text class="query" data-q="${i}" x="140" y="${i * rowH + 20}" ` +
    `text-anchor="end">${esc(t)}</text>`; });
  att.keys.forEach((t, j) => {
    out += `<rect class="keybox" data-k="${j}" data-w="0" x="378" y="${j * rowH + 4}" width="130" ` +
      `height="${rowH - 4}" fill="#1565c0" fill-opacity="0"/>` +
      `<text class="key" data-k="${j}" x="382" y="${j * rowH + 20}">${esc(t)}</text>`;
  });
  svg.innerHTML = out;
  svg.querySelectorAll("text.query").forEach((el) => {
    el.addEventListener("mouseenter", () => focus(w, Number(el.dataset.q)));
  });
  svg.onmouseleave = () => focus(w);
  heat(att, w);
}
function focus(w, active) {
  // Hovering query `active` keeps only its lines and shades every key by its weight.
  const svg = $("lines");
  svg.querySelectorAll("line.link").forEach((el) => {
    el.style.display = active === undefined || Number(el.dataset.q) === active ? "" : "none"; });
  svg.querySelectorAll("text.query").forEach((el) => {
    el.classList.toggle("active", Number(el.dataset.q) === active); });
  svg.querySelectorAll("rect.keybox").forEach((el) => {
    const v = active === undefined ? 0 : w[active][Number(el.dataset.k)];
    el.setAttribute("data-w", v); el.setAttribute("fill-opacity", v); });
}
function heat(att, w) {
  let out = "<tr><th></th>" + att.keys.map((t) => `<th>${esc(t)}</th>`).join("") + "</tr>";
  w.forEach((row, i) => { out += `<tr><th>${esc(att.queries[i])}</th>` + row.map((v) =>
    `<td title="${v.toFixed(3)}" style="background: rgba(21,101,192,${v})"></td>`).join("") + "</tr>"; });
  $("heat").innerHTML = out;
}
function esc(t) { return t.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
fill($("kind"), kinds);
$("kind").onchange = onKind; $("layer").onchange = onLayer; $("head").onchange = () => draw();
onKind();
</script></body></html>
"""


def attention_record(name: str, kind: str, layer: int, weights: Tensor, queries: list[str],
                     keys: list[str]) -> dict[str, Any]:
    """One attention matrix for the page: (H, Lq, Lk) weights and the tokens on both sides."""
    if weights.dim() != 3 or weights.shape[1:] != (len(queries), len(keys)):
        raise ValueError(f"weights must be (H, {len(queries)}, {len(keys)}) for these tokens, got "
                         f"{tuple(weights.shape)}")
    return {"name": name, "kind": kind, "layer": layer, "queries": queries, "keys": keys,
            "weights": [[[round(float(v), 4) for v in row] for row in head] for head in weights.tolist()]}


def write_page(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the explorer page for ``records`` (from :func:`attention_record`)."""
    if not records:
        raise ValueError("no attention to show")
    data = json.dumps({"attentions": records}).replace("</", "<\\/")  # never close the script tag early
    Path(path).write_text(PAGE.replace("__DATA__", data), encoding="utf-8")
    return Path(path)
