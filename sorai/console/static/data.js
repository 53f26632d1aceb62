// Data: the indexes the server was started with (--index), search with scores, and ask with
// citations that open the cited passage.
import { html, useEffect, useState } from "./vendor/htm-preact-standalone.module.js";
import { api } from "./api.js";

function Passage({ index, id, onClose }) {
  const [chunk, setChunk] = useState(null);
  const [error, setError] = useState("");
  useEffect(() => {
    setChunk(null);
    api(`/v1/sorai/indexes/${encodeURIComponent(index)}/chunks/${id}`).then(setChunk, (e) => setError(e.message));
  }, [index, id]);
  return html`<div class="panel" id="passage" role="region" aria-label="Cited passage" tabindex="-1">
    <div class="row"><h3>Passage ${id}</h3><button class="plain" onClick=${onClose}>Close</button></div>
    ${error && html`<p class="error">${error}</p>`}
    ${chunk && html`<p class="muted">${chunk.path}${chunk.page ? `, page ${chunk.page}` : ""}${chunk.heading ? ` · ${chunk.heading}` : ""}</p>
      <pre style="white-space:pre-wrap" id="passage-text">${chunk.text}</pre>`}
  </div>`;
}

export function Data({ models }) {
  const [indexes, setIndexes] = useState(null);
  const [name, setName] = useState("");
  const [query, setQuery] = useState("");
  const [mode, setMode] = useState("hybrid");
  const [k, setK] = useState(5);
  const [hits, setHits] = useState(null);
  const [answer, setAnswer] = useState(null);
  const [open, setOpen] = useState(null);
  const [busy, setBusy] = useState("");
  const [error, setError] = useState("");
  useEffect(() => {
    api("/v1/sorai/indexes").then((r) => { setIndexes(r.data); if (r.data.length) setName(r.data[0].name); }, (e) => setError(e.message));
  }, []);
  if (indexes === null) return html`<p class="muted">${error || "Loading indexes…"}</p>`;
  if (!indexes.length)
    return html`<p class="muted" id="no-indexes">The server knows no index. Build one with
      <code>sorai index add docs/ --index docs.sqlite</code> and start the server with
      <code>sorai serve --index docs=docs.sqlite</code>.</p>`;
  const run = async (what) => {
    if (!query.trim()) return;
    setBusy(what); setError(""); setOpen(null);
    const path = `/v1/sorai/indexes/${encodeURIComponent(name)}/${what}`;
    try {
      if (what === "search") { setAnswer(null); setHits((await api(path, { query, mode, k: Number(k) })).data); }
      else { setHits(null); setAnswer(await api(path, { question: query, mode, k: Number(k) })); }
    } catch (e) { setError(e.message); } finally { setBusy(""); }
  };
  const info = indexes.find((i) => i.name === name) || indexes[0];
  return html`<div class="layout">
    <aside class="panel" aria-label="Indexes">
      <label for="index-name">Index</label>
      <select id="index-name" value=${name} onChange=${(e) => setName(e.target.value)}>
        ${indexes.map((i) => html`<option value=${i.name}>${i.name}</option>`)}
      </select>
      <p class="muted">${info.documents} documents · ${info.chunks} passages · ${info.embedding_model || "no vectors"}</p>
      <details><summary>Files</summary><ul>${info.files.map((f) => html`<li>${f}</li>`)}</ul></details>
      <label for="search-mode">Search mode</label>
      <select id="search-mode" value=${mode} onChange=${(e) => setMode(e.target.value)}>
        <option value="hybrid">hybrid</option><option value="vector">vector</option><option value="keyword">keyword</option>
      </select>
      <label for="search-k">Passages (k)</label>
      <input id="search-k" type="number" min="1" max="50" value=${k} onInput=${(e) => setK(e.target.value)} />
    </aside>
    <section aria-label="Search and ask">
      <form onSubmit=${(e) => { e.preventDefault(); run("ask"); }}>
        <label for="data-query">Question or search terms</label>
        <input id="data-query" value=${query} onInput=${(e) => setQuery(e.target.value)} />
        <div class="row" style="margin-top:.5rem">
          <button type="submit" id="ask" disabled=${!!busy}>Ask</button>
          <button type="button" id="search" disabled=${!!busy} onClick=${() => run("search")}>Search</button>
          ${busy && html`<span class="muted">${busy === "ask" ? "asking…" : "searching…"}</span>`}
        </div>
      </form>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      ${answer && html`<div class="panel" id="answer" style="margin-top:1rem">
        <p>${answer.text}</p>
        ${answer.citations.length ? html`<p class="muted">Sources:</p><ul id="citations">
          ${answer.citations.map((c) => html`<li><a href="#" class="citation" data-chunk=${c.chunk_id}
            onClick=${(e) => { e.preventDefault(); setOpen(c.chunk_id); }}>[${c.number}] ${c.path}${c.page ? `, page ${c.page}` : ""}</a></li>`)}
        </ul>` : html`<p class="muted">No citations.</p>`}
      </div>`}
      ${hits && html`<div id="hits">${hits.length ? hits.map((h) => html`<div class="hit">
        <div class="row"><strong>${h.path}${h.page ? `, page ${h.page}` : ""}</strong>
          <span class="muted score">score ${h.score.toFixed(4)}${h.vector_rank ? ` · vector #${h.vector_rank}` : ""}${h.keyword_rank ? ` · keyword #${h.keyword_rank}` : ""}</span>
          <button class="plain" onClick=${() => setOpen(h.chunk_id)}>Open</button></div>
        <div>${h.text.slice(0, 300)}${h.text.length > 300 ? "…" : ""}</div></div>`) : html`<p class="muted">No passage matches.</p>`}</div>`}
      ${open !== null && html`<${Passage} index=${name} id=${open} onClose=${() => setOpen(null)} />`}
    </section>
  </div>`;
}
