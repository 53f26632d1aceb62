// Training: the `sorai train` runs under --runs-dir; loss and val-loss charts that follow a
// run while it trains (new metrics.jsonl rows every few seconds), config, checkpoints,
// exports and the command that serves the result.
import { html, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api } from "./api.js";
import { LineChart } from "./chart.js";

const EVERY_MS = 2000;

function Run({ name }) {
  const [run, setRun] = useState(null);
  const [rows, setRows] = useState([]);
  const [error, setError] = useState("");
  useEffect(() => {
    let next = 0, alive = true, all = [];
    setRows([]); setRun(null);
    const tick = async () => {
      try {
        const r = await api(`/v1/sorai/training/${encodeURIComponent(name)}?after=${next}`);
        if (!alive) return;
        if (r.next < next) all = r.metrics; // the file was rewritten (a resumed run)
        else all = [...all, ...r.metrics];
        next = r.next;
        setRun(r); setRows(all);
      } catch (e) { if (alive) setError(e.message); }
    };
    tick();
    const timer = setInterval(tick, EVERY_MS);
    return () => { alive = false; clearInterval(timer); };
  }, [name]);
  if (error && !run) return html`<p class="error">${error}</p>`;
  if (!run) return html`<p class="muted">Loading ${name}…</p>`;
  const steps = [...new Set(rows.map((r) => r.step))].sort((x, y) => x - y);
  const at = (key) => steps.map((s) => { const r = rows.find((x) => x.step === s && key in x); return r ? r[key] : null; });
  const last = rows.filter((r) => "loss" in r).slice(-1)[0];
  return html`<div id="training-run">
    <h2>${name}</h2>
    <p class="muted" id="training-points">${rows.length} metric rows${last ? ` · step ${last.step} · loss ${last.loss.toFixed(4)}` : ""}</p>
    <div class="panel"><${LineChart} id="chart-loss" title="loss" xLabel="step" xs=${steps}
      series=${[{ label: "loss", values: at("loss") }, { label: "val loss", values: at("val_loss") }]} height=${220} /></div>
    ${run.serve && html`<h3>Serve it</h3><pre id="serve-command">${run.serve}</pre>`}
    <div class="cards" style="margin-top:1rem">
      <div class="panel"><h3>Checkpoints</h3>${run.checkpoints.length ? html`<ul>${run.checkpoints.map((c) => html`<li>${c}</li>`)}</ul>` : html`<p class="muted">none</p>`}</div>
      <div class="panel"><h3>Exports</h3>${run.exports.length ? html`<ul>${run.exports.map((c) => html`<li>${c}/</li>`)}</ul>` : html`<p class="muted">none yet</p>`}</div>
    </div>
    ${run.config && html`<h3>Config</h3><pre id="training-config">${run.config}</pre>`}
  </div>`;
}

export function Training() {
  const [runs, setRuns] = useState(null);
  const [name, setName] = useState(null);
  const [error, setError] = useState("");
  useEffect(() => { api("/v1/sorai/training").then(setRuns, (e) => setError(e.message)); }, []);
  if (!runs) return html`<p class="muted">${error || "Loading runs…"}</p>`;
  if (!runs.data.length)
    return html`<p class="muted" id="no-training">${runs.configured ? "No `sorai train` runs in the runs directory yet."
      : "Start the server with --runs-dir DIR to follow the `sorai train` runs in DIR."}</p>`;
  return html`<div class="layout">
    <aside class="panel" aria-label="Training runs"><h3>Runs</h3>
      <div class="list">${runs.data.map((r) => html`<button class="plain train-link" data-run=${r.name}
        onClick=${() => setName(r.name)}>${r.name} <span class="muted">${r.model || ""}</span></button>`)}</div>
    </aside>
    <section>${name ? html`<${Run} name=${name} />` : html`<p class="muted">Pick a run.</p>`}</section>
  </div>`;
}
