// Admin page of the preftune feedback service: progress, agreement per family, raters, import, export.
(function () {
  "use strict";

  var KEY = "preftune.adminToken";
  function $(id) { return document.getElementById(id); }
  function token() { return window.sessionStorage.getItem(KEY) || ""; }

  var timer = null;
  function flash(message, isError) {
    var el = $("status");
    el.textContent = message;
    el.className = "show" + (isError ? " error" : "");
    clearTimeout(timer);
    timer = setTimeout(function () { el.className = ""; }, isError ? 6000 : 1500);
  }

  function api(method, path, body, contentType) {
    var opts = { method: method, headers: { "Authorization": "Bearer " + token() }, cache: "no-store" };
    if (body !== undefined) { opts.headers["Content-Type"] = contentType || "application/json"; opts.body = body; }
    return fetch(path, opts).then(function (resp) {
      if (!resp.ok) {
        return resp.json().then(function (b) { throw new Error(b.detail || resp.statusText); },
          function (e) { if (e instanceof Error && e.message) { throw e; } throw new Error(resp.statusText); });
      }
      return resp;
    });
  }

  function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toFixed(3); }
  function ci(pair) { return pair && pair[0] !== null ? "[" + fmt(pair[0]) + ", " + fmt(pair[1]) + "]" : "–"; }

  function table(headers, rows) {
    var t = document.createElement("table");
    var tr = document.createElement("tr");
    headers.forEach(function (h) { var th = document.createElement("th"); th.textContent = h; tr.appendChild(th); });
    t.appendChild(tr);
    rows.forEach(function (row) {
      var r = document.createElement("tr");
      row.forEach(function (cell) {
        var td = document.createElement("td");
        td.textContent = cell;
        if (typeof cell === "number" || /^[-0-9.[\], –]+$/.test(String(cell))) { td.className = "num"; }
        r.appendChild(td);
      });
      t.appendChild(r);
    });
    return t;
  }

  function put(id, node) { var el = $(id); el.textContent = ""; el.appendChild(node); }

  function loadStats() {
    return api("GET", "/api/admin/stats").then(function (r) { return r.json(); }).then(function (s) {
      var rows = Object.keys(s.families).map(function (f) { return [f, s.families[f].tasks, s.families[f].judgements]; });
      var wrap = document.createElement("div");
      var p = document.createElement("p");
      p.textContent = s.tasks + " tasks (" + s.tasks_pending + " pending, " + s.tasks_complete + " complete at " +
        s.ratings_per_task + " judgements each) · " + s.judgements + " judgements · " + s.raters + " raters · " +
        s.open_assignments + " tasks on screens now";
      wrap.appendChild(p);
      wrap.appendChild(table(["family", "tasks", "judgements"], rows));
      put("stats", wrap);
    });
  }

  function loadAgreement() {
    $("agreement").textContent = "computing…";
    return api("GET", "/api/admin/agreement").then(function (r) { return r.json(); }).then(function (a) {
      var rows = Object.keys(a.families).map(function (f) {
        var x = a.families[f];
        return [f, x.n_items, x.n_judgements, x.n_raters, fmt(x.alpha), ci(x.alpha_ci), fmt(x.pairwise), ci(x.pairwise_ci),
          (x.notes || []).join("; ")];
      });
      put("agreement", table(["family", "items", "judgements", "raters", "alpha", "alpha CI", "pairwise", "pairwise CI", "notes"], rows));
    });
  }

  function loadRaters() {
    return api("GET", "/api/admin/raters").then(function (r) { return r.json(); }).then(function (b) {
      put("raters", table(["name", "judgements", "added"], b.raters.map(function (r) { return [r.name, r.judgements, r.created_at]; })));
    });
  }

  function loadAll() {
    Promise.all([loadStats(), loadRaters()]).then(loadAgreement).catch(function (e) { flash(e.message, true); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("token-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      window.sessionStorage.setItem(KEY, $("admin-token").value.trim());
      $("admin-token").value = "";
      loadAll();
    });
    $("rater-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      api("POST", "/api/admin/raters", JSON.stringify({ name: $("rater-name").value.trim() }))
        .then(function (r) { return r.json(); })
        .then(function (b) {
          var p = $("new-token");
          p.textContent = "Token for " + b.name + " (shown once): ";
          var code = document.createElement("code");
          code.className = "token";
          code.textContent = b.token;
          p.appendChild(code);
          $("rater-name").value = "";
          return loadRaters();
        }).catch(function (e) { flash(e.message, true); });
    });
    $("import-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var f = $("import-file").files[0];
      if (!f) { return; }
      f.text().then(function (text) { return api("POST", "/api/admin/tasks/import", text, "application/x-ndjson"); })
        .then(function (r) { return r.json(); })
        .then(function (b) {
          $("import-result").textContent = "Imported " + b.imported + " task(s), " + b.unchanged + " already present.";
          return loadStats();
        }).catch(function (e) { $("import-result").textContent = e.message; flash(e.message, true); });
    });
    $("export-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var q = new URLSearchParams();
      [["since", "export-since"], ["until", "export-until"], ["family", "export-family"]].forEach(function (p) {
        var v = $(p[1]).value.trim();
        if (v) { q.set(p[0], v); }
      });
      api("GET", "/api/admin/export?" + q.toString()).then(function (r) { return r.blob(); }).then(function (blob) {
        var a = document.createElement("a");
        a.href = URL.createObjectURL(blob);
        a.download = "judgements.jsonl";
        document.body.appendChild(a);
        a.click();
        setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
      }).catch(function (e) { flash(e.message, true); });
    });
    if (token()) { loadAll(); }
  });
})();
