/* The login page: the admin key is posted once; the answer sets the session cookie. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const form = document.getElementById("login-form");
  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    LLMasOS.show("login-error", "");
    try {
      await LLMasOS.post("/console/login", {key: document.getElementById("login-key").value});
      window.location.assign("/");
    } catch (error) {
      LLMasOS.show("login-error", error.message);
    }
  });
});
