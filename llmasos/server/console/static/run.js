/* A run's page: its loss (and eval loss) curve from metrics.jsonl, refreshed every 2 seconds while it grows; the
   status, command and cancel button of a run started from the console. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const svg = document.getElementById("run-chart");
  const path = "/console/api/runs/" + svg.dataset.run.split("/").map(encodeURIComponent).join("/");
  let seen = -1, finished = false;
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
      if (data.status) {
        document.getElementById("run-status-line").hidden = false;
        LLMasOS.show("run-status", data.status);
        document.getElementById("run-cancel").hidden = data.status !== "running";
        const command = document.getElementById("run-command");
        command.hidden = false;
        command.textContent = data.command;
        const log = document.getElementById("run-log");
        log.hidden = !data.log || data.status === "finished";
        log.textContent = data.log || "";
        if (data.status !== "running") finished = true;
      }
      LLMasOS.show("run-error", "");
    } catch (error) {
      LLMasOS.show("run-error", error.message);
    }
  }
  document.getElementById("run-cancel").addEventListener("click", async function () {
    try {
      await LLMasOS.post("/console/api/runs/cancel", {name: svg.dataset.run});
      refresh();
    } catch (error) {
      LLMasOS.show("run-error", error.message);
    }
  });
  refresh();
  const timer = setInterval(function () {
    if (finished) { refresh(); clearInterval(timer); } else refresh();
  }, 2000);
});
