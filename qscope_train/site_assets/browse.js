// qscope-train feature browser: data arrive as <script> files calling the loaders below, which works
// from file:// (fetch does not); a feature's bucket file is loaded only when its page opens.
var qscope = (function () {
  var S = { meta: null, vocab: {}, index: {}, buckets: {}, prompts: [], waiting: {} };
  window.qscopeMeta = function (m) { S.meta = m; };
  window.qscopeVocab = function (v) { S.vocab = v; };
  window.qscopePrompts = function (p) { S.prompts = p; };
  window.qscopeIndex = function (layer, idx) { S.index[layer] = idx; done("index" + layer); };
  window.qscopeBucket = function (layer, k, feats) { S.buckets[layer + "/" + k] = feats; done("b" + layer + "/" + k); };
  function done(key) { (S.waiting[key] || []).forEach(function (f) { f(); }); delete S.waiting[key]; }
  function load(src, key, then) {
    (S.waiting[key] = S.waiting[key] || []).push(then);
    var s = document.createElement("script"); s.src = src; document.head.appendChild(s);
  }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var a in attrs || {}) e.setAttribute(a, attrs[a]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function tok(id) { return id < 0 ? "" : (S.vocab[id] !== undefined ? S.vocab[id] : "<" + id + ">"); }
  function params() {
    var q = {}; (location.hash.slice(1) + "&" + location.search.slice(1)).split("&").forEach(function (kv) {
      var p = kv.split("="); if (p[0]) q[p[0]] = decodeURIComponent(p[1] || "");
    });
    return q;
  }
  function context(ids, acts, max) {
    var div = el("div", { "class": "ctx" }), centre = (ids.length - 1) / 2;
    ids.forEach(function (id, i) {
      if (id < 0) return;
      var a = acts[i], alpha = max > 0 ? Math.min(1, a / max) : 0;
      var span = el("span", { "class": "tok" + (i === centre ? " centre" : ""), title: a.toFixed(3), "data-act": a }, tok(id));
      if (a > 0) span.style.background = "rgba(255,120,0," + (0.15 + 0.85 * alpha).toFixed(3) + ")";
      div.appendChild(span);
    });
    return div;
  }
  function histogram(counts, edges) {
    var w = 320, h = 80, n = counts.length, top = Math.max.apply(null, counts.concat([1]));
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 16); svg.setAttribute("class", "hist");
    counts.forEach(function (c, i) {
      var r = document.createElementNS(ns, "rect"), bh = c > 0 ? Math.max(1, h * c / top) : 0;
      r.setAttribute("x", i * w / n); r.setAttribute("y", h - bh); r.setAttribute("width", w / n - 1);
      r.setAttribute("height", bh); r.setAttribute("fill", "#e67300");
      var t = document.createElementNS(ns, "title");
      t.textContent = edges[i].toPrecision(3) + "–" + edges[i + 1].toPrecision(3) + ": " + c; r.appendChild(t);
      svg.appendChild(r);
    });
    var lo = document.createElementNS(ns, "text"); lo.setAttribute("x", 0); lo.setAttribute("y", h + 13);
    lo.textContent = "log-spaced activation bins " + edges[0].toPrecision(2) + " … " + edges[n].toPrecision(2);
    lo.setAttribute("font-size", "10"); svg.appendChild(lo);
    return svg;
  }
  function section(parent, title) { parent.appendChild(el("h2", {}, title)); }
  function renderFeature(box, f, layer, title) {
    box.appendChild(el("h1", {}, title));
    box.appendChild(el("p", {}, "fires on " + f.fires + " held-out tokens (frequency " + f.freq.toExponential(2) +
      "), max activation " + f.max + (f.drift !== undefined ? ", drift from the source " + f.drift : "")));
    if (f.twin) box.appendChild(twinNote(f.twin, layer));
    section(box, "Activation histogram"); box.appendChild(histogram(f.hist, S.meta.hist_edges));
    section(box, "Top activations");
    if (!f.top.length) box.appendChild(el("p", { "class": "muted" }, "never fired on the held-out tokens"));
    f.top.forEach(function (ex) { box.appendChild(context(ex[0], ex[1], f.max)); });
    (f.ranges || []).forEach(function (r) {
      if (!r.ex.length) return;
      section(box, "Activations in " + r.lo + " – " + r.hi);
      r.ex.forEach(function (ex) { box.appendChild(context(ex[0], ex[1], f.max)); });
    });
    section(box, "Logit lens");
    var lens = el("div", { "class": "lens" });
    lens.appendChild(el("div", { "class": "promoted" }, "promotes: "));
    f.lt.forEach(function (p) { lens.lastChild.appendChild(el("span", { title: p[1] }, tok(p[0]))); });
    if (f.lb) {
      lens.appendChild(el("div", { "class": "suppressed" }, "suppresses: "));
      f.lb.forEach(function (p) { lens.lastChild.appendChild(el("span", { title: p[1] }, tok(p[0]))); });
    }
    box.appendChild(lens);
    if (f.nb) {
      section(box, "Nearest features by decoder cosine");
      var nb = el("p");
      f.nb.forEach(function (p) {
        var a = el("a", { href: "feature.html#layer=" + layer + "&id=" + p[0] }, "#" + p[0] + " (" + p[1] + ")");
        nb.appendChild(a); nb.appendChild(document.createTextNode(" "));
      });
      box.appendChild(nb);
    }
  }
  // a twin is one direction learnt twice: say so on both pages, so nobody reads the pair as two features
  function twinNote(twin, layer) {
    var p = el("p", { "class": "twin" }, "Twin of feature ");
    p.appendChild(el("a", { href: "feature.html#layer=" + layer + "&id=" + twin[0] }, "#" + twin[0]));
    p.appendChild(document.createTextNode(" (decoder cosine " + twin[1] + "): the two latents share one direction"));
    return p;
  }
  function featurePage() {
    var q = params(), layer = +q.layer, id = +q.id, k = Math.floor(id / S.meta.bucket);
    document.title = "feature " + id + " · layer " + layer;
    load("data/layer" + layer + "/b" + k + ".js", "b" + layer + "/" + k, function () {
      var f = S.buckets[layer + "/" + k][id - k * S.meta.bucket], box = document.getElementById("feature");
      box.textContent = "";
      var cols = el("div", { "class": "cols" }), mine = el("div");
      cols.appendChild(mine); box.appendChild(cols);
      renderFeature(mine, f, layer, "Feature " + id + " · layer " + layer);
      if (f.source) {
        var src = el("div"); cols.appendChild(src);
        renderFeature(src, f.source, layer, "The source SAE's feature " + id);
      }
    });
    window.onhashchange = function () { location.reload(); };
  }
  function indexPage() {
    var m = S.meta, sel = document.getElementById("layer");
    document.getElementById("run").textContent = m.run + " · " + m.model + " · " + m.tokens + " held-out tokens";
    m.layers.forEach(function (l) { sel.appendChild(el("option", { value: l.layer }, "layer " + l.layer)); });
    if (!m.has_source) {
      document.querySelectorAll(".drift, option[value=drift]").forEach(function (e) { e.style.display = "none"; });
    }
    var q = params(); if (q.layer) sel.value = q.layer;
    // an adaptation's index opens on the most-changed features
    document.getElementById("sort").value = q.sort || (m.has_source ? "drift" : "spec");
    if (q.twins) document.getElementById("twins").value = q.twins;
    function draw() {
      var layer = +sel.value;
      if (!S.index[layer]) { load("data/layer" + layer + "/index.js", "index" + layer, draw); return; }
      var idx = S.index[layer], key = document.getElementById("sort").value, minf = +document.getElementById("minfreq").value;
      if (!idx[key]) key = "spec";
      var twins = document.getElementById("twins").value, ids = [], nTwins = 0;
      function isTwin(i) { return idx.twin !== undefined && idx.twin[i] >= 0; }
      for (var i = 0; i < idx.freq.length; i++) {
        if (isTwin(i)) nTwins++;
        if (idx.freq[i] < minf || (twins === "hide" && isTwin(i)) || (twins === "only" && !isTwin(i))) continue;
        ids.push(i);
      }
      ids.sort(function (a, b) { return (idx[key][b] - idx[key][a]) || (idx.freq[b] - idx.freq[a]) || (a - b); });
      var page = Math.max(1, +document.getElementById("page").value), per = 100;
      var body = document.querySelector("#features tbody"); body.textContent = "";
      ids.slice((page - 1) * per, page * per).forEach(function (i) {
        var tr = el("tr", { "data-id": i });
        var a = el("a", { href: "feature.html#layer=" + layer + "&id=" + i }, "#" + i);
        var td = el("td"); td.appendChild(a); tr.appendChild(td);
        tr.appendChild(el("td", {}, idx.spec[i].toFixed(2)));
        tr.appendChild(el("td", {}, idx.freq[i].toExponential(2)));
        tr.appendChild(el("td", {}, idx.max[i]));
        var d = el("td", { "class": "drift" }, idx.drift ? idx.drift[i] : ""); if (!m.has_source) d.style.display = "none"; tr.appendChild(d);
        tr.appendChild(el("td", { "class": "tok" }, tok(idx.token[i])));
        var tw = el("td", { "class": "twin" });
        if (isTwin(i)) tw.appendChild(el("a", { href: "feature.html#layer=" + layer + "&id=" + idx.twin[i], title: "twin: one decoder direction with #" + idx.twin[i] }, "twin of #" + idx.twin[i]));
        tr.appendChild(tw);
        body.appendChild(tr);
      });
      document.getElementById("status").textContent = ids.length + " features match (" + nTwins + " twin latents in this layer); page " +
        page + " of " + Math.max(1, Math.ceil(ids.length / per));
    }
    ["layer", "sort", "minfreq", "twins", "page"].forEach(function (id) { document.getElementById(id).onchange = draw; });
    draw();
  }
  function promptsPage() {
    var box = document.getElementById("prompts");
    if (!S.prompts.length) { box.appendChild(el("p", { "class": "muted" }, "no prompts configured (browse.prompts=[...])")); return; }
    S.prompts.forEach(function (p) {
      box.appendChild(el("h2", {}, p.text));
      var t = el("table"), head = el("tr"); head.appendChild(el("th", { "class": "tok" }, "token"));
      Object.keys(p.layers).forEach(function (l) { head.appendChild(el("th", { "class": "tok" }, "layer " + l)); });
      t.appendChild(head);
      p.ids.forEach(function (id, i) {
        var tr = el("tr"); tr.appendChild(el("td", { "class": "tok" }, tok(id)));
        Object.keys(p.layers).forEach(function (l) {
          var td = el("td", { "class": "tok" });
          p.layers[l][i].forEach(function (fv) {
            td.appendChild(el("a", { href: "feature.html#layer=" + l + "&id=" + fv[0], title: fv[1] }, "#" + fv[0]));
            td.appendChild(document.createTextNode(" "));
          });
          tr.appendChild(td);
        });
        t.appendChild(tr);
      });
      box.appendChild(t);
    });
  }
  return { indexPage: indexPage, featurePage: featurePage, promptsPage: promptsPage };
})();
