/* The keys page: create (the secret is shown once), copy, revoke. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const number = (id) => {
    const value = document.getElementById(id).value.trim();
    return value === "" ? null : parseInt(value, 10);
  };
  document.getElementById("key-form").addEventListener("submit", async function (event) {
    event.preventDefault();
    LLMasOS.show("key-error", "");
    const models = document.getElementById("key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    const body = {
      name: document.getElementById("key-name").value.trim(), rpm: number("key-rpm"), tpm: number("key-tpm"),
      max_concurrency: number("key-concurrency"), token_quota: number("key-quota"),
      models: models.length ? models : null, admin: document.getElementById("key-admin").checked,
    };
    try {
      const created = await LLMasOS.post("/console/api/keys", body);
      LLMasOS.show("key-secret-name", created.name);
      LLMasOS.show("key-secret", created.key);
      document.getElementById("key-secret-box").hidden = false;
      document.getElementById("key-form").hidden = true;
    } catch (error) {
      LLMasOS.show("key-error", error.message);
    }
  });
  document.getElementById("key-copy").addEventListener("click", async function () {
    const text = document.getElementById("key-secret").textContent;
    try { await navigator.clipboard.writeText(text); this.textContent = "Copied"; }
    catch (error) { window.getSelection().selectAllChildren(document.getElementById("key-secret")); }
  });
  document.getElementById("key-done").addEventListener("click", () => window.location.reload());
  for (const button of document.querySelectorAll("button.revoke")) {
    button.addEventListener("click", async function () {
      LLMasOS.show("key-error", "");
      try {
        await LLMasOS.post("/console/api/keys/revoke", {name: button.dataset.name});
        window.location.reload();
      } catch (error) {
        LLMasOS.show("key-error", error.message);
      }
    });
  }
});
