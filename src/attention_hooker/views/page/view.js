// Offline attention viewer: decodes the inlined payload and draws three linked views.
(function () {
  "use strict";
  const meta = JSON.parse(document.getElementById("ah-meta").textContent);
  const $ = (id) => document.getElementById(id);
  const status = $("ah-status");
  const ROW = 16; // px per token row in the head view
  const LABEL = meta.labelChars; // the most characters a label shows (as in the plots); the whole text (up to 1,000) is on hover
  const shortLabel = (text) => {
    if (text.length <= LABEL) return text;
    const chars = Array.from(text); // characters, so that a cut never splits a surrogate pair
    return chars.length <= LABEL ? text : chars.slice(0, LABEL - 1).join("") + "…";
  };
  const TOP = meta.encoding.top, BAD = meta.encoding.nonfinite;
  // Codes 1..TOP are log-spaced over DECADES decades below the head's largest weight (TOP); 0 is 0.
  // RATIO[code]: the weight over the head's largest, each within ERROR of the captured one.
  const DECADES = meta.encoding.decades, ERROR = meta.encoding.relativeError, RATIO = new Float64Array(256);
  for (let c = 1; c <= TOP; c++) RATIO[c] = 10 ** ((DECADES * (c - TOP)) / (TOP - 1));
  const state = { layer: 0, call: 0, batch: 0, head: 0, query: 0, hidden: new Set(), data: null, scale: "linear",
                  relative: false, oneHead: false, detail: null, colourBy: "" };
  state.rowwise = false;  // "brightest: each query's largest" (else each head's largest)
  // Tokens, and words when the page carries them (to_words): the "units" selector swaps meta.layers.
  const UNITS = { tokens: meta.layers, words: meta.words ? meta.words.layers : null };
  const WINDOW = 64; // tokens a side of a long call's detail (a click on its pooled map)
  // Colour index of a code: linear in the weight, or its square root (small weights show).
  // Log: the DECADES decades the codes keep (smaller weights, and zeros, are the darkest colour).
  const scaled = (x) => (state.scale === "sqrt" ? Math.sqrt(x) : state.scale === "log"
    ? (x > 0 ? Math.max(0, 1 + Math.log10(x) / DECADES) : 0) : x);
  const SHADE = new Uint8Array(256);  // colour index of each code in the scale shadesOf
  let shadesOf = null;
  const shade = (code) => {
    if (shadesOf !== state.scale) {
      for (let c = 0; c <= TOP; c++) SHADE[c] = Math.round(scaled(RATIO[c]) * 255);
      shadesOf = state.scale;
    }
    return SHADE[code];
  };
  // Each row's largest code (a pooled map: each block row's), for "brightest: each query's largest".
  function rowMaxima(codes, Q, K) {
    const out = new Uint8Array(Q);
    for (let q = 0; q < Q; q++) {
      let best = 0;
      for (let k = q * K, end = k + K; k < end; k++) if (codes[k] !== BAD && codes[k] > best) best = codes[k];
      out[q] = best;
    }
    return out;
  }

  // Colour map: viridis anchors, interpolated to 256 entries.
  const ANCHORS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                   [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const LUT = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (ANCHORS.length - 1), k = Math.min(Math.floor(x), ANCHORS.length - 2), f = x - k;
    for (let c = 0; c < 3; c++) LUT[i * 3 + c] = ANCHORS[k][c] + f * (ANCHORS[k + 1][c] - ANCHORS[k][c]);
  }
  const headColor = (h, n) => `hsl(${Math.round((360 * h) / Math.max(n, 1))}, 70%, 45%)`;

  async function decodePayload() {
    const text = document.getElementById("ah-payload").textContent.trim();
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  const layerCall = (layer, call) => {
    const calls = meta.layers[layer].calls;
    return calls[Math.min(call, calls.length - 1)];
  };
  // An axis's labels: a list's index, one index per batch item (tokens given per item), or none (positions).
  const tokensOf = (index, n) => {
    const i = Array.isArray(index) ? index[Math.min(state.batch, index.length - 1)] : index;
    return i === null || i === undefined ? Array.from({ length: n }, (_, j) => String(j)) : meta.tokenSets[i];
  };

  // One head's matrix as codes (Uint8Array view, row-major query x key) and its scale. A long
  // call gives its pooled map: Q x K blocks of tokens (blockOf), each its largest code.
  function matrix(layer, call, batch, head) {
    const c = layerCall(layer, call);
    const [B, H, Q, K] = c.shape;
    const b = Math.min(batch, B - 1), h = Math.min(head, H - 1);
    if (c.pooled) {
      const [, , PQ, PK] = c.pooled.shape;
      const start = c.pooled.offset + (b * H + h) * PQ * PK;
      return { codes: state.data.subarray(start, start + PQ * PK), scale: c.scales[b * H + h], Q: PQ, K: PK, c,
               b, h, pooled: true };
    }
    const start = c.offset + (b * H + h) * Q * K;
    return { codes: state.data.subarray(start, start + Q * K), scale: c.scales[b * H + h], Q, K, c, b, h };
  }

  // The tokens of block i of a long call's pooled map along axis 0 (queries) or 1 (keys): from
  // first to end - 1. The page decides no block: Python gives each block's first token (edges,
  // by attention_hooker._blocks, the rule of PooledAttention), blocks of uneven width.
  const blockOf = (c, axis, i) => {
    const edges = c.pooled.edges[axis];
    return { first: edges[i], end: edges[i + 1] };
  };
  // "8" when every block of the axis is 8 tokens wide, else "7-8".
  const blockWidths = (c, axis) => {
    const edges = c.pooled.edges[axis];
    let low = Infinity, high = 0;
    for (let i = 1; i < edges.length; i++) {
      low = Math.min(low, edges[i] - edges[i - 1]); high = Math.max(high, edges[i] - edges[i - 1]);
    }
    return low === high ? String(low) : `${low}-${high}`;
  };

  // IEEE half precision bits -> number (the largest weights of long calls travel as float16).
  function half(bits) {
    const sign = bits & 0x8000 ? -1 : 1, exponent = (bits >> 10) & 0x1f, fraction = bits & 0x3ff;
    if (exponent === 0) return sign * fraction * 2 ** -24;
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
  }

  // A long call's query q of head h: its k largest weights' keys, codes (colours) and values,
  // largest first, and the percent of the row's weight they hold.
  function topKeys(c, b, h, q) {
    const t = c.top, [, H, Q] = c.shape, row = (b * H + h) * Q + q;
    const Index = t.indexBytes === 2 ? Uint16Array : Uint32Array;
    const keys = new Index(state.data.buffer, state.data.byteOffset + t.index + row * t.k * t.indexBytes, t.k);
    const bits = new Uint16Array(state.data.buffer, state.data.byteOffset + t.values + row * t.k * 2, t.k);
    return { keys, codes: state.data.subarray(t.codes + row * t.k, t.codes + (row + 1) * t.k),
             values: Array.from(bits, half), cover: state.data[t.cover + row] };
  }

  // The detail of a long call: WINDOW x WINDOW tokens from (q0, k0), each query's top keys
  // inside it as codes (other weights, smaller than the row's k-th, are 0), and the mean cover.
  function detailCodes(m) {
    const [, , Q, K] = m.c.shape, d = state.detail;
    const nq = Math.min(WINDOW, Q), nk = Math.min(WINDOW, K);
    const codes = new Uint8Array(nq * nk), largest = new Uint8Array(nq);  // each row's largest, in or out of the window
    let cover = 0;
    for (let i = 0; i < nq; i++) {
      const t = topKeys(m.c, m.b, m.h, d.q0 + i);
      cover += t.cover;
      largest[i] = t.codes[0] === BAD ? 0 : t.codes[0];
      for (let j = 0; j < t.keys.length; j++) {
        const k = t.keys[j] - d.k0;
        if (k >= 0 && k < nk) codes[i * nk + k] = t.codes[j];
      }
    }
    return { codes, nq, nk, cover: cover / nq, largest };
  }

  const value = (code, scale) => (code === BAD ? NaN : scale * RATIO[code]);

  function paint(canvas, codes, Q, K, outW, outH, masked, largest) {
    // Downsamples by block maximum when the matrix is larger than the canvas. Columns of
    // masked keys (no weight from any query or head) are light grey, not the darkest colour.
    // Each query's largest brightest: a code is read against its row's largest (a log code's
    // ratio to it is the difference of the codes); `largest` gives them where the codes hold part
    // of each row (a long call's detail window).
    const rows = state.rowwise ? largest || rowMaxima(codes, Q, K) : null;
    canvas.width = outW; canvas.height = outH;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(outW, outH);
    const px = img.data;
    for (let y = 0; y < outH; y++) {
      const q0 = Math.floor((y * Q) / outH), q1 = Math.max(q0 + 1, Math.floor(((y + 1) * Q) / outH));
      for (let x = 0; x < outW; x++) {
        const k0 = Math.floor((x * K) / outW), k1 = Math.max(k0 + 1, Math.floor(((x + 1) * K) / outW));
        let best = 0, bad = false;
        for (let q = q0; q < q1; q++) {
          const row = q * K, lift = rows ? TOP - rows[q] : 0;
          for (let k = k0; k < k1; k++) {
            const v = codes[row + k];
            if (v === BAD) bad = true; else if (v > 0 && v + lift > best) best = v + lift;
          }
        }
        const o = (y * outW + x) * 4;
        let hidden = masked !== undefined && masked.size > 0;
        for (let k = k0; hidden && k < k1; k++) hidden = masked.has(k);
        if (bad) { px[o] = 220; px[o + 1] = 20; px[o + 2] = 20; }
        else if (hidden) { px[o] = 215; px[o + 1] = 215; px[o + 2] = 215; }
        else { const l = shade(best) * 3; px[o] = LUT[l]; px[o + 1] = LUT[l + 1]; px[o + 2] = LUT[l + 2]; }
        px[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function fillSelect(select, n, label) {
    select.innerHTML = "";
    for (let i = 0; i < n; i++) {
      const opt = document.createElement("option");
      opt.value = String(i); opt.textContent = label(i);
      select.appendChild(opt);
    }
  }

  function syncSelectors() {
    const c = layerCall(state.layer, state.call);
    const calls = meta.layers[state.layer].calls.length;
    state.call = Math.min(state.call, calls - 1);
    fillSelect($("ah-call"), calls, (i) => `${i + 1} of ${calls}`);
    $("ah-call").value = String(state.call);
    $("ah-call-label").style.display = calls > 1 ? "" : "none";
    const [B, H] = c.shape;
    state.batch = Math.min(state.batch, B - 1);
    state.head = Math.min(state.head, H - 1);
    fillSelect($("ah-batch"), B, String);
    $("ah-batch").value = String(state.batch);
    $("ah-batch-label").style.display = B > 1 ? "" : "none";
    fillSelect($("ah-head"), H, String);
    $("ah-head").value = String(state.head);
    $("ah-layer").value = String(state.layer);
  }

  // A head's score (the overview's colour): the layer's given scores, else the call's own per batch item.
  function scoreOf(li, h, name) {
    const layer = meta.layers[li];
    if (layer.scores && name in layer.scores) return layer.scores[name][h];
    const c = layerCall(li, state.call), per = c.scores && c.scores[name];
    if (!per) return null;
    const row = per[Math.min(state.batch, per.length - 1)];
    return h < row.length ? row[h] : null;
  }

  function scoreNames() {
    const names = new Set();
    meta.layers.forEach((layer, li) => {
      Object.keys(layerCall(li, state.call).scores || {}).forEach((n) => names.add(n));
      Object.keys(layer.scores || {}).forEach((n) => names.add(n));
    });
    return Array.from(names);
  }

  function drawOverview() {
    const box = $("ah-overview");
    box.innerHTML = "";
    const by = state.colourBy;
    let low = Infinity, high = -Infinity, missing = 0;
    if (by) meta.layers.forEach((l, li) => {
      for (let h = 0; h < layerCall(li, state.call).shape[1]; h++) {
        const v = scoreOf(li, h, by);
        if (v !== null && v !== undefined && Number.isFinite(v)) { low = Math.min(low, v); high = Math.max(high, v); }
        else missing += 1;
      }
    });
    if (low > 0) low = 0;  // scores of 0 and up read from 0
    // A score with a stated range (a share: [0, 1]) is coloured on it, so that a best head of 0.01 stays dark.
    const range = by && (meta.scoreRanges || {})[by], why = by && (meta.scoreNotes || {})[by];
    if (range && Number.isFinite(high)) [low, high] = range;
    const grey = missing ? `; grey: does not apply${why ? ` (${why})` : ""}` : "";
    $("ah-overview-legend").textContent = !by ? "" : Number.isFinite(high)
      ? `colour: ${by}, ${low.toPrecision(3)} (dark) to ${high.toPrecision(3)} (bright)`
        + (range ? ", its whole range" : ": the heads' own range (no fixed bound)") + grey
      : `colour: ${by}: does not apply to any head shown${why ? `: ${why}` : ""}`;
    const maxHeads = Math.max(...meta.layers.map((l, i) => layerCall(i, state.call).shape[1]));
    box.style.gridTemplateColumns = `minmax(40px, 90px) repeat(${maxHeads}, minmax(18px, 1fr))`;
    box.appendChild(document.createElement("div"));
    for (let h = 0; h < maxHeads; h++) {
      const lab = document.createElement("div");
      lab.className = "ah-col-label"; lab.textContent = `h${h}`;
      box.appendChild(lab);
    }
    meta.layers.forEach((layer, li) => {
      const label = document.createElement("div");
      label.className = "ah-row-label"; label.textContent = shortLabel(layer.short || layer.name); label.title = layer.name;
      box.appendChild(label);
      const H = layerCall(li, state.call).shape[1];
      for (let h = 0; h < maxHeads; h++) {
        if (h >= H) { box.appendChild(document.createElement("div")); continue; }
        const m = matrix(li, state.call, state.batch, h);
        const cv = document.createElement("canvas");
        cv.dataset.layer = String(li); cv.dataset.head = String(h);
        cv.title = `${layer.name} head ${h}`;
        if (li === state.layer && h === state.head) cv.className = "ah-selected";
        if (by) {  // one flat colour: the head's score
          const v = scoreOf(li, h, by);
          cv.width = 1; cv.height = 1;
          const ctx = cv.getContext("2d");
          if (v === null || v === undefined || !Number.isFinite(v)) {
            ctx.fillStyle = "rgb(215,215,215)";
            cv.title += `: ${by} does not apply${why ? `: ${why}` : ""}`;
          } else {
            const l = Math.round(Math.min(1, Math.max(0, (v - low) / Math.max(high - low, 1e-12))) * 255) * 3;
            ctx.fillStyle = `rgb(${LUT[l]},${LUT[l + 1]},${LUT[l + 2]})`;
            cv.title += `: ${by} ${v.toPrecision(3)}`;
            cv.dataset.score = String(v);
          }
          ctx.fillRect(0, 0, 1, 1);
        } else {
          paint(cv, m.codes, m.Q, m.K, Math.min(m.K, 48), Math.min(m.Q, 48));
        }
        cv.addEventListener("click", () => {  // the head view follows the head picked here
          if (li !== state.layer) state.detail = null;
          state.layer = li; state.head = h; state.query = 0; state.oneHead = true;
          $("ah-lines-heads").value = "one";
          refresh();
        });
        box.appendChild(cv);
      }
    });
  }

  // Masked keys of a pooled map: the blocks whose every key is masked.
  function maskedBlocks(m) {
    const masked = maskedKeys(m.c), out = new Set();
    if (masked.size === 0) return out;
    for (let j = 0; j < m.K; j++) {
      const { first, end } = blockOf(m.c, 1, j);
      let all = true;
      for (let k = first; all && k < end; k++) all = masked.has(k);
      if (all) out.add(j);
    }
    return out;
  }

  function drawMatrix() {
    const m = matrix(state.layer, state.call, state.batch, state.head);
    const cv = $("ah-matrix"), name = shortLabel(meta.layers[state.layer].name);
    const [, , Q, K] = m.c.shape;
    $("ah-matrix-back").hidden = !(m.pooled && state.detail);
    drawLegendLabels(m.scale);
    if (!m.pooled) {
      paint(cv, m.codes, m.Q, m.K, Math.min(m.K, 1024), Math.min(m.Q, 1024), maskedKeys(m.c));
      $("ah-matrix-caption").textContent = `${name}, head ${state.head}: ${m.Q} queries x ${m.K} keys` +
        (meta.promptLength != null && meta.promptLength < m.K
          ? `; the prompt is tokens 0-${meta.promptLength - 1}, ${m.K - meta.promptLength} generated after it` : "");
      return;
    }
    const k = m.c.top.k;
    if (state.detail) {
      const d = detailCodes(m), masked = maskedKeys(m.c), window = new Set();
      for (let j = 0; j < d.nk; j++) if (masked.has(state.detail.k0 + j)) window.add(j);
      paint(cv, d.codes, d.nq, d.nk, d.nk, d.nq, window, d.largest);
      $("ah-matrix-caption").textContent = `${name}, head ${state.head}: queries ${state.detail.q0}-${state.detail.q0 + d.nq - 1}`
        + ` x keys ${state.detail.k0}-${state.detail.k0 + d.nk - 1} of ${Q} x ${K}: each query's ${k} largest weights`
        + ` (on average ${d.cover.toFixed(0)}% of its attention); smaller ones are drawn as 0`;
      return;
    }
    paint(cv, m.codes, m.Q, m.K, Math.min(m.K, 1024), Math.min(m.Q, 1024), maskedBlocks(m));
    $("ah-matrix-caption").textContent = `${name}, head ${state.head}: ${Q} queries x ${K} keys, pooled: each cell is`
      + ` the largest weight of a block of ${blockWidths(m.c, 0)} x ${blockWidths(m.c, 1)} tokens;`
      + " click a block for its tokens";
  }

  // The (query, key) cell under the pointer, in the units of what the matrix shows.
  function cellAt(event, rows, cols) {
    const rect = $("ah-matrix").getBoundingClientRect();
    const k = Math.floor(((event.clientX - rect.left) / rect.width) * cols);
    const q = Math.floor(((event.clientY - rect.top) / rect.height) * rows);
    return q < 0 || k < 0 || q >= rows || k >= cols ? null : [q, k];
  }

  // A number in `digits` significant digits; below 1e-3 as 1.00e-5, not 0.0000100.
  const num = (v, digits) => (v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(digits - 1) : v.toPrecision(digits));
  const shown = (v) => (Number.isNaN(v) ? "non-finite" : v === 0 ? "0" : "~" + num(v, 3));

  function readout(event) {
    const m = matrix(state.layer, state.call, state.batch, state.head);
    const [, , Q, K] = m.c.shape;
    const queries = tokensOf(m.c.queryTokens, Q), keys = tokensOf(m.c.keyTokens, K);
    if (m.pooled && state.detail) {
      const d = detailCodes(m), cell = cellAt(event, d.nq, d.nk);
      if (!cell) return;
      const q = state.detail.q0 + cell[0], k = state.detail.k0 + cell[1], t = topKeys(m.c, m.b, m.h, q);
      const j = Array.from(t.keys).indexOf(k);
      const last = t.values[t.values.length - 1];
      $("ah-readout").textContent = `query ${q} "${shortLabel(queries[q])}" -> key ${k} "${shortLabel(keys[k])}": ` + (j >= 0
        ? shown(t.values[j]) : maskedKeys(m.c).has(k) ? "masked (weight exactly 0 from every query and head)"
        : `not among its ${t.keys.length} largest (at most ~${last.toPrecision(3)})`);
      return;
    }
    const cell = cellAt(event, m.Q, m.K);
    if (!cell) return;
    const [q, k] = cell, code = m.codes[q * m.K + k], v = value(code, m.scale);
    // Code 1 is any weight below DECADES decades under the head's largest: say so rather than "~1e-6".
    const read = code === 1 ? `below ${num(m.scale * RATIO[1] * (1 + ERROR), 2)}` : shown(v);
    if (m.pooled) {
      const bq = blockOf(m.c, 0, q), bk = blockOf(m.c, 1, k);
      $("ah-readout").textContent = `queries ${bq.first}-${bq.end - 1} "${shortLabel(queries[bq.first])}"...`
        + ` -> keys ${bk.first}-${bk.end - 1} "${shortLabel(keys[bk.first])}"...: largest ${read}`;
      return;
    }
    $("ah-readout").textContent = `query ${q} "${shortLabel(queries[q])}" -> key ${k} "${shortLabel(keys[k])}": ${read}`;
  }

  // A click on a long call's pooled map opens the tokens around the block; the head view follows its query.
  function zoom(event) {
    const m = matrix(state.layer, state.call, state.batch, state.head);
    if (!m.pooled || state.detail) return;
    const cell = cellAt(event, m.Q, m.K);
    if (!cell) return;
    const [, , Q, K] = m.c.shape;
    const bq = blockOf(m.c, 0, cell[0]), bk = blockOf(m.c, 1, cell[1]);  // the clicked block's tokens
    const clamp = (x, n) => Math.max(0, Math.min(n - Math.min(WINDOW, n), x));
    const centre = (b) => b.first + Math.floor((b.end - b.first) / 2) - WINDOW / 2;  // the window around the block
    state.detail = { q0: clamp(centre(bq), Q), k0: clamp(centre(bk), K) };
    drawMatrix();
    drawMatrixLabels();
    const q = bq.first;
    selectQuery(q);
    const item = $("ah-queries").children[q];
    if (item) item.scrollIntoView({ block: "center" });
  }

  function drawTokens() {
    const c = layerCall(state.layer, state.call);
    const [, , Q, K] = c.shape;
    const left = $("ah-queries"), right = $("ah-keys");
    left.innerHTML = ""; right.innerHTML = "";
    $("ah-lines").hidden = !!c.pooled;
    $("ah-headview").classList.toggle("ah-long", !!c.pooled);
    tokensOf(c.queryTokens, Q).forEach((t, i) => {
      const d = document.createElement("div");
      d.textContent = shortLabel(t); d.title = `query ${i}: ${t}`; d.dataset.index = String(i);
      if (i === state.query) d.className = "ah-active";
      d.addEventListener("mouseenter", () => selectQuery(i));
      d.addEventListener("click", () => selectQuery(i));
      left.appendChild(d);
    });
    if (c.pooled) return;  // a long call lists each query's largest weights instead (drawTopKeys)
    tokensOf(c.keyTokens, K).forEach((t, i) => {
      const d = document.createElement("div");
      d.textContent = shortLabel(t); d.title = `key ${i}: ${t}`; d.dataset.index = String(i);
      d.addEventListener("mouseenter", () => { $("ah-readout").textContent = d.title; });
      right.appendChild(d);
    });
  }

  function drawToggles() {
    const H = layerCall(state.layer, state.call).shape[1];
    const box = $("ah-head-toggles");
    box.innerHTML = "";
    for (let h = 0; h < H; h++) {
      const b = document.createElement("button");
      b.textContent = `h${h}`; b.style.color = headColor(h, H); b.dataset.head = String(h);
      if (state.hidden.has(h)) b.className = "ah-off";
      if (state.oneHead && h !== state.head) b.classList.add("ah-dim");
      b.addEventListener("click", () => {
        if (state.hidden.has(h)) state.hidden.delete(h); else state.hidden.add(h);
        b.classList.toggle("ah-off");
        drawLines();
        drawImage();
      });
      box.appendChild(b);
    }
  }

  // A long call's head view: for the selected query, each shown head's largest weights.
  function drawTopKeys(c) {
    const [B, H, Q, K] = c.shape, q = Math.min(state.query, Q - 1), b = Math.min(state.batch, B - 1);
    const keys = tokensOf(c.keyTokens, K), masked = maskedKeys(c), box = $("ah-keys");
    box.innerHTML = "";
    const heading = document.createElement("div");
    heading.className = "ah-top-heading";
    heading.textContent = `query ${q}: each head's ${c.top.k} largest weights`;
    box.appendChild(heading);
    for (let h = 0; h < H; h++) {
      if (state.hidden.has(h) || (state.oneHead && h !== state.head)) continue;
      const t = topKeys(c, b, h, q);
      const row = document.createElement("div");
      row.className = "ah-top"; row.dataset.head = String(h);
      row.style.color = headColor(h, H);
      const parts = Array.from(t.keys, (k, j) => `${shortLabel(keys[k])} (${k}) ${shown(t.values[j])}`);
      row.textContent = `h${h}: ` + parts.join(", ");
      row.title = `head ${h}, query ${q}: these ${t.keys.length} keys hold ${t.cover}% of its attention`
        + (masked.size ? `; ${masked.size} masked keys get none` : "");
      box.appendChild(row);
    }
    $("ah-lines-note").textContent = `long input (${Q} x ${K} tokens): the heads' largest weights for query ${q},`
      + " instead of lines";
  }

  function drawLines() {
    const c = layerCall(state.layer, state.call);
    if (c.pooled) { drawTopKeys(c); return; }
    const [, H, Q, K] = c.shape;
    const cv = $("ah-lines");
    cv.height = Math.max(Q, K) * ROW;
    const ctx = cv.getContext("2d");
    ctx.clearRect(0, 0, cv.width, cv.height);
    const q = Math.min(state.query, Q - 1);
    const y0 = q * ROW + ROW / 2;
    const hot = new Float32Array(K), width = new Float32Array(K), best = new Float32Array(K), bestHead = new Int32Array(K).fill(-1);
    for (let h = 0; h < H; h++) {
      if (state.hidden.has(h) || (state.oneHead && h !== state.head)) continue;
      const m = matrix(state.layer, state.call, state.batch, h);
      const row = m.codes.subarray(q * K, q * K + K);
      let top = 0;
      for (let k = 0; k < K; k++) if (row[k] !== BAD && row[k] > top) top = row[k];
      if (top === 0) continue;
      ctx.strokeStyle = headColor(h, H);
      for (let k = 0; k < K; k++) {
        const code = row[k];
        const weight = value(code, m.scale);
        if (code !== BAD && weight > best[k]) { best[k] = weight; bestHead[k] = h; }
        // Absolute: the weight itself, as BertViz draws it (a uniform head draws thin lines);
        // relative: to this head's largest weight for the query (labelled as such in the bar).
        const w = code === BAD ? 1 : state.relative ? RATIO[code] / RATIO[top] : weight;
        if (w < 0.02) continue;
        hot[k] = Math.max(hot[k], w);
        ctx.globalAlpha = Math.min(1, 0.05 + 0.95 * w);
        ctx.lineWidth = 0.5 + 2.5 * w;
        width[k] = Math.max(width[k], ctx.lineWidth);
        ctx.beginPath(); ctx.moveTo(0, y0); ctx.lineTo(cv.width, k * ROW + ROW / 2); ctx.stroke();
      }
    }
    ctx.globalAlpha = 1;
    const drawn = width.some((x) => x > 0);
    $("ah-lines-note").textContent = drawn ? "" : (state.relative ? "no head shown"
      : "no key gets 2% of this query's attention from a shown head: try lines: relative");
    const keys = tokensOf(c.keyTokens, K);
    const masked = maskedKeys(c);
    Array.from($("ah-keys").children).forEach((d, k) => {
      d.classList.toggle("ah-hot", hot[k] > 0.5);
      d.classList.toggle("ah-masked", masked.has(k));
      d.dataset.width = width[k].toFixed(2);
      d.title = bestHead[k] < 0 ? `key ${k}: ${keys[k]}`
        : `key ${k}: ${keys[k]}, weight ${best[k].toPrecision(3)} from query ${q} (largest in head ${bestHead[k]})`;
      if (masked.has(k)) d.title = `key ${k}: ${keys[k]}, masked (weight exactly 0 from every query and head)`;
    });
  }

  // A vision-language page (meta.image): the image tokens as a patch grid over the picture, one panel
  // per group of views that do not overlap (a global view apart from the tiles). The hovered query's
  // weight on each image token (the mean of the heads the head view shows) fills its box, split over
  // the cells it covers, as the Python overlay draws it; nothing is renormalised.
  const IMG = meta.image || null;
  let imageShown = null;  // the weights drawn: {w, q, top}
  function setupImage() {
    if (!IMG) return;
    $("ah-image-panel").hidden = false;
    const box = $("ah-image-panels");
    IMG.panels.forEach((p, k) => {
      const fig = document.createElement("figure");
      const cap = document.createElement("figcaption");
      cap.id = `ah-image-caption-${k}`; cap.textContent = p.name;
      const wrap = document.createElement("div");
      wrap.className = "ah-image-wrap";
      wrap.style.width = `${IMG.width}px`; wrap.style.height = `${IMG.height}px`;
      const img = document.createElement("img");
      img.src = IMG.src; img.width = IMG.width; img.height = IMG.height; img.alt = "the image";
      const cv = document.createElement("canvas");
      cv.width = IMG.width; cv.height = IMG.height; cv.id = `ah-image-${k}`; cv.dataset.panel = String(k);
      cv.addEventListener("mousemove", (e) => imageReadout(e, k));
      wrap.appendChild(img); wrap.appendChild(cv); fig.appendChild(cap); fig.appendChild(wrap); box.appendChild(fig);
    });
    const cv = $("ah-image-legend"), ctx = cv.getContext("2d");
    for (let x = 0; x < cv.width; x++) {
      const l = Math.round((x / (cv.width - 1)) * 255) * 3;
      ctx.fillStyle = `rgb(${LUT[l]},${LUT[l + 1]},${LUT[l + 2]})`;
      ctx.fillRect(x, 0, 1, cv.height);
    }
  }

  function shownHeads(H) {
    const heads = [];
    for (let h = 0; h < H; h++) if (!state.hidden.has(h) && !(state.oneHead && h !== state.head)) heads.push(h);
    return heads;
  }

  // The hovered query's weight on each image token, or why there is none for this layer.
  function imageWeights() {
    const c = layerCall(state.layer, state.call);
    const [B, H, Q, K] = c.shape;
    if (K !== IMG.keys) return { why: `this layer has ${K} keys, not the ${IMG.keys} positions the image tokens are on (a vision tower's layer, or another axis)` };
    if (B <= IMG.batch) return { why: `this call has no batch row ${IMG.batch}, the image's` };
    if (c.pooled) {  // a long call: the page carries the heads' mean on the image tokens, text rows only
      const q = Math.min(state.query, Q - 1), at = c.image ? c.image.rows.indexOf(q) : -1;
      if (!c.image) return { why: "this call is long: the page keeps it pooled, without each image token's weight" };
      if (at < 0) return { why: `query ${q} is an image token: a long call carries the image weights of the other rows only` };
      const n = IMG.positions.length, codes = state.data.subarray(c.image.offset + at * n, c.image.offset + (at + 1) * n);
      const w = Float64Array.from(codes, (code) => value(code, c.image.scale));
      return { w, q, heads: [], label: tokensOf(c.queryTokens, Q)[q], H, long: true };
    }
    const heads = shownHeads(H);
    if (!heads.length) return { why: "no head shown (toggle one on in the head view)" };
    const q = Math.min(state.query, Q - 1), w = new Float64Array(IMG.positions.length);
    for (const h of heads) {
      const m = matrix(state.layer, state.call, IMG.batch, h);
      IMG.positions.forEach((p, i) => { w[i] += value(m.codes[q * K + p], m.scale) / heads.length; });
    }
    if (w.some((x) => Number.isNaN(x))) return { why: "this query's weights on the image are not finite" };
    return { w, q, heads, label: tokensOf(c.queryTokens, Q)[q], H };
  }

  function drawImage() {
    if (!IMG) return;
    const r = imageWeights();
    IMG.panels.forEach((p, k) => {
      const cv = $(`ah-image-${k}`), ctx = cv.getContext("2d");
      ctx.clearRect(0, 0, cv.width, cv.height);
      ctx.strokeStyle = "rgba(255,255,255,0.5)"; ctx.lineWidth = 1;
      for (const i of p.tokens) {  // the patch grid
        const [t, l, b, rr] = IMG.boxes[i];
        ctx.strokeRect(l * cv.width + 0.5, t * cv.height + 0.5, (rr - l) * cv.width - 1, (b - t) * cv.height - 1);
      }
      $(`ah-image-caption-${k}`).textContent = p.name;
    });
    imageShown = null;
    if (r.why) { $("ah-image-readout").textContent = r.why; $("ah-image-max").textContent = "max"; return; }
    let top = 0, share = 0;
    IMG.positions.forEach((_, i) => { top = Math.max(top, r.w[i] / IMG.cells[i]); share += r.w[i]; });
    IMG.panels.forEach((p, k) => {
      const cv = $(`ah-image-${k}`), ctx = cv.getContext("2d");
      let onPanel = 0;
      for (const i of p.tokens) {
        const [t, l, b, rr] = IMG.boxes[i];
        const x0 = Math.round(l * cv.width), y0 = Math.round(t * cv.height);
        const x1 = Math.round(rr * cv.width), y1 = Math.round(b * cv.height);
        const c = Math.round(scaled(top > 0 ? r.w[i] / IMG.cells[i] / top : 0) * 255) * 3;
        ctx.fillStyle = `rgba(${LUT[c]},${LUT[c + 1]},${LUT[c + 2]},0.7)`;
        ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
        onPanel += r.w[i];
      }
      $(`ah-image-caption-${k}`).textContent = `${p.name}: ${(100 * onPanel).toFixed(1)}%`;
    });
    const heads = r.long ? `mean of all ${r.H} heads: a long call carries only that` : r.H === 1 ? "its only head" : r.heads.length === r.H ? `mean of its ${r.H} heads` : r.heads.length === 1 ? `head ${r.heads[0]}`
      : `mean of heads ${r.heads.join(", ")}`;
    $("ah-image-readout").textContent = `query ${r.q} "${r.label}": ${(100 * share).toFixed(1)}% of its attention on the image (${heads})`;
    $("ah-image-max").textContent = top.toPrecision(3);
    $("ah-image-note").textContent = `weight per cell (a token's weight split over the cells it covers), `
      + `colour stretched to the largest patch of this query (${state.scale} scale); weights not renormalised`;
    imageShown = { w: r.w, q: r.q };
  }

  function imageReadout(event, k) {
    if (!imageShown) return;
    const cv = $(`ah-image-${k}`), rect = cv.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width, y = (event.clientY - rect.top) / rect.height;
    for (const i of IMG.panels[k].tokens) {
      const [t, l, b, r] = IMG.boxes[i];
      if (y >= t && y < b && x >= l && x < r) {
        $("ah-image-readout").textContent = `query ${imageShown.q} -> image token at key ${IMG.positions[i]}: `
          + `weight ${imageShown.w[i].toPrecision(3)}` + (IMG.cells[i] > 1 ? ` over ${IMG.cells[i]} cells` : "");
        return;
      }
    }
  }

  function selectQuery(i) {
    state.query = i;
    Array.from($("ah-queries").children).forEach((d, k) => d.classList.toggle("ah-active", k === i));
    drawLines();
    drawImage();
  }

  // The colours, darkest to brightest; drawLegendLabels says what they stand for.
  function drawLegend() {
    const cv = $("ah-legend"), ctx = cv.getContext("2d");
    for (let x = 0; x < cv.width; x++) {
      const l = Math.round((x / (cv.width - 1)) * 255) * 3;
      ctx.fillStyle = `rgb(${LUT[l]},${LUT[l + 1]},${LUT[l + 2]})`;
      ctx.fillRect(x, 0, 1, cv.height);
    }
  }

  // The legend's ends in the scale and "brightest" chosen, and how exact the weights the page holds are.
  function drawLegendLabels(scale) {
    const top = state.rowwise ? "each query's largest" : scale.toPrecision(3);
    const floor = (state.rowwise ? 1 : scale) * RATIO[1];
    $("ah-legend-min").textContent = state.scale !== "log" ? "0" : state.rowwise ? `1e-${DECADES} of it` : num(floor, 2);
    $("ah-legend-max").textContent = top;
    const note = `weights kept as 8-bit log codes, each within ${(100 * ERROR).toFixed(1)}% of the captured weight`
      + ` down to 1e-${DECADES} of the head's largest (smaller ones read "below")`;
    $("ah-legend-note").textContent = (state.scale === "log" ? `log colour: ${DECADES} decades. ` : "") + note;
    $("ah-legend").title = note;
  }

  const maskedKeys = (c) => new Set((c.maskedKeys || [])[Math.min(state.batch, c.shape[0] - 1)] || []);

  // Token labels along the matrix's axes, thinned to about one per 14 px so they never overlap.
  function drawMatrixLabels() {
    const c = layerCall(state.layer, state.call);
    const [, , Q, K] = c.shape;
    const size = $("ah-matrix").getBoundingClientRect();
    // A thinned axis (every step-th label) puts each label's position in the input in front of it.
    // Generation (meta.promptLength): generated tokens' labels set apart, a line where the prompt ends.
    const prompt = meta.promptLength;
    const place = (box, tokens, n, along, extent, at) => {
      box.innerHTML = "";
      const step = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(extent / 14))));
      if (prompt != null) {
        let first = 0;
        while (first < n && at(first) < prompt) first++;
        if (first > 0 && first < n) {
          const line = document.createElement("i");
          line.className = "ah-prompt-end"; line.title = `the prompt ends here: ${prompt} tokens, then generated`;
          line.style[along] = `${(first / n) * 100}%`;
          box.appendChild(line);
        }
      }
      for (let i = 0; i < n; i += step) {
        const s = document.createElement("span");
        s.textContent = step > 1 ? `${at(i)} ${shortLabel(tokens[i])}` : shortLabel(tokens[i]);
        s.title = `${at(i)}: ${tokens[i]}`;
        if (prompt != null && at(i) >= prompt) { s.classList.add("ah-generated"); s.title += " (generated)"; }
        s.style[along] = `${((i + 0.5) / n) * 100}%`;
        box.appendChild(s);
      }
    };
    let queries = tokensOf(c.queryTokens, Q), keys = tokensOf(c.keyTokens, K), nq = Q, nk = K;
    const qAt = c.queryPositions || null, kAt = c.keyPositions || null;  // kept rows / keys: their places
    let qFirst = (i) => i, kFirst = (i) => i;  // axis position -> position along the call's own axis
    if (c.pooled && state.detail) {  // the tokens of the window
      nq = Math.min(WINDOW, Q); nk = Math.min(WINDOW, K);
      queries = queries.slice(state.detail.q0, state.detail.q0 + nq);
      keys = keys.slice(state.detail.k0, state.detail.k0 + nk);
      const q0 = state.detail.q0, k0 = state.detail.k0;
      qFirst = (i) => q0 + i; kFirst = (i) => k0 + i;
    } else if (c.pooled) {  // each block by its first token
      [nq, nk] = c.pooled.shape.slice(2);
      queries = Array.from({ length: nq }, (_, i) => queries[blockOf(c, 0, i).first]);
      keys = Array.from({ length: nk }, (_, i) => keys[blockOf(c, 1, i).first]);
      qFirst = (i) => blockOf(c, 0, i).first; kFirst = (i) => blockOf(c, 1, i).first;
    }
    const inInput = (first, kept) => (i) => (kept ? kept[first(i)] : first(i));
    place($("ah-matrix-cols"), keys, nk, "left", size.width || 520, inInput(kFirst, kAt));
    place($("ah-matrix-rows"), queries, nq, "top", size.height || 520, inInput(qFirst, qAt));
  }

  // Compare mode (a page of attention_hooker.compare): the selected head in A, in B (one colour
  // scale for both) and A - B (its own codes, centred at 127: blue where B attends more, white
  // where they agree, red where A does). The "showing" selector draws the other views of A or B.
  const MID = 127;
  const DIVERGING = [[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240], [247, 247, 247],
                     [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43], [103, 0, 31]];  // RdBu_r
  const DIFF_LUT = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (DIVERGING.length - 1), k = Math.min(Math.floor(x), DIVERGING.length - 2), f = x - k;
    for (let c = 0; c < 3; c++) DIFF_LUT[i * 3 + c] = DIVERGING[k][c] + f * (DIVERGING[k + 1][c] - DIVERGING[k][c]);
  }
  const diffIndex = (code) => Math.round((code / (2 * MID)) * 255);  // code 127 -> 127.5: the white middle

  // One head of the compared call of layer li: its codes in A or B (whole maps only) or of A - B.
  function compared(which, li) {
    const cmp = meta.compare, c = (which === "b" ? cmp.layers : cmp.layersA)[li].calls[0];
    const [B, H, Q, K] = c.shape, b = Math.min(state.batch, B - 1), h = Math.min(state.head, H - 1);
    const d = cmp.difference[li], offset = which === "diff" ? d.offset : c.offset;
    const start = offset + (b * H + h) * Q * K;
    return { codes: state.data.subarray(start, start + Q * K), scale: (which === "diff" ? d.scales : c.scales)[b * H + h],
             Q, K, c, b, h };
  }

  // Codes of a head on another scale (so that A and B share one): code * scale / shared.
  // A map's codes under another head's largest (A and B on one scale). Codes are log-spaced
  // (RATIO), so a factor f below 1 moves every code down by the same number of steps; a weight
  // that falls under the codes' floor keeps the lowest code that is not 0 (0 is exactly 0).
  function rescaled(m, shared) {
    const out = new Uint8Array(m.codes.length), f = shared > 0 ? m.scale / shared : 0;
    const shift = f > 0 ? ((TOP - 1) * Math.log10(f)) / DECADES : -Infinity;
    for (let i = 0; i < out.length; i++) {
      const code = m.codes[i];
      out[i] = code === BAD ? BAD : code === 0 ? 0 : Math.max(1, Math.min(TOP, Math.round(code + shift)));
    }
    return out;
  }

  function paintDifference(canvas, codes, Q, K) {
    canvas.width = K; canvas.height = Q;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(K, Q), px = img.data;
    for (let i = 0; i < Q * K; i++) {
      const o = i * 4, code = codes[i];
      if (code === BAD) { px[o] = 0; px[o + 1] = 0; px[o + 2] = 0; }  // non-finite: black (red means A attends more)
      else { const l = diffIndex(code) * 3; px[o] = DIFF_LUT[l]; px[o + 1] = DIFF_LUT[l + 1]; px[o + 2] = DIFF_LUT[l + 2]; }
      px[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawCompare() {
    if (!meta.compare) return;
    const cmp = meta.compare, li = state.layer;
    const a = compared("a", li), b = compared("b", li), d = compared("diff", li), shared = Math.max(a.scale, b.scale);
    paint($("ah-compare-a"), rescaled(a, shared), a.Q, a.K, a.K, a.Q, maskedKeys(a.c));
    paint($("ah-compare-b"), rescaled(b, shared), b.Q, b.K, b.K, b.Q, maskedKeys(b.c));
    paintDifference($("ah-compare-diff"), d.codes, d.Q, d.K);
    const scale = $("ah-compare-legend"), sctx = scale.getContext("2d");  // A and B: the page's colour scale
    for (let x = 0; x < scale.width; x++) {
      const l = shade(Math.round((x / (scale.width - 1)) * TOP)) * 3;
      sctx.fillStyle = `rgb(${LUT[l]},${LUT[l + 1]},${LUT[l + 2]})`;
      sctx.fillRect(x, 0, 1, scale.height);
    }
    $("ah-compare-max").textContent = shared.toPrecision(3);
    const [nameA, nameB] = cmp.names.map(shortLabel);
    $("ah-compare-low").textContent = `-${d.scale.toPrecision(3)} (more in ${nameB})`;
    $("ah-compare-high").textContent = `+${d.scale.toPrecision(3)} (more in ${nameA})`;
    const rows = cmp.distance[li], js = rows ? rows[Math.min(state.batch, rows.length - 1)][a.h] : null;
    $("ah-compare-caption").textContent = `${shortLabel(cmp.layersA[li].name)}, head ${a.h}: Jensen-Shannon distance `
      + (js === null || js === undefined ? "n/a" : js.toFixed(3)) + " (base 2: 0 same, 1 disjoint)";
  }

  function compareReadout(event) {
    const rect = event.target.getBoundingClientRect(), li = state.layer;
    const a = compared("a", li), b = compared("b", li), d = compared("diff", li);
    const k = Math.floor(((event.clientX - rect.left) / rect.width) * a.K);
    const q = Math.floor(((event.clientY - rect.top) / rect.height) * a.Q);
    if (q < 0 || k < 0 || q >= a.Q || k >= a.K) return;
    const [, , Q, K] = a.c.shape, i = q * a.K + k, [A, B] = meta.compare.names;
    const dv = d.codes[i] === BAD ? NaN : (d.scale * (d.codes[i] - MID)) / MID;
    $("ah-compare-readout").textContent = `query ${q} "${shortLabel(tokensOf(a.c.queryTokens, Q)[q])}" -> key ${k} `
      + `"${shortLabel(tokensOf(a.c.keyTokens, K)[k])}": ${shortLabel(A)} ${shown(value(a.codes[i], a.scale))}, `
      + `${shortLabel(B)} ${shown(value(b.codes[i], b.scale))}, difference ${shown(dv)}`;
  }

  function setupCompare() {
    const cmp = meta.compare, select = $("ah-compare-show");
    cmp.layersA = meta.layers;
    cmp.names.forEach((n, i) => {
      const opt = document.createElement("option");
      opt.value = i ? "b" : "a"; opt.textContent = shortLabel(n); opt.title = n;
      select.appendChild(opt);
    });
    $("ah-compare-name-a").textContent = shortLabel(cmp.names[0]);
    $("ah-compare-name-b").textContent = shortLabel(cmp.names[1]);
    $("ah-compare-name-diff").textContent = `${shortLabel(cmp.names[0])} - ${shortLabel(cmp.names[1])}`;
    select.addEventListener("change", (e) => {  // every other view draws A or B
      meta.layers = e.target.value === "b" ? cmp.layers : cmp.layersA;
      refresh();
    });
    ["ah-compare-a", "ah-compare-b", "ah-compare-diff"].forEach((id) => $(id).addEventListener("mousemove", compareReadout));
    const legend = $("ah-compare-diff-legend"), ctx = legend.getContext("2d");
    for (let x = 0; x < legend.width; x++) {
      const l = diffIndex(Math.round((x / (legend.width - 1)) * 2 * MID)) * 3;
      ctx.fillStyle = `rgb(${DIFF_LUT[l]},${DIFF_LUT[l + 1]},${DIFF_LUT[l + 2]})`;
      ctx.fillRect(x, 0, 1, legend.height);
    }
    if (cmp.colourBy) { state.colourBy = cmp.colourBy; $("ah-overview-colour").value = cmp.colourBy; }
    $("ah-compare-label").hidden = false;
    $("ah-compare-panel").hidden = false;
  }

  function refresh() {
    $("ah-readout").textContent = "point at a cell";  // not the value of a head no longer shown
    syncSelectors();
    drawOverview();
    drawMatrix();
    drawMatrixLabels();
    drawTokens();
    drawToggles();
    drawLines();
    drawImage();
    drawCompare();
  }

  async function main() {
    $("ah-title").textContent = shortLabel(meta.title); $("ah-title").title = meta.title;
    fillSelect($("ah-layer"), meta.layers.length, (i) => shortLabel(meta.layers[i].short || meta.layers[i].name));
    $("ah-layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); state.query = 0; state.detail = null; refresh(); });
    $("ah-call").addEventListener("change", (e) => { state.call = Number(e.target.value); state.detail = null; refresh(); });
    $("ah-batch").addEventListener("change", (e) => { state.batch = Number(e.target.value); refresh(); });
    $("ah-matrix").addEventListener("click", zoom);
    scoreNames().forEach((n) => {
      const opt = document.createElement("option");
      opt.value = n; opt.textContent = shortLabel(n);
      $("ah-overview-colour").appendChild(opt);
    });
    $("ah-overview-colour").addEventListener("change", (e) => { state.colourBy = e.target.value; drawOverview(); });
    $("ah-matrix-back").addEventListener("click", () => { state.detail = null; drawMatrix(); drawMatrixLabels(); });
    $("ah-head").addEventListener("change", (e) => { state.head = Number(e.target.value); refresh(); });
    if (UNITS.words) {
      $("ah-units-label").style.display = "";
      $("ah-units").value = meta.units || "tokens";
      meta.layers = UNITS[$("ah-units").value];
      $("ah-units").addEventListener("change", (e) => {
        meta.layers = UNITS[e.target.value]; state.query = 0; state.detail = null; refresh();
      });
    }
    $("ah-matrix").addEventListener("mousemove", readout);
    state.scale = meta.colour || "linear"; $("ah-scale").value = state.scale; // as the page was made (--color-scale)
    $("ah-scale").addEventListener("change", (e) => { state.scale = e.target.value; drawLegend(); drawOverview(); drawMatrix(); drawCompare(); drawImage(); });
    $("ah-norm").addEventListener("change", (e) => { state.rowwise = e.target.value === "row"; drawOverview(); drawMatrix(); });
    state.colourBy = meta.colourBy || ""; $("ah-overview-colour").value = state.colourBy;  // a roles page opens on a role
    $("ah-lines-scale").addEventListener("change", (e) => { state.relative = e.target.value === "relative"; drawLines(); });
    $("ah-lines-heads").addEventListener("change", (e) => { state.oneHead = e.target.value === "one"; drawToggles(); drawLines(); drawImage(); });
    drawLegend();
    if (meta.compare) setupCompare();
    setupImage();
    state.data = await decodePayload();
    if (state.data.length !== meta.bytes) throw new Error(`payload holds ${state.data.length} bytes, expected ${meta.bytes}`);
    refresh();
    status.textContent = `${meta.layers.length} layers`;
    document.body.dataset.ready = "true";
  }

  main().catch((err) => {
    status.textContent = `could not draw: ${err.message}`;
    status.classList.add("ah-error");
    document.body.dataset.ready = "error";
    console.error(err);
  });
})();
