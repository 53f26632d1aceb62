// Playground: streaming chat with every sampling parameter, n, stop, logprobs, structured
// output, tools, the model picker, "view code", and conversations kept in localStorage.
import { html, useEffect, useRef, useState } from "./vendor/htm-preact-standalone.module.js";
import { stream } from "./api.js";

const STORE = "sorai.conversations";
// [name, label, step, OpenAI's own field?]; empty means "not sent" (the server's default).
const NUMBERS = [
  ["temperature", "Temperature", 0.05, true],
  ["top_p", "Top p", 0.05, true],
  ["top_k", "Top k", 1, false],
  ["min_p", "Min p", 0.01, false],
  ["max_tokens", "Max tokens", 1, true],
  ["seed", "Seed", 1, true],
  ["presence_penalty", "Presence penalty", 0.1, true],
  ["frequency_penalty", "Frequency penalty", 0.1, true],
  ["repetition_penalty", "Repetition penalty", 0.05, false],
  ["n", "n (choices)", 1, true],
];
const DEFAULTS = { temperature: "0.7", max_tokens: "256", n: "1" };
const SCHEMA_EXAMPLE = JSON.stringify({
  type: "object",
  properties: { name: { type: "string" }, age: { type: "integer" } },
  required: ["name", "age"],
}, null, 2);
const TOOLS_EXAMPLE = JSON.stringify([{
  type: "function",
  function: {
    name: "get_weather", description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
}], null, 2);

const loadAll = () => { try { return JSON.parse(localStorage.getItem(STORE)) || []; } catch (e) { return []; } };
const saveAll = (all) => localStorage.setItem(STORE, JSON.stringify(all.slice(0, 50)));
const newConversation = () => ({ id: Date.now().toString(36), title: "New conversation", messages: [] });

// The request body the form describes, split into OpenAI's fields and sorai's extras.
export function buildRequest(form, model, messages) {
  const body = { model, messages, stream: true };
  const extra = {};
  for (const [name, , , openai] of NUMBERS) {
    const raw = form[name];
    if (raw === undefined || raw === "") continue;
    (openai ? body : extra)[name] = Number(raw);
  }
  const stop = (form.stop || "").split("\n").filter((s) => s.length);
  if (stop.length) body.stop = stop;
  if (form.logprobs) { body.logprobs = true; body.top_logprobs = Number(form.top_logprobs || 5); }
  const spec = (form.spec || "").trim();
  if (form.structured === "json_schema" && spec)
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema: JSON.parse(spec), strict: true } };
  else if (form.structured === "json_object") body.response_format = { type: "json_object" };
  else if (form.structured === "regex" && spec) extra.guided_regex = spec;
  else if (form.structured === "choice" && spec) extra.guided_choice = spec.split("\n").map((s) => s.trim()).filter(Boolean);
  if (form.useTools && (form.tools || "").trim()) { body.tools = JSON.parse(form.tools); body.tool_choice = form.tool_choice || "auto"; }
  return { body, extra };
}

function toPython(value, indent = "") {
  const next = indent + "    ";
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value))
    return value.length ? "[\n" + value.map((v) => next + toPython(v, next)).join(",\n") + ",\n" + indent + "]" : "[]";
  if (typeof value === "object") {
    const keys = Object.keys(value);
    return keys.length ? "{\n" + keys.map((k) => next + JSON.stringify(k) + ": " + toPython(value[k], next)).join(",\n") + ",\n" + indent + "}" : "{}";
  }
  return JSON.stringify(value);
}

