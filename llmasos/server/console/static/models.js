/* The models page: load and stop (the server's /api/load and /api/stop), copy and remove library models. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  async function act(path, body) {
    LLMasOS.show("models-error", "");
    try {
      await LLMasOS.post(path, body);
      window.location.reload();
    } catch (error) {
      LLMasOS.show("models-error", error.message);
    }
  }
  for (const button of document.querySelectorAll("button.model-load"))
    button.addEventListener("click", () => { button.disabled = true; act("/api/load", {model: button.dataset.name}); });
  for (const button of document.querySelectorAll("button.model-stop"))
    button.addEventListener("click", () => act("/api/stop", {model: button.dataset.name}));
  for (const button of document.querySelectorAll("button.model-remove"))
    button.addEventListener("click", () => act("/console/api/models/remove", {name: button.dataset.name}));
  const pullForm = document.getElementById("pull-form");
  pullForm.addEventListener("submit", async function (event) {
    event.preventDefault();
    LLMasOS.show("models-error", "");
    let job;
    try {
      job = await LLMasOS.post("/console/api/models/pull", {spec: document.getElementById("pull-spec").value.trim(),
                                                           name: document.getElementById("pull-name").value.trim() || null});
    } catch (error) {
      LLMasOS.show("models-error", error.message);
      return;
    }
    document.getElementById("pull-box").hidden = false;
    document.getElementById("pull-start").disabled = true;
    const bar = document.getElementById("pull-progress");
    const timer = setInterval(async function () {
      try { job = await LLMasOS.get("/console/api/pulls/" + job.id); }
      catch (error) { LLMasOS.show("models-error", error.message); clearInterval(timer); return; }
      LLMasOS.show("pull-status", job.status === "pulling" ? "pulling " + job.spec : job.status);
      LLMasOS.show("pull-message", job.result || job.message);
      if (job.total) { bar.max = job.total; bar.value = job.completed; }
      LLMasOS.show("pull-bytes", LLMasOS.humanBytes(job.completed) + (job.total ? " of " + LLMasOS.humanBytes(job.total) : ""));
      bar.dataset.status = job.status;
      if (job.status !== "pulling") {
        clearInterval(timer);
        document.getElementById("pull-start").disabled = false;
        if (job.status === "done") setTimeout(() => window.location.reload(), 800);
      }
    }, 300);
  });
  const form = document.getElementById("copy-form");
  for (const button of document.querySelectorAll("button.model-copy")) {
    button.addEventListener("click", function () {
      LLMasOS.show("copy-source", button.dataset.name);
      document.getElementById("copy-target").value = button.dataset.name + "-copy";
      form.hidden = false;
    });
  }
  document.getElementById("copy-cancel").addEventListener("click", () => { form.hidden = true; });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    act("/console/api/models/copy", {source: document.getElementById("copy-source").textContent,
                                     target: document.getElementById("copy-target").value.trim()});
  });
});
