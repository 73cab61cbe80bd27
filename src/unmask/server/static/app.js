// The playground: one streaming completion with `diffusing: true`, drawn step by step.
// No build step and no dependencies: the browser's fetch + ReadableStream read the SSE stream.
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Whitespace made visible so a committed newline or space shows where it landed.
function show(tok) {
  return tok.replace(/\n/g, "↵\n").replace(/\t/g, "⇥");
}

// A template's text with {{hole:N}} markers -> the API's list of text spans and {"hole": N}.
function parseTemplate(text) {
  const out = [];
  let at = 0;
  for (const m of text.matchAll(/\{\{hole:(\d+)\}\}/g)) {
    if (m.index > at) out.push(text.slice(at, m.index));
    out.push({ hole: Number(m[1]) });
    at = m.index + m[0].length;
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}

function drawCanvas(canvas) {
  const fresh = new Set(canvas.committed);
  const revised = new Set(canvas.revised || []);
  const inHole = (i) => !canvas.holes || canvas.holes.some(([a, b]) => a <= i && i < b);
  const frag = document.createDocumentFragment();
  canvas.tokens.forEach((tok, i) => {
    const span = document.createElement("span");
    if (tok === null) {
      span.className = revised.has(i) ? "tok masked revised" : "tok masked";
      span.textContent = "░";
    } else {
      span.className = fresh.has(i) ? "tok new" : inHole(i) ? "tok" : "tok fixed";
      span.textContent = show(tok);
    }
    frag.appendChild(span);
  });
  $("canvas").replaceChildren(frag);
  $("step").textContent = `step ${canvas.step} · ${canvas.masked} masked`;
}

function drawStats(stats, usage) {
  $("stat-tps").textContent = stats.tokens_per_second.toFixed(1);
  $("stat-nfe").textContent = String(stats.nfe);
  $("stat-tpf").textContent = stats.tokens_per_forward.toFixed(2);
  $("stat-tokens").textContent = String(usage.completion_tokens);
  $("stat-latency").textContent = (stats.seconds * 1000).toFixed(0) + " ms";
}

async function generate() {
  const body = {
    prompt: $("prompt").value, stream: true, diffusing: true,
    policy: $("policy").value || undefined, threshold: num("threshold"), block_size: num("block-size"),
    fallback: $("fallback").value || undefined,
    max_tokens: num("max-tokens"), steps: num("steps"), temperature: num("temperature"), remask: num("remask"),
  };
  const suffix = $("suffix").value;
  if (suffix) body.suffix = suffix;
  const template = $("template").value;
  if (template) { body.template = parseTemplate(template); delete body.max_tokens; }
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false;
  $("output").textContent = ""; $("canvas").replaceChildren(); $("holes").replaceChildren();
  for (const id of ["stat-tps", "stat-nfe", "stat-tpf", "stat-tokens", "stat-latency"]) $(id).textContent = "–";
  setStatus("generating…");
  try {
    const res = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: { message: res.statusText } }));
      throw new Error(`${res.status}: ${err.error.message}`);
    }
    await readStream(res);
  } catch (e) {
    if (e.name !== "AbortError") setStatus(e.message, true);
    else setStatus("stopped");
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; controller = null;
  }
}

function drawHoles(holes) {
  $("holes").replaceChildren(...holes.map((h) => {
    const li = document.createElement("li");
    li.textContent = `${JSON.stringify(h.text)} · ${h.tokens} tokens · ${h.finish_reason}`;
    return li;
  }));
}

async function readStream(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice) {
        if (choice.canvas) drawCanvas(choice.canvas);
        text += choice.text;
        $("output").textContent = text;
        if (choice.finish_reason) setStatus(`done (${choice.finish_reason})`);
        if (choice.holes) drawHoles(choice.holes);
      }
      if (chunk.stats) drawStats(chunk.stats, chunk.usage);
    }
  }
}

async function init() {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const m = (await res.json()).data[0];
    $("model").textContent = `${m.id} · ${m.attention} attention · ${m.max_model_len} ctx`;
    const g = m.generation || {};
    if (g.policy) $("policy").querySelector("option[value='']").textContent = `model default (${g.policy})`;
    if (g.threshold !== undefined) $("threshold").placeholder = String(g.threshold);
    if (g.fallback) $("fallback").querySelector("option[value='']").textContent = `model default (${g.fallback})`;
    if (g.block_size !== undefined) $("block-size").placeholder = String(g.block_size);
    if (g.max_tokens !== undefined) $("max-tokens").placeholder = String(g.max_tokens);
  } catch (e) {
    $("model").textContent = "model: unknown (set the API key?)";
  }
}

init();
