// Small line charts (uPlot) and bar histograms, as Preact components.
import { html, useEffect, useRef } from "./vendor/htm-preact-standalone.module.js";
import uPlot from "./vendor/uPlot.esm.js";

const COLOURS = ["#2457c5", "#d9480f", "#1a7f37", "#8250df"];

// xs: shared x values; series: [{label, values}] (null where a series has no point).
export function LineChart({ id, title, xs, series, height = 160, xLabel = "" }) {
  const box = useRef(null);
  const plot = useRef(null);
  const data = [xs, ...series.map((s) => s.values)];
  useEffect(() => {
    const width = Math.max(240, box.current.clientWidth || 320);
    plot.current = new uPlot({
      width, height, title,
      scales: { x: { time: false } },
      axes: [{ label: xLabel, stroke: "currentColor" }, { stroke: "currentColor" }],
      series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: COLOURS[i % 4], width: 2, spanGaps: true, points: { show: xs.length < 60 } }))],
    }, data, box.current);
    return () => plot.current.destroy();
  }, [series.length]);
  useEffect(() => { plot.current && plot.current.setData(data); });
  return html`<div class="chart" id=${id} ref=${box} role="img" aria-label=${title}
    data-points=${xs.length}></div>`;
}

export function Bars({ bins, label }) {
  const top = Math.max(1, ...bins.map((b) => b.count));
  return html`<div class="bars" role="img" aria-label=${label}>
    ${bins.map((b) => html`<div style=${`height:${(100 * b.count) / top}%`} title=${`${b.range || b.label}: ${b.count}`}></div>`)}
  </div>
  <div class="row muted" style="font-size:.7rem"><span>${bins.length ? bins[0].label : ""}</span>
    <span style="text-align:right">${bins.length ? bins[bins.length - 1].label : ""}</span></div>`;
}
