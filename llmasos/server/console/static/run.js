/* A run's page: its loss (and eval loss) curve from metrics.jsonl, refreshed every 2 seconds while it grows. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const svg = document.getElementById("run-chart");
  const path = "/console/api/runs/" + svg.dataset.run.split("/").map(encodeURIComponent).join("/");
  let seen = -1;
  async function refresh() {
    try {
      const data = await LLMasOS.get(path);
      const records = data.records;
      if (records.length !== seen) {
        seen = records.length;
        const train = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
        const evaluation = records.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
        lineChart(svg, [{points: train, className: "train"}, {points: evaluation, className: "eval"}]);
        svg.dataset.points = String(train.length);
        const last = train[train.length - 1];
        LLMasOS.show("run-last", last ? "step " + last[0] + ": " + last[1].toFixed(4) : "no loss yet");
      }
      LLMasOS.show("run-error", "");
    } catch (error) {
      LLMasOS.show("run-error", error.message);
    }
  }
  refresh();
  setInterval(refresh, 2000);
});
