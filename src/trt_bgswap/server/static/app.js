// The try-it page: the photo goes to /v1/mask and /v1/replace as multipart forms; answers are shown
// as object URLs (nothing is stored), the result can be downloaded. Errors show the server's one line.
"use strict";
const $ = (id) => document.getElementById(id);
const urls = [];

function show(img, blob) {
  const url = URL.createObjectURL(blob);
  urls.push(url);
  img.src = url;
  return url;
}

async function post(route, fields) {
  const body = new FormData();
  for (const [k, v] of Object.entries(fields)) if (v !== "" && v !== undefined) body.append(k, v);
  const r = await fetch(route, { method: "POST", body });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("image").files[0];
  if (!file) return;
  while (urls.length) URL.revokeObjectURL(urls.pop());
  for (const id of ["mask-view", "result-view"]) $(id).removeAttribute("src");
  $("download").hidden = true;
  const status = $("status");
  status.className = "";
  status.textContent = "working...";
  $("go").disabled = true;
  show($("input-view"), file);
  try {
    const t0 = performance.now();
    const mask = await post("/v1/mask", { image: file });
    show($("mask-view"), await mask.blob());
    const fmt = $("format").value;
    const res = await post("/v1/replace", {
      image: file, prompt: $("prompt").value, seed: $("seed").value,
      steps: $("steps").value, guidance: $("guidance").value, format: fmt,
      harmonize: $("harmonize").value, shadow: $("shadow").checked ? "true" : "",
    });
    const url = show($("result-view"), await res.blob());
    const seed = res.headers.get("X-Seed");
    const a = $("download");
    a.href = url;
    a.download = file.name.replace(/\.[^.]*$/, "") + "_bgswap." + (fmt === "jpeg" ? "jpg" : fmt);
    a.hidden = false;
    status.textContent = `done in ${((performance.now() - t0) / 1000).toFixed(1)} s (seed ${seed}, generated at ${res.headers.get("X-Generation-Size")})`;
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  } finally {
    $("go").disabled = false;
  }
});
