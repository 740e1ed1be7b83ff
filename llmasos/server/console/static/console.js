/* Shared by every console page: JSON requests with the page's CSRF token, error messages, log out.
   Everything user-supplied is put on the page with textContent, never innerHTML. */
"use strict";
(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";

  function errorMessage(body, response) {
    if (body && body.error && body.error.message) return body.error.message;
    return "request failed: HTTP " + response.status;
  }

  async function post(path, body, options) {
    const response = await fetch(path, Object.assign({
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body || {}),
    }, options || {}));
    if (options && options.raw) return response;
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) throw new Error(errorMessage(data, response));
    return data;
  }

  async function get(path) {
    const response = await fetch(path, {credentials: "same-origin"});
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) throw new Error(errorMessage(data, response));
    return data;
  }

  function show(id, text) {
    const element = document.getElementById(id);
    if (element) element.textContent = text || "";
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function humanBytes(size) {
    if (!size) return "–";
    const units = [["GB", 1e9], ["MB", 1e6], ["KB", 1e3]];
    for (const [unit, scale] of units) if (size >= scale) return (size / scale).toFixed(1) + " " + unit;
    return size + " B";
  }

  window.LLMasOS = {csrf, post, get, show, cell, humanBytes, errorMessage};

  document.addEventListener("DOMContentLoaded", function () {
    const logout = document.getElementById("logout");
    if (logout) logout.addEventListener("click", async function () {
      try { await post("/console/logout"); } finally { window.location.assign("/login"); }
    });
  });
})();
