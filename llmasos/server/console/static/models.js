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
