// Small inline SVG charts: a line over time (sparkline) and bars (a histogram). No library.

const NS = "http://www.w3.org/2000/svg";

function svg(width, height, label) {
  const el = document.createElementNS(NS, "svg");
  el.setAttribute("viewBox", `0 0 ${width} ${height}`);
  el.setAttribute("preserveAspectRatio", "none");
  el.setAttribute("role", "img");
  el.setAttribute("aria-label", label);
  return el;
}

/** A line chart of `points` ([t, value] pairs) over the last `windowS` seconds. */
export function lineChart(points, { windowS = 600, label = "" } = {}) {
  const width = 300, height = 70, pad = 3;
  const el = svg(width, height, label);
  const values = points.map((p) => p[1]).filter((v) => typeof v === "number");
  if (!values.length) return el;
  const now = points[points.length - 1][0];
  const max = Math.max(...values, 1e-9);
  const x = (t) => width - ((now - t) / windowS) * width;
  const y = (v) => height - pad - (v / max) * (height - 2 * pad);
  const drawn = points.filter((p) => typeof p[1] === "number" && now - p[0] <= windowS);
  const line = drawn.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const area = document.createElementNS(NS, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `${x(drawn[0][0]).toFixed(1)},${height} ${line} ${width},${height}`);
  const poly = document.createElementNS(NS, "polyline");
  poly.setAttribute("class", "line");
  poly.setAttribute("points", line);
  el.append(area, poly);
  return el;
}

/** A bar chart of `[[label, count], ...]`. */
export function barChart(bins, { label = "" } = {}) {
  const width = 300, height = 70;
  const el = svg(width, height, label);
  const max = Math.max(...bins.map((b) => b[1]), 1);
  const w = width / Math.max(bins.length, 1);
  bins.forEach(([name, count], i) => {
    const h = (count / max) * (height - 4);
    const bar = document.createElementNS(NS, "rect");
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", (i * w + 1).toFixed(1));
    bar.setAttribute("y", (height - h).toFixed(1));
    bar.setAttribute("width", Math.max(w - 2, 1).toFixed(1));
    bar.setAttribute("height", h.toFixed(1));
    const title = document.createElementNS(NS, "title");
    title.textContent = `≤ ${name}: ${count}`;
    bar.append(title);
    el.append(bar);
  });
  return el;
}
