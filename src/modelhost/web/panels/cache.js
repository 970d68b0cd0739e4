// The cache: each installed model's share of it, and the disk it lives on.

import { $, el, mb } from "../ui.js";
import { state } from "../state.js";

const COLORS = ["#3b6ea8", "#c0713b", "#4c9a5f", "#8a5aa8", "#b8a23a", "#3aa8a0", "#a83b5a"];
const SVG = "http://www.w3.org/2000/svg";

export function render() {
  const cache = state.cache;
  if (!cache) return;
  const svg = $("cache-chart"), legend = $("cache-legend");
  svg.replaceChildren(); legend.replaceChildren();
  const total = cache.installed_models.reduce((sum, m) => sum + m.size_bytes, 0) || 1;
  let x = 0;
  cache.installed_models.forEach((m, i) => {
    const color = COLORS[i % COLORS.length], width = (100 * m.size_bytes) / total;
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", x + "%"); rect.setAttribute("width", Math.max(width, 0.3) + "%");
    rect.setAttribute("y", 0); rect.setAttribute("height", "100%"); rect.setAttribute("fill", color);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${m.name}: ${mb(m.size_bytes)}`;
    rect.appendChild(title); svg.appendChild(rect);
    x += width;
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = color;
    legend.append(el("li", { dataset: { name: m.name } }, swatch, `${m.name} ${mb(m.size_bytes)}`));
  });
  const partial = cache.partial_bytes ? ` · ${mb(cache.partial_bytes)} in unfinished downloads` : "";
  $("cache-summary").textContent = `${cache.total_models} model${cache.total_models === 1 ? "" : "s"}, ${mb(cache.total_size_bytes)} in ${cache.cache_directory}${partial}`;
  const used = cache.disk_total_bytes - cache.disk_free_bytes;
  $("cache-disk").value = cache.disk_total_bytes ? (100 * used) / cache.disk_total_bytes : 0;
  $("cache-disk-text").textContent = `Disk: ${mb(used)} used of ${mb(cache.disk_total_bytes)}, ${mb(cache.disk_free_bytes)} free`;
}
