// The console's shell: the key prompt, the tabs (hash routes) and the pages.
import { html, render, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api, getKey, setKey } from "./api.js";
import { Playground } from "./playground.js";
import { Models } from "./models.js";
import { Data } from "./data.js";
import { Evaluations } from "./evals.js";
import { Training } from "./training.js";
import { Agents } from "./agents.js";

const PAGES = [
  ["playground", "Playground", Playground],
  ["models", "Models", Models],
  ["data", "Data", Data],
  ["evals", "Evaluations", Evaluations],
  ["training", "Training", Training],
  ["agents", "Agents", Agents],
];

function route() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  return { page: PAGES.some((p) => p[0] === name) ? name : "playground", args: rest };
}

function KeyGate({ onKey, error }) {
  const [key, setValue] = useState("");
  const submit = (e) => { e.preventDefault(); onKey(key.trim()); };
  return html`<main class="keygate panel" id="key-gate">
    <h2>API key required</h2>
    <p class="muted">This server asks for an API key. The console keeps it in this tab only
      (session storage) and sends it as a bearer token to this server.</p>
    <form onSubmit=${submit}>
      <label for="api-key">API key</label>
      <input id="api-key" type="password" autocomplete="off" value=${key}
        onInput=${(e) => setValue(e.target.value)} autofocus />
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <p><button type="submit" id="key-submit">Use this key</button></p>
    </form>
  </main>`;
}

function App() {
  const [state, setState] = useState({ status: "checking" });
  const [where, setWhere] = useState(route());

  const check = async (message) => {
    try {
      const models = await api("/v1/models");
      setState({ status: "ready", models: models.data });
    } catch (e) {
      if (e.status === 401) setState({ status: "key", error: message });
      else setState({ status: "down", error: String(e.message || e) });
    }
  };
  useEffect(() => {
    check();
    const onHash = () => setWhere(route());
    const onDenied = () => { setKey(""); setState({ status: "key", error: "the key was refused" }); };
    window.addEventListener("hashchange", onHash);
    window.addEventListener("sorai-unauthorized", onDenied);
    return () => {
      window.removeEventListener("hashchange", onHash);
      window.removeEventListener("sorai-unauthorized", onDenied);
    };
  }, []);

  if (state.status === "checking") return html`<p class="muted">Connecting&hellip;</p>`;
  if (state.status === "key")
    return html`<${KeyGate} error=${state.error}
      onKey=${(key) => { setKey(key); check(getKey() ? "that key was refused" : undefined); }} />`;
  if (state.status === "down") return html`<p class="error">Cannot reach the API: ${state.error}</p>`;
  const Page = PAGES.find((p) => p[0] === where.page)[2];
  return html`
    <header class="top">
      <h1>sorai</h1>
      <nav class="tabs" aria-label="Console pages">
        ${PAGES.map(([name, title]) => html`<a href=${"#/" + name} id=${"tab-" + name}
          aria-current=${where.page === name ? "page" : undefined}>${title}</a>`)}
      </nav>
      ${getKey() && html`<button class="plain" onClick=${() => { setKey(""); check(); }}>Forget key</button>`}
    </header>
    <main id=${"page-" + where.page}>
      <${Page} models=${state.models} args=${where.args} refresh=${() => check()} />
    </main>`;
}

render(html`<${App} />`, document.getElementById("root"));
