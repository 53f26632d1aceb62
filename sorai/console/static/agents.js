// Agents: run a task and watch its steps (thoughts, tool calls, observations) stream in;
// browse the traces saved by earlier runs.
import { html, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api, stream } from "./api.js";

function Step({ s }) {
  return html`<div class="step" data-kind=${s.kind}>
    <strong>Step ${s.number} · ${s.kind}${s.forced ? " (forced)" : ""}</strong>
    ${s.thought && html`<p><em>${s.thought}</em></p>`}
    ${s.tool && html`<p>→ <code>${s.tool}</code>(<code>${JSON.stringify(s.arguments)}</code>)</p>`}
    ${s.observation && html`<pre class=${s.ok ? "" : "error"}>${s.observation}</pre>`}
    ${s.answer && html`<p class="answer">${s.answer}</p>`}
  </div>`;
}

export function Agents() {
  const [task, setTask] = useState("");
  const [useDocs, setUseDocs] = useState(false);
  const [indexes, setIndexes] = useState([]);
  const [index, setIndex] = useState("");
  const [strategy, setStrategy] = useState("tools");
  const [steps, setSteps] = useState([]);
  const [done, setDone] = useState(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState("");
  const [traces, setTraces] = useState([]);
  const [trace, setTrace] = useState(null);
  const refresh = () => api("/v1/sorai/agents/traces").then((r) => setTraces(r.data), () => {});
  useEffect(() => {
    refresh();
    api("/v1/sorai/indexes").then((r) => { setIndexes(r.data); if (r.data.length) setIndex(r.data[0].name); }, () => {});
  }, []);
  const run = async (e) => {
    e.preventDefault();
    if (!task.trim() || busy) return;
    setBusy(true); setSteps([]); setDone(null); setError(""); setTrace(null);
    const got = [];
    try {
      await stream("/v1/sorai/agents/run", {
        task, strategy, tools: useDocs ? ["calculator", "search_documents"] : ["calculator"], index: useDocs ? index : undefined,
      }, (kind, data) => {
        if (kind === "step") { got.push(data); setSteps([...got]); }
        else if (kind === "done") setDone(data);
        else if (kind === "error") setError(data.message);
      });
      refresh();
    } catch (err) { setError(String(err.message || err)); } finally { setBusy(false); }
  };
  const shown = trace ? trace.steps : steps;
  return html`<div class="layout">
    <aside class="panel" aria-label="Saved traces"><h3>Traces</h3>
      <div class="list">${traces.length ? traces.map((t) => html`<button class="plain" onClick=${() => api(`/v1/sorai/agents/traces/${t.id}`).then(setTrace, (e) => setError(e.message))}>
        ${t.task} <span class="muted">${t.steps} steps</span></button>`) : html`<p class="muted">none yet</p>`}</div>
    </aside>
    <section>
      <form onSubmit=${run}>
        <label for="agent-task">Task</label>
        <textarea id="agent-task" rows="2" value=${task} onInput=${(e) => setTask(e.target.value)}></textarea>
        <div class="row">
          <div><label for="agent-strategy">Strategy</label>
            <select id="agent-strategy" value=${strategy} onChange=${(e) => setStrategy(e.target.value)}>
              <option value="tools">native tool calls</option><option value="react">ReAct (text)</option></select></div>
          ${indexes.length > 0 && html`<label><input type="checkbox" checked=${useDocs} onChange=${(e) => setUseDocs(e.target.checked)} /> search an index</label>
            ${useDocs && html`<div><label for="agent-index">Index</label><select id="agent-index" value=${index} onChange=${(e) => setIndex(e.target.value)}>
              ${indexes.map((i) => html`<option value=${i.name}>${i.name}</option>`)}</select></div>`}`}
          <button type="submit" id="agent-run" disabled=${busy}>Run</button>
        </div>
        <p class="muted">Tools: the calculator${indexes.length ? ", and search over an index" : ""}. File and Python tools stay with <code>sorai agent</code>.</p>
      </form>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      ${trace && html`<h3>Trace: ${trace.task}</h3>`}
      <div id="agent-steps" aria-live="polite">${shown.map((s) => html`<${Step} s=${s} />`)}</div>
      ${busy && html`<p class="muted">working…</p>`}
      ${(done || trace) && html`<div class="panel" id="agent-answer"><strong>Answer:</strong> ${(done || trace).answer}
        <span class="muted"> (${(done || trace).stop_reason})</span></div>`}
    </section>
  </div>`;
}
