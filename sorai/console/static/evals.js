// Evaluations: the runs under --eval-dir with report.html's data (summary, histograms, rows
// with filters) and a comparison of two runs with bootstrap intervals.
import { html, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api } from "./api.js";
import { Bars } from "./chart.js";

const fmt = (v, d = 3) => (v === null || v === undefined ? "-" : typeof v === "number" ? v.toFixed(d) : String(v));
const cell = (v) => (v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));

function Run({ name }) {
  const [run, setRun] = useState(null);
  const [error, setError] = useState("");
  const [text, setText] = useState("");
  const [failsOnly, setFailsOnly] = useState(false);
  useEffect(() => { setRun(null); api(`/v1/sorai/evals/${encodeURIComponent(name)}`).then(setRun, (e) => setError(e.message)); }, [name]);
  if (error) return html`<p class="error">${error}</p>`;
  if (!run) return html`<p class="muted">Loading ${name}…</p>`;
  const metrics = Object.entries(run.summary.metrics || {});
  const columns = ["index", "query", "response", ...metrics.map(([m]) => m)];
  const rows = run.rows.filter((r) =>
    (!failsOnly || Object.entries(r).some(([k, v]) => k.endsWith("_result") && v === "fail")) &&
    (!text || JSON.stringify(r).toLowerCase().includes(text.toLowerCase())));
  return html`<div id="eval-run">
    <h2>${name}</h2>
    <p class="muted">${run.total_rows} rows · data ${cell(run.summary.run && run.summary.run.data)} ·
      ${run.summary.run && run.summary.run.judge ? "judge " + run.summary.run.judge : "no judge"}</p>
    <table id="eval-summary"><thead><tr><th>metric</th><th>mean</th><th>pass</th><th>threshold</th><th>scored</th><th>errors</th></tr></thead>
      <tbody>${metrics.map(([m, s]) => html`<tr><td>${m}</td><td class="num">${fmt(s.mean)}</td>
        <td class="num">${s.pass_rate === null ? "-" : Math.round(100 * s.pass_rate) + "%"}</td>
        <td class="num">${s.threshold === null ? "-" : s.threshold}</td><td class="num">${s.scored}</td><td class="num">${s.errors}</td></tr>`)}</tbody></table>
    <div class="cards" style="margin-top:1rem">${metrics.map(([m]) => html`<div class="panel"><h3>${m}</h3>
      <${Bars} bins=${run.histograms[m] || []} label=${"histogram of " + m} /></div>`)}</div>
    <h3>Rows</h3>
    <div class="row">
      <div><label for="row-filter">Filter rows (any text)</label><input id="row-filter" value=${text} onInput=${(e) => setText(e.target.value)} /></div>
      <label><input type="checkbox" id="fails-only" checked=${failsOnly} onChange=${(e) => setFailsOnly(e.target.checked)} /> failures only</label>
    </div>
    <p class="muted" id="rows-shown">${rows.length} of ${run.rows.length} rows</p>
    <div class="scroll"><table id="eval-rows"><thead><tr>${columns.map((c) => html`<th>${c}</th>`)}</tr></thead>
      <tbody>${rows.slice(0, 500).map((r) => html`<tr>${columns.map((c) => html`<td class=${typeof r[c] === "number" ? "num" : ""}
        title=${r[c + "_reason"] || ""}>${typeof r[c] === "number" && c !== "index" ? fmt(r[c]) : cell(r[c]).slice(0, 200)}</td>`)}</tr>`)}</tbody></table></div>
  </div>`;
}

function Compare({ a, b }) {
  const [result, setResult] = useState(null);
  const [error, setError] = useState("");
  useEffect(() => {
    setResult(null); setError("");
    api(`/v1/sorai/evals/${encodeURIComponent(a)}/compare/${encodeURIComponent(b)}`).then(setResult, (e) => setError(e.message));
  }, [a, b]);
  if (error) return html`<p class="error">${error}</p>`;
  if (!result) return html`<p class="muted">Comparing…</p>`;
  return html`<div id="eval-compare"><h2>${b} vs ${a}</h2>
    <p class="muted">Differences are B − A over the rows both runs scored, with paired bootstrap 95% intervals.</p>
    <table id="compare-table"><thead><tr><th>metric</th><th>pairs</th><th>mean A</th><th>mean B</th><th>B − A</th><th>95% interval</th><th></th></tr></thead>
      <tbody>${result.metrics.map((d) => {
        const better = d.significant && (d.diff > 0) === d.higher_is_better;
        return html`<tr><td>${d.metric}</td><td class="num">${d.pairs}</td><td class="num">${fmt(d.mean_a)}</td><td class="num">${fmt(d.mean_b)}</td>
          <td class="num">${fmt(d.diff)}</td><td class="num">[${fmt(d.low)}, ${fmt(d.high)}]</td>
          <td class=${d.significant ? (better ? "good" : "error") : "muted"}>${d.significant ? (better ? "better" : "worse") : "no clear change"}${d.few ? " (few rows)" : ""}</td></tr>`;
      })}</tbody></table>
    ${result.metrics.map((d) => d.changed.length > 0 && html`<h3>${d.metric}: rows that changed most</h3>
      <table><tbody>${d.changed.map((c) => html`<tr><td class="num">${c.index}</td><td>${c.query}</td><td class="num">${fmt(c.a)} → ${fmt(c.b)}</td></tr>`)}</tbody></table>`)}
  </div>`;
}

export function Evaluations() {
  const [runs, setRuns] = useState(null);
  const [view, setView] = useState(null);
  const [a, setA] = useState("");
  const [b, setB] = useState("");
  const [error, setError] = useState("");
  useEffect(() => {
    api("/v1/sorai/evals").then((r) => { setRuns(r); if (r.data.length > 1) { setA(r.data[0].name); setB(r.data[1].name); } }, (e) => setError(e.message));
  }, []);
  if (!runs) return html`<p class="muted">${error || "Loading runs…"}</p>`;
  if (!runs.data.length)
    return html`<p class="muted" id="no-evals">${runs.configured ? "No `sorai eval run` runs in the eval directory yet."
      : "Start the server with --eval-dir DIR to browse the `sorai eval run` runs in DIR."}</p>`;
  return html`<div class="layout">
    <aside class="panel" aria-label="Eval runs">
      <h3>Runs</h3>
      <div class="list">${runs.data.map((r) => html`<button class="plain run-link" data-run=${r.name}
        onClick=${() => setView({ run: r.name })}>${r.name} <span class="muted">${r.rows ?? "?"} rows</span></button>`)}</div>
      <h3>Compare</h3>
      <label for="compare-a">Run A</label>
      <select id="compare-a" value=${a} onChange=${(e) => setA(e.target.value)}>${runs.data.map((r) => html`<option value=${r.name}>${r.name}</option>`)}</select>
      <label for="compare-b">Run B</label>
      <select id="compare-b" value=${b} onChange=${(e) => setB(e.target.value)}>${runs.data.map((r) => html`<option value=${r.name}>${r.name}</option>`)}</select>
      <p><button id="compare" disabled=${!a || !b} onClick=${() => setView({ a, b })}>Compare</button></p>
    </aside>
    <section>${view === null ? html`<p class="muted">Pick a run, or two to compare.</p>`
      : view.run ? html`<${Run} name=${view.run} />` : html`<${Compare} a=${view.a} b=${view.b} />`}</section>
  </div>`;
}