export function codeSnippets(body, extra) {
  const base = location.origin + "/v1";
  const args = Object.entries(body).filter(([k]) => k !== "stream")
    .map(([k, v]) => `    ${k}=${toPython(v, "    ")},`);
  if (Object.keys(extra).length) args.push(`    extra_body=${toPython(extra, "    ")},`);
  const python = `from openai import OpenAI

client = OpenAI(base_url="${base}", api_key="YOUR_API_KEY")
stream = client.chat.completions.create(
${args.join("\n")}
    stream=True,
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()`;
  const json = JSON.stringify({ ...body, ...extra }, null, 2).replace(/'/g, "'\\''");
  const curl = `curl -N ${base}/chat/completions \\
  -H "Authorization: Bearer $SORAI_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '${json}'`;
  return { python, curl };
}

function Token({ t }) {
  const p = Math.exp(t.logprob);
  const alts = (t.top_logprobs || []).map((a) => `${JSON.stringify(a.token)} ${(100 * Math.exp(a.logprob)).toFixed(1)}%`).join("\n");
  return html`<span class="tok" style=${`background: hsla(${Math.round(120 * p)}, 75%, 45%, .35)`}
    title=${`${JSON.stringify(t.token)}: ${(100 * p).toFixed(1)}%\n${alts}`} data-p=${p.toFixed(4)}>${t.token}</span>`;
}

function Choice({ c, index, structured }) {
  let check = null;
  if (c.done && (structured === "json_schema" || structured === "json_object")) {
    try { JSON.parse(c.content); check = html`<p class="good" id=${"json-check-" + index}>valid JSON</p>`; }
    catch (e) { check = html`<p class="error" id=${"json-check-" + index}>not valid JSON: ${e.message}</p>`; }
  }
  return html`<div class="msg assistant" data-choice=${index} aria-live="polite">
    <span class="who">assistant${index ? ` (choice ${index})` : ""}${c.finish ? ` · ${c.finish}` : ""}</span>
    ${c.tokens.length ? c.tokens.map((t) => html`<${Token} t=${t} />`) : html`<span class="content">${c.content}</span>`}
    ${c.tools.length > 0 && html`<pre class="tool-calls">${JSON.stringify(c.tools, null, 2)}</pre>`}
    ${check}
  </div>`;
}

export function Playground({ models }) {
  // Chat models list their runtime; the embedding model does not.
  const chatModels = models.some((m) => m.runtime) ? models.filter((m) => m.runtime) : models;
  const [form, setForm] = useState({ ...DEFAULTS, structured: "none", spec: "", tools: TOOLS_EXAMPLE, top_logprobs: "5" });
  const [model, setModel] = useState((chatModels[0] || models[0] || {}).id || "");
  const [all, setAll] = useState(loadAll);
  const [current, setCurrent] = useState(() => all[0] || newConversation());
  const [input, setInput] = useState("");
  const [reply, setReply] = useState(null);
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const [showCode, setShowCode] = useState(false);
  const abort = useRef(null);
  const set = (name) => (e) => setForm({ ...form, [name]: e.target.type === "checkbox" ? e.target.checked : e.target.value });

  const persist = (conv) => {
    setCurrent(conv);
    const rest = loadAll().filter((c) => c.id !== conv.id);
    const next = conv.messages.length ? [conv, ...rest] : rest;
    saveAll(next);
    setAll(next);
  };

  const messagesFor = (conv, text) => [
    ...(conv.system ? [{ role: "system", content: conv.system }] : []),
    ...conv.messages,
    ...(text ? [{ role: "user", content: text }] : []),
  ];

  let request = null, requestError = "";
  // "View code" shows the request the Send button would make now (a placeholder message
  // while there is none yet).
  const pending = messagesFor(current, input);
  try { request = buildRequest(form, model, pending.length ? pending : [{ role: "user", content: "Hello!" }]); }
  catch (e) { requestError = "Not valid JSON: " + e.message; }

  const send = async (e) => {
    e && e.preventDefault();
    if (!input.trim() || busy) return;
    let built;
    try { built = buildRequest(form, model, messagesFor(current, input)); }
    catch (err) { setError("Not valid JSON: " + err.message); return; }
    const conv = {
      ...current,
      title: current.messages.length ? current.title : input.slice(0, 40),
      messages: [...current.messages, { role: "user", content: input }],
    };
    persist(conv);
    setInput("");
    setError("");
    setBusy(true);
    const choices = [];
    const view = () => setReply({ choices: choices.map((c) => ({ ...c })) });
    abort.current = new AbortController();
    try {
      await stream("/v1/chat/completions", { ...built.body, ...built.extra, stream_options: { include_usage: true } }, (_, chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        for (const ch of chunk.choices || []) {
          const c = choices[ch.index] || (choices[ch.index] = { content: "", tokens: [], tools: [], finish: null });
          if (ch.delta && ch.delta.content) c.content += ch.delta.content;
          if (ch.delta && ch.delta.tool_calls) {
            for (const call of ch.delta.tool_calls) {
              const slot = c.tools[call.index] || (c.tools[call.index] = { name: "", arguments: "" });
              if (call.function && call.function.name) slot.name += call.function.name;
              if (call.function && call.function.arguments) slot.arguments += call.function.arguments;
            }
          }
          if (ch.logprobs && ch.logprobs.content) c.tokens.push(...ch.logprobs.content);
          if (ch.finish_reason) c.finish = ch.finish_reason;
        }
        view();
      }, abort.current.signal);
      for (const c of choices) c.done = true;
      view();
      const first = choices[0] || { content: "" };
      const message = { role: "assistant", content: first.content };
      if (first.tools.length) message.tool_calls = first.tools.map((t, i) => ({ id: `call_${i}`, type: "function", function: t }));
      persist({ ...conv, messages: [...conv.messages, message] });
      setReply({ choices: choices.map((c) => ({ ...c })), final: true });
    } catch (err) {
      if (err.name !== "AbortError") setError(String(err.message || err));
    } finally {
      setBusy(false);
    }
  };

  const code = request && showCode ? codeSnippets(request.body, request.extra) : null;
  const number = ([name, label, step]) => html`<div>
    <label for=${"p-" + name}>${label}</label>
    <input id=${"p-" + name} type="number" step=${step} value=${form[name] || ""} onInput=${set(name)} placeholder="default" />
  </div>`;

  return html`<div class="layout">
    <aside class="panel" aria-label="Request settings">
      <label for="model">Model</label>
      <select id="model" value=${model} onChange=${(e) => setModel(e.target.value)}>
        ${chatModels.map((m) => html`<option value=${m.id}>${m.id}</option>`)}
      </select>
      <label for="system">System prompt</label>
      <textarea id="system" rows="3" value=${current.system || ""}
        onInput=${(e) => setCurrent({ ...current, system: e.target.value })}></textarea>
      <div class="grid2">${NUMBERS.map(number)}</div>
      <label for="p-stop">Stop sequences (one per line)</label>
      <textarea id="p-stop" rows="2" value=${form.stop || ""} onInput=${set("stop")}></textarea>
      <div class="row">
        <label><input type="checkbox" id="p-logprobs" checked=${!!form.logprobs} onChange=${set("logprobs")} /> Logprobs</label>
        <div><label for="p-top-logprobs">Top logprobs</label>
          <input id="p-top-logprobs" type="number" min="0" max="20" value=${form.top_logprobs} onInput=${set("top_logprobs")} /></div>
      </div>
      <label for="structured-kind">Structured output</label>
      <select id="structured-kind" value=${form.structured} onChange=${(e) => setForm({ ...form, structured: e.target.value, spec: e.target.value === "json_schema" && !form.spec ? SCHEMA_EXAMPLE : form.spec })}>
        <option value="none">none</option>
        <option value="json_schema">JSON schema</option>
        <option value="json_object">any JSON object</option>
        <option value="regex">regex</option>
        <option value="choice">choices (one per line)</option>
      </select>
      ${["json_schema", "regex", "choice"].includes(form.structured) && html`
        <label for="structured-spec">${form.structured === "json_schema" ? "JSON schema" : form.structured === "regex" ? "Regular expression" : "Choices"}</label>
        <textarea id="structured-spec" rows="6" value=${form.spec} onInput=${set("spec")}></textarea>`}
      <label><input type="checkbox" id="use-tools" checked=${!!form.useTools} onChange=${set("useTools")} /> Tools</label>
      ${form.useTools && html`<label for="tools">Tool definitions (JSON)</label>
        <textarea id="tools" rows="8" value=${form.tools} onInput=${set("tools")}></textarea>
        <label for="tool-choice">Tool choice</label>
        <select id="tool-choice" value=${form.tool_choice || "auto"} onChange=${set("tool_choice")}>
          <option value="auto">auto</option><option value="required">required</option><option value="none">none</option>
        </select>`}
      <h3>Conversations</h3>
      <div class="list">
        <button class="plain" id="new-conversation" onClick=${() => { setCurrent(newConversation()); setReply(null); }}>+ New conversation</button>
        ${all.map((c) => html`<button class="plain" aria-current=${c.id === current.id ? "true" : undefined}
          onClick=${() => { setCurrent(c); setReply(null); }}>${c.title}</button>`)}
      </div>
    </aside>
    <section aria-label="Chat">
      <div class="messages" id="messages">
        ${(reply && reply.final ? current.messages.slice(0, -1) : current.messages).map((m) => html`<div class=${"msg " + m.role}>
          <span class="who">${m.role}</span>${m.content}
          ${m.tool_calls && html`<pre>${JSON.stringify(m.tool_calls, null, 2)}</pre>`}</div>`)}
        ${reply && html`<div class="choices" id="reply">${reply.choices.map((c, i) => html`<${Choice} c=${c} index=${i} structured=${form.structured} />`)}</div>`}
      </div>
      ${error && html`<p class="error" role="alert" id="chat-error">${error}</p>`}
      <form onSubmit=${send}>
        <label for="chat-input">Message</label>
        <textarea id="chat-input" rows="3" value=${input} onInput=${(e) => setInput(e.target.value)}
          onKeyDown=${(e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); }}></textarea>
        <div class="row" style="margin-top:.5rem">
          <button type="submit" id="send" disabled=${busy}>Send</button>
          ${busy && html`<button type="button" class="plain" onClick=${() => abort.current && abort.current.abort()}>Stop</button>`}
          <button type="button" class="plain" id="view-code" aria-expanded=${showCode} onClick=${() => setShowCode(!showCode)}>View code</button>
          <span class="muted">Ctrl+Enter sends</span>
        </div>
      </form>
      ${requestError && html`<p class="error">${requestError}</p>`}
      ${code && html`<div id="code"><h3>Python (openai)</h3><pre id="code-python">${code.python}</pre>
        <h3>curl</h3><pre id="code-curl">${code.curl}</pre></div>`}
    </section>
  </div>`;
}
