// blockdiff live denoising view: streams /v1/completions with stream_denoise and draws every step; replays a
// `blockdiff generate --trace` JSONL file the same way. Plain JS, no build step, nothing fetched but this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { slots: [], conf: [], nFinal: 0, eos: [], blockSize: 0, edits: 0, steps: 0 };
let errors = 0;
const countError = () => { errors += 1; $("errors").textContent = errors; };
window.addEventListener("error", countError);
window.addEventListener("unhandledrejection", countError);
const consoleError = console.error.bind(console);
console.error = (...args) => { countError(); consoleError(...args); };

function reset() {
  Object.assign(state, { slots: [], conf: [], nFinal: 0, eos: [], edits: 0, steps: 0 });
  $("canvas").textContent = ""; $("final").textContent = "";
  for (const id of ["step", "ntok", "nedit"]) $(id).textContent = "0";
  $("tpf").textContent = "-"; $("block").textContent = "-";
}

function shade(c) { return c === undefined ? "" : `rgba(60, 120, 220, ${(0.08 + 0.5 * c).toFixed(3)})`; }

function draw(marks) {
  const root = $("canvas"), B = state.blockSize || 32;
  root.textContent = "";
  let block = null;
  state.slots.forEach((text, i) => {
    if (i % B === 0 || block === null) { block = document.createElement("span"); block.className = "block"; root.appendChild(block); }
    const s = document.createElement("span");
    s.className = "slot";
    if (text === null) { s.classList.add("mask"); s.textContent = "\u2592"; }
    else {
      s.textContent = state.eos.includes(i) ? "\u220e" : text.replace(/\n/g, "\u21b5");
      if (state.eos.includes(i)) s.classList.add("eos");
      s.style.background = shade(state.conf[i]);
      s.title = `slot ${i}` + (state.conf[i] !== undefined ? `, confidence ${state.conf[i]}` : "");
    }
    if (i < state.nFinal) s.classList.add("final");
    const m = marks[i];
    if (m) { s.classList.add(m.kind); if (m.kind === "t2t") s.title += `, edited ${JSON.stringify(m.prev)} -> ${JSON.stringify(m.text)}`; }
    block.appendChild(s);
  });
  const n = state.slots.filter((t) => t !== null).length;
  $("ntok").textContent = n; $("nedit").textContent = state.edits; $("step").textContent = state.steps;
  $("tpf").textContent = state.steps ? (n / state.steps).toFixed(2) : "-";
}

function applyStep(st) {  // st: the server's `blockdiff` field of a chunk (serve/text.py denoise_state)
  state.slots = st.slots; state.nFinal = st.n_final; state.eos = st.eos; state.steps = st.step;
  const marks = {};
  for (const e of st.events) { state.conf[e.i] = e.conf; marks[e.i] = e; if (e.kind === "t2t") state.edits += 1; }
  $("block").textContent = st.block;
  draw(marks);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function body() {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const b = { stream: true, stream_denoise: true, max_tokens: num("max_tokens"), temperature: 0 };
  const mode = $("mode").value;
  if (mode !== "ar") b.mode = mode;
  for (const f of ["threshold", "edit_threshold", "block_size"]) if (num(f) !== undefined) b[f] = num(f);
  if ($("chat").checked) b.messages = [{ role: "user", content: $("prompt").value }];
  else b.prompt = $("prompt").value;
  return b;
}

async function run() {
  reset();
  $("status").textContent = "decoding"; $("run").disabled = true;
  const b = body(), url = b.messages ? "/v1/chat/completions" : "/v1/completions", delay = Number($("delay").value) || 0;
  try {
    const resp = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(b) });
    if (!resp.ok) { const e = await resp.json(); $("status").textContent = `error ${resp.status}: ${e.error.message}`; return; }
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, k).trim(); buf = buf.slice(k + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const msg = JSON.parse(line.slice(6));
        if (msg.error) { $("status").textContent = `error: ${msg.error.message}`; continue; }
        const ch = msg.choices[0];
        if (!ch) continue;
        const delta = ch.text !== undefined ? ch.text : (ch.delta.content || "");
        $("final").textContent += delta;
        if (msg.blockdiff) { state.blockSize = state.blockSize || Number($("block_size").value) || window.BLOCKDIFF_DEFAULTS.block_size || 32; applyStep(msg.blockdiff); if (delay) await sleep(delay); }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
    }
    $("status").textContent = `done (${finish})`;
  } finally { $("run").disabled = false; document.title = "blockdiff: done"; }
}

// ---------------------------------------------------------------------------------------------- trace replay
let trace = null;
$("trace").addEventListener("change", async (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  trace = (await f.text()).split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
  $("replay").disabled = !trace.length || trace[0].type !== "meta";
  $("status").textContent = $("replay").disabled ? "not a blockdiff trace" : `trace loaded (${trace.length} lines)`;
});

async function replay() {
  reset();
  const meta = trace[0], row = Number($("trace_row").value) || 0, P = meta.prompts[row].length;
  const eos = new Set(meta.eos_ids || []), budget = meta.config.max_new_tokens;
  state.blockSize = meta.config.block_size;
  const steps = new Map();
  for (const x of trace) if (x.type === "event" && x.row === row) { if (!steps.has(x.step)) steps.set(x.step, []); steps.get(x.step).push(x); }
  const slots = [], delay = Number($("delay").value) || 150;
  for (const [step, evs] of [...steps.entries()].sort((a, b) => a[0] - b[0])) {
    const hi = Math.min((evs[0].block + 1) * meta.config.block_size, P + budget) - P;
    while (slots.length < hi) slots.push(null);
    const st = { step, block: evs[0].block, n_final: 0, slots, eos: [], events: [] };
    for (const e of evs) {
      const text = e.text !== undefined ? e.text : String(e.token), i = e.pos - P;
      st.events.push({ i, kind: e.kind, conf: e.conf, text, prev: slots[i] });
      slots[i] = text;
      if (eos.has(e.token)) state.eos.push(i);
    }
    st.eos = state.eos;
    applyStep(st);
    await sleep(delay);
  }
  const done = trace.find((x) => x.type === "done" && x.row === row);
  $("status").textContent = done ? `replayed (${done.stop_reason}, ${done.forwards} forwards)` : "replayed";
}

$("run").addEventListener("click", run);
$("replay").addEventListener("click", replay);
(() => {  // defaults from the server; ?prompt=...&mode=...&max_tokens=...&autorun=1 fills the form and runs
  const d = window.BLOCKDIFF_DEFAULTS || {};
  if (d.mode === "ar") { const o = document.createElement("option"); o.textContent = "ar"; $("mode").appendChild(o); }
  if (d.mode) $("mode").value = d.mode;
  if (d.max_tokens) $("max_tokens").value = d.max_tokens;
  const q = new URLSearchParams(location.search);
  for (const f of ["prompt", "mode", "threshold", "edit_threshold", "max_tokens", "block_size", "delay"]) if (q.has(f)) $(f).value = q.get(f);
  if (q.get("chat") === "1") $("chat").checked = true;
  if (q.get("autorun") === "1") run();
})();
