// Models: what the server serves (context, runtime, adapters where listed), LoRA adapters loaded
// and unloaded at runtime (POST /v1/load_lora_adapter, /v1/unload_lora_adapter), /metrics live.
import { html, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api, parseMetrics } from "./api.js";
import { LineChart } from "./chart.js";

const EVERY_MS = 2000;
const KEEP = 90; // points per chart: three minutes

// An adapter's card id is BASE+NAME; the unload endpoint takes NAME.
const adapterName = (m) => m.id.slice(m.id.lastIndexOf("+") + 1);

export function Models({ models, refresh }) {
  const [form, setForm] = useState({ name: "", path: "" });
  const [note, setNote] = useState(null);
  const act = async (path, body) => {
    try {
      setNote({ ok: true, text: await api(path, body, { text: true }) });
      if (refresh) await refresh();
    } catch (e) {
      setNote({ ok: false, text: String(e.message || e) });
    }
  };
  const [history, setHistory] = useState({ t: [], tps: [], running: [], waiting: [], kv: [], hit: [] });
  const [latest, setLatest] = useState(null);
  useEffect(() => {
    let last = null;
    let alive = true;
    const tick = async () => {
      try {
        const m = parseMetrics(await api("/metrics", undefined, { text: true }));
        const now = Date.now() / 1000;
        const tokens = m["sorai_generation_tokens_total"] || 0;
        const tps = last ? Math.max(0, (tokens - last.tokens) / (now - last.now)) : 0;
        last = { tokens, now };
        if (!alive) return;
        setLatest(m);
        setHistory((h) => {
          const push = (list, v) => [...list, v].slice(-KEEP);
          return {
            t: push(h.t, now), tps: push(h.tps, tps),
            running: push(h.running, m["sorai_num_requests_running"] || 0),
            waiting: push(h.waiting, m["sorai_num_requests_waiting"] || 0),
            kv: push(h.kv, 100 * (m["sorai_kv_cache_usage_ratio"] || 0)),
            hit: push(h.hit, 100 * (m["sorai_prefix_cache_hit_rate"] || 0)),
          };
        });
      } catch (e) { /* the next tick tries again */ }
    };
    tick();
    const timer = setInterval(tick, EVERY_MS);
    return () => { alive = false; clearInterval(timer); };
  }, []);
  const xs = history.t.map((t) => Math.round(t - (history.t[0] || t)));
  return html`
    <h2>Served models</h2>
    <div class="cards">
      ${models.map((m) => html`<div class="panel model-card">
        <h3>${m.id}</h3>
        <table><tbody>
          <tr><th>owned by</th><td>${m.owned_by}</td></tr>
          ${m.max_model_len && html`<tr><th>context</th><td>${m.max_model_len} tokens</td></tr>`}
          ${m.parent && html`<tr><th>base</th><td>${m.parent}</td></tr>`}
          ${m.loaded === false && html`<tr><th>loaded</th><td>no: loads on the first request naming it</td></tr>`}
          ${m.root && m.root !== m.id && html`<tr><th>root</th><td>${m.root}</td></tr>`}
          ${Object.entries(m.runtime || {}).map(([k, v]) => html`<tr><th>${k}</th><td>${typeof v === "object" ? JSON.stringify(v) : String(v)}</td></tr>`)}
          ${Object.entries(m).filter(([k]) => ["lora", "adapter", "rank", "memory_bytes"].includes(k))
            .map(([k, v]) => html`<tr><th>${k}</th><td>${typeof v === "object" ? JSON.stringify(v) : String(v)}</td></tr>`)}
        </tbody></table>
        ${m.parent && html`<button type="button" class="unload" data-adapter=${adapterName(m)}
          onClick=${() => act("/v1/unload_lora_adapter", { lora_name: adapterName(m) })}>Unload</button>`}
      </div>`)}
    </div>
    <h2>Load a LoRA adapter</h2>
    <form class="panel" id="adapter-load" onSubmit=${(e) => {
      e.preventDefault();
      act("/v1/load_lora_adapter", { lora_name: form.name, lora_path: form.path });
    }}>
      <label for="adapter-name">Name (served as BASE+NAME)</label>
      <input id="adapter-name" required value=${form.name}
        onInput=${(e) => setForm({ ...form, name: e.target.value })} />
      <label for="adapter-path">PEFT adapter directory on the server</label>
      <input id="adapter-path" required value=${form.path}
        onInput=${(e) => setForm({ ...form, path: e.target.value })} />
      <p><button type="submit" id="adapter-submit">Load</button></p>
      ${note && html`<p id="adapter-note" role=${note.ok ? "status" : "alert"}
        class=${note.ok ? "muted" : "error"}>${note.text}</p>`}
    </form>
    <h2>Live metrics <span class="muted">(/metrics every ${EVERY_MS / 1000}s)</span></h2>
    ${latest && html`<p class="muted" id="metrics-now">generated ${latest["sorai_generation_tokens_total"] || 0} tokens ·
      ${latest["sorai_num_requests_running"] || 0} running · ${latest["sorai_num_requests_waiting"] || 0} waiting</p>`}
    <div class="cards">
      <div class="panel"><${LineChart} id="chart-tps" title="tokens/s" xs=${xs} series=${[{ label: "tokens/s", values: history.tps }]} /></div>
      <div class="panel"><${LineChart} id="chart-queue" title="requests" xs=${xs} series=${[{ label: "running", values: history.running }, { label: "waiting", values: history.waiting }]} /></div>
      <div class="panel"><${LineChart} id="chart-kv" title="KV cache used %" xs=${xs} series=${[{ label: "KV %", values: history.kv }]} /></div>
      <div class="panel"><${LineChart} id="chart-hit" title="prefix-cache hit rate %" xs=${xs} series=${[{ label: "hit %", values: history.hit }]} /></div>
    </div>`;
}
