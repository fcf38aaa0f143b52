"""``report.html`` of the memory profiler: one self-contained page, no network at view time.

The page embeds the profile as JSON and a small hand-written script that draws, as inline SVG, a
sunburst per category (rings: model -> blocks -> block -> attention / feed_forward -> linears; each
sector's angle is its subtree's bytes; hovering names it) and a bar per timeline point (total
bytes after each phase of each profiled step, its breakdown on hover).  Sectors carry the class
``sector`` and bars ``bar``, which is what the headless-browser test counts.
"""

from __future__ import annotations

import html
import json

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
.chart { border: 1px solid #ddd; padding: .5em; }
.chart h2 { font-size: 1em; margin: .2em 0; }
.sector { stroke: #fff; stroke-width: .6; cursor: pointer; }
.sector:hover, .bar:hover { opacity: .7; }
#info { font-family: monospace; min-height: 1.4em; margin: .5em 0; }
"""

_SCRIPT = r"""
const data = JSON.parse(document.getElementById("profile").textContent);
const info = document.getElementById("info");
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function human(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 2 : 0) + " " + u[i];
}
function buildTree(cat) {
  const root = {name: "", value: 0, children: new Map()};
  for (const [name, row] of Object.entries(data.modules)) {
    const v = row[cat];
    if (!v) continue;
    let node = root; const path = [];
    root.value += v;
    for (const part of name.split(".")) {
      path.push(part);
      if (!node.children.has(part))
        node.children.set(part, {name: path.join("."), value: 0, children: new Map()});
      node = node.children.get(part);
      node.value += v;
    }
  }
  return root;
}
function arc(r0, r1, a0, a1) {
  const big = a1 - a0 > Math.PI ? 1 : 0;
  if (a1 - a0 >= 2 * Math.PI - 1e-9) a1 = a0 + 2 * Math.PI - 1e-4;
  const p = (r, a) => [r * Math.sin(a), -r * Math.cos(a)].map(x => x.toFixed(2)).join(" ");
  return "M" + p(r1, a0) + "A" + r1 + " " + r1 + " 0 " + big + " 1 " + p(r1, a1) +
         "L" + p(r0, a1) + "A" + r0 + " " + r0 + " 0 " + big + " 0 " + p(r0, a0) + "Z";
}
function sunburst(cat, parent) {
  const root = buildTree(cat), ring = 38, size = 2 * ring * 6 + 20;
  const box = document.createElement("div"); box.className = "chart"; box.id = "chart-" + cat;
  box.innerHTML = "<h2>" + cat + ": " + human(data.total[cat]) + "</h2>";
  parent.appendChild(box);
  const svg = el("svg", {width: size, height: size,
                         viewBox: (-size / 2) + " " + (-size / 2) + " " + size + " " + size}, box);
  el("circle", {r: ring - 2, fill: "#f4f4f4"}, svg);
  const label = el("text", {"text-anchor": "middle", dy: "0.35em", "font-size": 11}, svg);
  label.textContent = root.value ? human(root.value) : "none";
  function draw(node, a0, a1, depth, hue) {
    let a = a0, i = 0;
    for (const child of node.children.values()) {
      const span = (a1 - a0) * child.value / node.value;
      const h = depth === 0 ? (i * 67) % 360 : hue;
      const path = el("path", {d: arc(ring * (depth + 1), ring * (depth + 2) - 1, a, a + span),
                               fill: "hsl(" + h + ",60%," + (45 + 8 * depth) + "%)",
                               class: "sector", "data-name": child.name}, svg);
      const text = child.name + ": " + human(child.value) + " (" +
                   (100 * child.value / root.value).toFixed(1) + "%)";
      el("title", {}, path).textContent = text;
      path.addEventListener("mouseover", () => { info.textContent = cat + " | " + text; });
      draw(child, a, a + span, depth + 1, h);
      a += span; i++;
    }
  }
  if (root.value) draw(root, 0, 2 * Math.PI, 0, 0);
}
function timeline(parent) {
  const pts = data.timeline, w = Math.max(300, 14 * pts.length + 60), h = 260;
  const box = document.createElement("div"); box.className = "chart"; box.id = "timeline";
  box.innerHTML = "<h2>timeline: total bytes after each phase</h2>";
  parent.appendChild(box);
  const svg = el("svg", {width: w, height: h}, box);
  const top = Math.max(1, ...pts.map(p => p.total));
  const bw = (w - 60) / Math.max(1, pts.length);
  pts.forEach((p, i) => {
    const bh = (h - 40) * p.total / top;
    const bar = el("rect", {x: 50 + i * bw, y: h - 20 - bh, width: Math.max(1, bw - 2),
                            height: bh, class: "bar",
                            fill: p.phase.startsWith("forward") ? "#4a90d9" :
                                  p.phase.startsWith("backward") ? "#d9824a" : "#6aa84f"}, svg);
    const text = "step " + p.step + " " + p.phase + ": " + human(p.total) + " (activations " +
                 human(p.activations) + ", grads " + human(p.grads) + ")";
    el("title", {}, bar).textContent = text;
    bar.addEventListener("mouseover", () => { info.textContent = text; });
  });
  el("text", {x: 2, y: 14, "font-size": 10}, svg).textContent = human(top);
}
const charts = document.getElementById("charts");
for (const cat of CATEGORIES) sunburst(cat, charts);
timeline(charts);
"""


def render_html(result: dict) -> str:
    """The whole page for one rank's profile (``MemoryProfiler.result()``; its categories are
    the keys of ``result["total"]``, so this module needs nothing from the profiler's)."""
    categories = list(result["total"])
    payload = json.dumps(result).replace("</", "<\\/")
    rows = "".join(f"<tr><td>{c}</td><td>{result['total'][c]:,}</td></tr>" for c in categories)
    script = _SCRIPT.replace("CATEGORIES", json.dumps(categories))
    title = f"memory of rank {result['rank']} ({html.escape(str(result.get('layout', '')))})"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
            f"<table><tr><th>category</th><th>bytes</th></tr>{rows}</table>"
            f"<div id='info'>hover a sector or a bar</div><div id='charts' class='charts'></div>"
            f"<script id='profile' type='application/json'>{payload}</script>"
            f"<script>{script}</script></body></html>")
