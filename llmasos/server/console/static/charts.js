/* A line chart drawn as SVG elements (no library): lineChart(svg, series) with series [{points: [[x, y]...],
   className}]; axes are the data's own ranges, labelled in the chart's .axis element. */
"use strict";
window.lineChart = function (svg, series) {
  const NS = "http://www.w3.org/2000/svg";
  const box = svg.viewBox.baseVal;
  const width = box.width, height = box.height, pad = 4, labelRoom = 0;
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const xMin = Math.min(...xs), xMax = Math.max(...xs), yMin = Math.min(0, ...ys), yMax = Math.max(...ys) || 1;
  const sx = (x) => pad + (xMax === xMin ? 0.5 : (x - xMin) / (xMax - xMin)) * (width - 2 * pad);
  const sy = (y) => height - labelRoom - ((y - yMin) / (yMax - yMin || 1)) * (height - labelRoom - pad);
  for (const s of series) {
    if (!s.points.length) continue;
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", s.points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
    line.setAttribute("class", "line " + (s.className || ""));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  }
  // Labels go in the HTML next to the chart: SVG text would stretch with preserveAspectRatio="none".
  const axis = svg.parentElement.querySelector(".axis");
  if (axis) {
    const spans = axis.querySelectorAll("span");
    spans[0].textContent = String(xMin);
    spans[1].textContent = "max " + Number(yMax.toPrecision(4));
    spans[2].textContent = String(xMax);
  }
};
