/* The chat playground: streams /v1/chat/completions (fetch + server-sent events), measures time to first token and
   tokens/s, stops on demand, and shows the same request as curl and Python openai code. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const $ = (id) => document.getElementById(id);
  const history = [];
  let controller = null;

  function request(stream) {
    const messages = [];
    const system = $("chat-system").value.trim();
    if (system) messages.push({role: "system", content: system});
    messages.push(...history);
    const body = {model: $("chat-model").value, messages: messages};
    const temperature = parseFloat($("chat-temperature").value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const topP = parseFloat($("chat-top-p").value);
    if (!Number.isNaN(topP) && topP !== 1) body.top_p = topP;
    const maxTokens = parseInt($("chat-max-tokens").value, 10);
    if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
    const seed = parseInt($("chat-seed").value, 10);
    if (!Number.isNaN(seed)) body.seed = seed;
    const stop = $("chat-stop").value.split("\n").filter((s) => s.length);
    if (stop.length) body.stop = stop;
    const format = $("chat-format").value;
    if (format === "json_object") body.response_format = {type: "json_object"};
    if (format === "json_schema") {
      const schema = parseJson("chat-schema", "the JSON schema");
      body.response_format = {type: "json_schema", json_schema: {name: "output", schema: schema}};
    }
    if ($("chat-tools").value.trim()) body.tools = parseJson("chat-tools", "the tools");
    if (stream) { body.stream = true; body.stream_options = {include_usage: true}; }
    return body;
  }

  function parseJson(id, what) {
    try {
      return JSON.parse($(id).value || "null");
    } catch (error) {
      throw new Error(what + " is not valid JSON: " + error.message);
    }
  }

  function pythonValue(value, indent) {
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (Array.isArray(value)) return "[" + value.map((v) => pythonValue(v, indent)).join(", ") + "]";
    if (typeof value === "object") {
      return "{" + Object.entries(value).map(([k, v]) => JSON.stringify(k) + ": " + pythonValue(v, indent)).join(", ") + "}";
    }
    return JSON.stringify(value);
  }

  function updateCode() {
    let body;
    try {
      body = request(false);
      LLMasOS.show("chat-error", "");
    } catch (error) {
      LLMasOS.show("chat-error", error.message);
      return;
    }
    const base = window.location.origin;
    const shellJson = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
    $("code-curl").textContent = "curl " + base + "/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n" +
      "  -H \"Authorization: Bearer $LLMASOS_API_KEY\" \\\n  -d '" + shellJson + "'";
    const args = Object.entries(body).map(([k, v]) => "    " + k + "=" + pythonValue(v) + ",").join("\n");
    $("code-python").textContent = "import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=" +
      JSON.stringify(base + "/v1") + ", api_key=os.environ.get(\"LLMASOS_API_KEY\", \"unused\"))\n" +
      "response = client.chat.completions.create(\n" + args + "\n)\nprint(response.choices[0].message.content)";
  }

  function addMessage(role, text) {
    const item = document.createElement("div");
    item.className = "message " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    item.append(who, content);
    $("chat-log").appendChild(item);
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
    return content;
  }

  function busy(on) {
    $("chat-send").disabled = on;
    $("chat-stop-button").disabled = !on;
  }

  async function send() {
    const text = $("chat-input").value;
    if (!text.trim() || controller) return;
    LLMasOS.show("chat-error", "");
    try { request(true); } catch (error) { LLMasOS.show("chat-error", error.message); return; }
    history.push({role: "user", content: text});
    addMessage("user", text);
    $("chat-input").value = "";
    const output = addMessage("assistant", "");
    output.parentElement.classList.add("streaming");
    const body = request(true);
    updateCode();
    controller = new AbortController();
    busy(true);
    const started = performance.now();
    let firstToken = null, chunks = 0, completionTokens = null, reply = "", finish = null;
    try {
      const response = await LLMasOS.post("/v1/chat/completions", body, {raw: true, signal: controller.signal});
      if (!response.ok) {
        let data = null;
        try { data = await response.json(); } catch (e) { data = null; }
        throw new Error(LLMasOS.errorMessage(data, response));
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let boundary;
        while ((boundary = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
            if (chunk.usage) completionTokens = chunk.usage.completion_tokens;
            for (const choice of chunk.choices || []) {
              for (const call of (choice.delta && choice.delta.tool_calls) || []) {
                const fn = call.function || {};
                reply += (fn.name ? "\n[tool call] " + fn.name + " " : "") + (fn.arguments || "");
                output.textContent = reply;
              }
              const delta = (choice.delta && choice.delta.content) || "";
              if (delta) {
                if (firstToken === null) firstToken = performance.now();
                chunks += 1;
                reply += delta;
                output.textContent = reply;
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else LLMasOS.show("chat-error", error.message);
    } finally {
      const ended = performance.now();
      controller = null;
      busy(false);
      output.parentElement.classList.remove("streaming");
      if (reply) history.push({role: "assistant", content: reply});
      else history.pop();
      const tokens = completionTokens !== null ? completionTokens : chunks;
      const parts = [];
      if (firstToken !== null) {
        parts.push("TTFT " + Math.round(firstToken - started) + " ms");
        const seconds = (ended - firstToken) / 1000;
        if (tokens > 1 && seconds > 0) parts.push(((tokens - 1) / seconds).toFixed(1) + " tokens/s");
      }
      parts.push(tokens + " tokens");
      if (finish) parts.push("finish: " + finish);
      $("chat-stats").textContent = parts.join(" · ");
    }
  }

  $("chat-send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
  });
  $("chat-stop-button").addEventListener("click", function () { if (controller) controller.abort(); });
  $("chat-clear").addEventListener("click", function () {
    history.length = 0;
    $("chat-log").replaceChildren();
    LLMasOS.show("chat-stats", "");
    updateCode();
  });
  $("chat-form").addEventListener("input", updateCode);
  $("chat-form").addEventListener("submit", (event) => event.preventDefault());
  updateCode();
});
