// The page: reads a picture into a canvas, hands its pixels to the engine (pkg/, built by
// tools/web/build.sh) and draws the overlay it returns. State for tests and tools is kept
// on window.hrnet: state ('loading', 'ready', 'busy', 'done', 'error'), and after each
// picture its result {width, height, classes, ms, mode}.
import init, { open, classes, palette, segment } from "./pkg/hrnet_ocr_web.js";

const $ = (id) => document.getElementById(id);
const hrnet = (window.hrnet = { state: "loading", result: null, error: null });
const MAX_SIDE = 512;
// Sizes and modes segmented so far: the engine builds a graph for each the first time.
const built = new Set();

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function fail(message) {
  hrnet.state = "error";
  hrnet.error = message;
  setStatus(message, true);
}

async function start() {
  if (!("gpu" in navigator)) {
    fail("This browser has no WebGPU (navigator.gpu is missing). Use Chrome or Edge 113+, " +
      "Safari 26+ or Firefox 141+ on Windows, over https or localhost; in Chromium on Linux, " +
      "start it with --enable-unsafe-webgpu.");
    return;
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    fail("WebGPU is present but offers no adapter: it may be disabled for this GPU or driver " +
      "(see chrome://gpu), or blocked for this site.");
    return;
  }
  const info = adapter.info || {};
  const named = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ");
  await init();
  const engine = await open();
  const fallback = info.isFallbackAdapter ? ", a fallback adapter on the CPU" : "";
  $("adapter").textContent = named ? `${named} (WebGPU${fallback})` : engine;
  const colours = palette();
  classes().forEach((name, i) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.style.background = `rgb(${colours[3 * i]}, ${colours[3 * i + 1]}, ${colours[3 * i + 2]})`;
    li.append(swatch, name);
    $("legend").append(li);
  });
  for (const id of ["file", "example"]) $(id).disabled = false;
  hrnet.state = "ready";
  setStatus("Ready: pick or drop a picture.");
}

/// Draws `bitmap` into the input canvas (shrunk if asked) and returns its pixels.
function draw(bitmap) {
  let [w, h] = [bitmap.width, bitmap.height];
  if ($("shrink").checked && Math.max(w, h) > MAX_SIDE) {
    const s = MAX_SIDE / Math.max(w, h);
    [w, h] = [Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))];
  }
  const canvas = $("input");
  [canvas.width, canvas.height] = [w, h];
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h);
}

async function run(blob) {
  if (hrnet.state === "busy" || hrnet.state === "loading") return;
  hrnet.state = "busy";
  const mode = $("mode").value;
  try {
    const pixels = draw(await createImageBitmap(blob));
    setStatus(`Segmenting ${pixels.width}x${pixels.height} (${mode})…`);
    const started = performance.now();
    const out = await segment(new Uint8Array(pixels.data.buffer), pixels.width, pixels.height, mode);
    const ms = performance.now() - started;
    const canvas = $("overlay");
    [canvas.width, canvas.height] = [out.width, out.height];
    canvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(out.overlay), out.width, out.height), 0, 0);
    hrnet.result = { width: out.width, height: out.height, classes: Array.from(out.classes), ms, mode };
    const key = `${out.width}x${out.height} ${mode}`;
    const first = !built.has(key);
    built.add(key);
    $("time").textContent = `${ms.toFixed(0)} ms for ${out.width}x${out.height} (${mode})` +
      (first ? ", building its graph too: the next picture of this size is faster" : "");
    hrnet.state = "done";
    setStatus("Done.");
  } catch (e) {
    // Another picture may still be tried.
    fail(`Could not segment this picture: ${e && e.message ? e.message : e}`);
  }
}

$("file").addEventListener("change", (e) => e.target.files[0] && run(e.target.files[0]));
$("example").addEventListener("click", async () => run(await (await fetch("pkg/scene.png")).blob()));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) run(file);
});
hrnet.segmentExample = (mode) => {
  if (mode) $("mode").value = mode;
  $("example").click();
};

start().catch((e) => fail(`Could not start the engine: ${e && e.message ? e.message : e}`));
