(function () {
  "use strict";
  var PAGE = 200;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function diffCell(tag, markup) {  // markup was escaped in Python: its only tags are <del> and <ins>
    var e = el(tag, "diff");
    e.innerHTML = markup;
    return e;
  }
  function init(root) {
    var data = JSON.parse(document.getElementById(root.getAttribute("data-blob")).textContent);
    var f = {};
    ["task", "pair", "dir", "seed"].forEach(function (n) { f[n] = root.querySelector("select[name=" + n + "]"); });
    var list = root.querySelector(".xb-list"), more = root.querySelector(".xb-more"),
        count = root.querySelector(".xb-count"), refBody = root.querySelector(".xb-ref tbody");
    var matches = [], shown = 0;
    function is(select, value) { return !select || select.value === "" || value === Number(select.value); }
    function keep(r) { return is(f.seed, r[0]) && is(f.pair, r[1]) && is(f.task, r[2]) && is(f.dir, r[4]); }
    function output(label, markup, parsed) {
      var box = el("div", "xb-out");
      box.appendChild(el("div", "xb-label", label + " · parsed: " + (parsed === "" ? "(nothing)" : parsed)));
      box.appendChild(diffCell("pre", markup));
      return box;
    }
    function card(r) {
      var task = data.tasks[r[2]], pair = data.pairs[r[1]], dir = r[4] ? "gained" : "lost";
      var c = el("article", "xb-card " + dir);
      c.setAttribute("data-task", task);
      c.setAttribute("data-dir", dir);
      c.setAttribute("data-pair", String(r[1]));
      c.setAttribute("data-seed", String(r[0]));
      var head = el("header");
      head.appendChild(el("span", "badge", r[4] ? "wrong → right" : "right → wrong"));
      head.appendChild(el("b", null, task));
      head.appendChild(el("span", "xb-meta", r[3] + " · seed " + r[0] + " · " + pair.label + " · gold: " + r[5]));
      c.appendChild(head);
      var prompt = (data.prompts[task] || {})[r[3]];
      c.appendChild(prompt === undefined ? el("p", "xb-prompt missing", "(prompt not available: id only)")
                                         : el("p", "xb-prompt", prompt));
      var outs = el("div", "xb-outs");
      outs.appendChild(output(pair.before, r[8], r[6]));
      outs.appendChild(output(pair.after, r[9], r[7]));
      c.appendChild(outs);
      return c;
    }
    function showMore() {
      var end = Math.min(matches.length, shown + PAGE), frag = document.createDocumentFragment();
      for (; shown < end; shown++) frag.appendChild(card(matches[shown]));
      list.appendChild(frag);
      count.textContent = matches.length + " flipped example" + (matches.length === 1 ? "" : "s") +
        (matches.length ? " (showing " + shown + ")" : " match these filters");
      more.hidden = shown >= matches.length;
      more.textContent = "show " + Math.min(PAGE, matches.length - shown) + " more";
    }
    function references() {
      var task = f.task.value === "" ? null : data.tasks[Number(f.task.value)];
      var rows = data.ref.filter(function (r) {
        return is(f.seed, r[0]) && is(f.pair, r[1]) && (task === null || r[3] === task);
      });
      rows.sort(function (x, y) { return Math.abs(y[5] - y[4]) - Math.abs(x[5] - x[4]); });
      refBody.textContent = "";
      rows.slice(0, 20).forEach(function (r) {
        var tr = el("tr"), prompt = data.refPrompts[r[2]];
        [data.pairs[r[1]].label, r[0], r[2] + (r[3] ? " (" + r[3] + ")" : ""),
         prompt === undefined ? "(not available)" : prompt, r[4].toFixed(4), r[5].toFixed(4),
         (r[5] - r[4] >= 0 ? "+" : "") + (r[5] - r[4]).toFixed(4)].forEach(function (v, i) {
          tr.appendChild(el("td", i === 3 ? "prompt" : (i >= 4 ? "num" : null), v));
        });
        tr.appendChild(diffCell("td", r[6]));
        tr.appendChild(diffCell("td", r[7]));
        refBody.appendChild(tr);
      });
      if (!rows.length) {
        var td = el("td", null, "no reference rows for these filters");
        td.colSpan = 9;
        refBody.appendChild(el("tr")).appendChild(td);
      }
    }
    function update() {
      matches = data.rows.filter(keep);
      shown = 0;
      list.textContent = "";
      showMore();
      references();
    }
    function select(want) {  // a browser_link's selection: every filter set to it, whatever it showed before
      var pair = data.pairs.findIndex(function (p) { return p.a === want.a && p.b === want.b; }),
          task = data.tasks.indexOf(want.task);
      if (f.seed) f.seed.value = String(want.seed);
      f.pair.value = pair < 0 ? "" : String(pair);
      f.task.value = task < 0 ? "" : String(task);
      f.dir.value = want.dir;
      update();
    }
    Object.keys(f).forEach(function (n) { if (f[n]) f[n].addEventListener("change", update); });
    more.addEventListener("click", showMore);
    root.addEventListener("xb-select", function (e) { select(e.detail); });
    update();
  }
  // A flip link (html_examples.browser_link): #<prefix>examples?seed=S&a=A&b=B&task=T&dir=0|1
  function follow(hash) {
    var m = /^#([^?]*examples)\?(.*)$/.exec(hash || "");
    var section = m && document.getElementById(decodeURIComponent(m[1]));
    var root = section && section.querySelector(".xb");
    if (!root) return false;
    var q = new URLSearchParams(m[2]);
    for (var p = section.parentElement; p; p = p.parentElement) if (p.tagName === "DETAILS") p.open = true;
    root.dispatchEvent(new CustomEvent("xb-select", {detail: {seed: Number(q.get("seed")), a: Number(q.get("a")),
      b: Number(q.get("b")), task: q.get("task"), dir: q.get("dir") === "1" ? "1" : "0"}}));
    root.scrollIntoView({block: "start"});
    return true;
  }
  Array.prototype.forEach.call(document.querySelectorAll(".xb"), init);
  // on the click itself too: following the link the page already shows changes no hash, so no hashchange
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("a.xb-link") : null;
    if (a) follow(a.getAttribute("href"));
  });
  window.addEventListener("hashchange", function () { follow(location.hash); });
  follow(location.hash);
})();
