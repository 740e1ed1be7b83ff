/* The server page: polls /console/api/stats every second; tokens/s is the generated-token counter's rate. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const rows = document.getElementById("server-rows");
  const svg = document.getElementById("server-chart");
  let previous = null;
  const history = [];
  const seconds = (value) => value === null || value === undefined ? "–" : (value * 1000).toFixed(0) + " ms";
  async function refresh() {
    let data;
    try {
      data = await LLMasOS.get("/console/api/stats");
      LLMasOS.show("server-error", "");
    } catch (error) {
      LLMasOS.show("server-error", error.message);
      return;
    }
    const totals = {};
    for (const model of data.models) totals[model.model] = model.generation_tokens;
    rows.replaceChildren();
    let rateSum = 0;
    for (const model of data.models) {
      let rate = 0;
      if (previous && previous.totals[model.model] !== undefined && data.time > previous.time)
        rate = Math.max(0, (model.generation_tokens - previous.totals[model.model]) / (data.time - previous.time));
      rateSum += rate;
      const row = document.createElement("tr");
      row.dataset.model = model.model;
      LLMasOS.cell(row, model.model);
      LLMasOS.cell(row, String(model.running), "num running");
      LLMasOS.cell(row, String(model.waiting), "num waiting");
      LLMasOS.cell(row, (model.kv_cache_usage * 100).toFixed(1) + " %", "num");
      LLMasOS.cell(row, (model.prefix_cache_hit_rate * 100).toFixed(1) + " %", "num");
      LLMasOS.cell(row, rate.toFixed(1), "num rate");
      LLMasOS.cell(row, "≤" + seconds(model.ttft.p50) + " / ≤" + seconds(model.ttft.p95), "num");
      LLMasOS.cell(row, "≤" + seconds(model.itl.p50) + " / ≤" + seconds(model.itl.p95), "num");
      LLMasOS.cell(row, LLMasOS.humanBytes(model.weight_bytes + model.kv_cache_bytes), "num");
      rows.appendChild(row);
    }
    if (!data.models.length) {
      const row = document.createElement("tr");
      LLMasOS.cell(row, "No model is loaded.", "muted").colSpan = 9;
      rows.appendChild(row);
    }
    if (previous) history.push([Math.round(data.time), rateSum]);
    while (history.length > 120) history.shift();
    lineChart(svg, [{points: history.map((p) => [p[0] - history[0][0], p[1]]), className: "train"}]);
    previous = {time: data.time, totals: totals};
  }
  refresh();
  setInterval(refresh, 1000);
});
