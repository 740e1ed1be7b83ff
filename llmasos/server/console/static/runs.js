/* The runs page: start a fine-tuning run on an uploaded JSONL file; the equivalent CLI command is shown as you type. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const $ = (id) => document.getElementById(id);
  const form = $("run-form");
  if (!form) return;
  function body() {
    const maxSteps = parseInt($("run-max-steps").value, 10);
    const learningRate = parseFloat($("run-learning-rate").value);
    return {name: $("run-name").value.trim(), model: $("run-model").value, method: $("run-method").value,
            max_steps: Number.isNaN(maxSteps) ? null : maxSteps,
            learning_rate: Number.isNaN(learningRate) ? null : learningRate};
  }
  function preview() {
    const b = body();
    const file = $("run-data").files[0];
    let command = "llmasos train --model " + b.model + " --data " + (file ? file.name : "DATA.jsonl") +
      " --output RUNS/" + (b.name || "NAME") + " --method " + b.method;
    if (b.max_steps !== null) command += " --max-steps " + b.max_steps;
    if (b.learning_rate !== null) command += " --learning-rate " + b.learning_rate;
    $("run-command").textContent = command;
  }
  form.addEventListener("input", preview);
  form.addEventListener("change", preview);
  preview();
  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    LLMasOS.show("run-form-error", "");
    const file = $("run-data").files[0];
    if (!file) { LLMasOS.show("run-form-error", "choose a .jsonl file"); return; }
    if (file.size > 2 * 1024 * 1024) { LLMasOS.show("run-form-error", "the file is larger than 2 MiB"); return; }
    const payload = body();
    payload.data = await file.text();
    try {
      const started = await LLMasOS.post("/console/api/runs", payload);
      window.location.assign("/runs/" + encodeURIComponent(started.name));
    } catch (error) {
      LLMasOS.show("run-form-error", error.message);
    }
  });
});
