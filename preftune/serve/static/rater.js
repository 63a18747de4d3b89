// The rater page of the preftune feedback service: plain JS, no build step.
// Keys: 1-N pick the best candidate (as shown, left to right) and send at once;
// Shift+1-N flags a candidate as unsafe; R toggles "rank all" (then 1-N in order, Enter sends,
// Backspace undoes); X marks all unacceptable; S skips; U undoes the last judgement (for a short
// window); D shows where the answers differ. Each judgement is sent with ?next=true, so the
// answer carries the next task: one request per task.
(function () {
  "use strict";

  var TOKEN_KEY = "preftune.raterToken";
  var state = {
    task: null, judgementId: null, ranking: [], rankMode: false, unsafe: {}, busy: false, done: 0,
    remaining: null, undoSeconds: 0, last: null, lastAt: 0, diff: false
  };
  var undoTimer = null;

  function $(id) { return document.getElementById(id); }

  function show(section) {
    ["login", "task", "done"].forEach(function (id) { $(id).hidden = id !== section; });
  }

  var statusTimer = null;
  function flash(message, isError) {
    var el = $("status");
    el.textContent = message;
    el.className = "show" + (isError ? " error" : "");
    clearTimeout(statusTimer);
    statusTimer = setTimeout(function () { el.className = ""; }, isError ? 5000 : 1200);
  }

  // A judgement id made before the first send: a retried send is recognised by the server (idempotent).
  function newId() {
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function token() { return window.localStorage.getItem(TOKEN_KEY); }

  function takeTokenFromUrl() {
    var url = new URL(window.location.href);
    var t = url.searchParams.get("token");
    if (t) {
      window.localStorage.setItem(TOKEN_KEY, t);
      url.searchParams.delete("token");
      window.history.replaceState(null, "", url.pathname + (url.search ? url.search : "") + url.hash);
    }
  }

  function signOut(message) {
    window.localStorage.removeItem(TOKEN_KEY);
    state.task = null;
    $("who").textContent = "";
    $("progress").textContent = "";
    $("signout").hidden = true;
    show("login");
    if (message) { flash(message, true); }
  }

  function api(method, path, body) {
    var opts = { method: method, headers: { "Authorization": "Bearer " + token() }, cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(path, opts).then(function (resp) {
      if (resp.status === 401) {
        signOut("This token is not valid. Please enter yours again.");
        throw new Error("unauthorized");
      }
      return resp;
    });
  }

  function detail(resp) {
    return resp.json().then(function (b) { return b.detail || resp.statusText; }, function () { return resp.statusText; });
  }

  function setProgress() {
    var text = state.done + " judged";
    if (state.remaining !== null) { text += " · " + Math.max(state.remaining, 0) + " remaining"; }
    $("progress").textContent = text;
  }

  function canUndo() {
    return !!state.last && (Date.now() - state.lastAt) < state.undoSeconds * 1000;
  }

  function updateUndo() {
    $("undo").hidden = !canUndo();
    clearTimeout(undoTimer);
    if (canUndo()) { undoTimer = setTimeout(updateUndo, state.undoSeconds * 1000 - (Date.now() - state.lastAt) + 50); }
  }

  function undo() {
    if (!canUndo() || state.busy) { return; }
    state.busy = true;
    var id = state.last;
    api("POST", "/api/judgements/" + encodeURIComponent(id) + "/undo").then(function (resp) {
      if (!resp.ok) {
        state.busy = false;
        state.last = null; updateUndo();
        return detail(resp).then(function (d) { flash(d, true); });
      }
      return resp.json().then(function (body) {
        state.last = null; updateUndo();
        state.done -= 1;
        if (state.remaining !== null) { state.remaining += 1; }
        setProgress();
        flash("Undone: judge it again");
        render(body.task);
      });
    }).catch(function (err) { state.busy = false; if (err.message !== "unauthorized") { flash(err.message, true); } });
  }

  function start() {
    if (!token()) { show("login"); $("token-input").focus(); return; }
    api("GET", "/api/me").then(function (resp) {
      if (!resp.ok) { return detail(resp).then(function (d) { flash(d, true); }); }
      return resp.json().then(function (me) {
        $("who").textContent = "Signed in as " + me.name;
        $("signout").hidden = false;
        state.done = me.judgements;
        state.remaining = typeof me.remaining === "number" ? me.remaining : null;
        state.undoSeconds = me.undo_seconds || 0;
        setProgress();
        loadNext();
      });
    }).catch(function (err) { if (err.message !== "unauthorized") { flash("Cannot reach the service: " + err.message, true); } });
  }

  function loadNext() {
    state.task = null;
    return api("GET", "/api/tasks/next").then(function (resp) {
      if (resp.status === 204) { show("done"); return; }
      if (!resp.ok) { return detail(resp).then(function (d) { flash(d, true); }); }
      return resp.json().then(render);
    }).catch(function (err) { if (err.message !== "unauthorized") { flash("Cannot load a task: " + err.message, true); } });
  }

  function render(task) {
    state.task = task;
    $("written").value = "";
    $("write-box").open = false;
    state.judgementId = newId();
    state.ranking = [];
    state.rankMode = false;
    state.unsafe = {};
    state.busy = false;
    $("prompt").textContent = task.prompt;
    $("family").textContent = task.family;
    var box = $("candidates");
    box.textContent = "";
    task.candidates.forEach(function (c, pos) {
      var card = document.createElement("article");
      card.className = "candidate";
      card.dataset.position = String(pos);
      card.dataset.index = String(c.index);
      card.dataset.candidateId = c.id;
      var head = document.createElement("header");
      var key = document.createElement("span");
      key.className = "key";
      key.textContent = pos < 9 ? String(pos + 1) : "·";
      var rank = document.createElement("span");
      rank.className = "rank";
      var label = document.createElement("label");
      var box2 = document.createElement("input");
      box2.type = "checkbox";
      box2.className = "unsafe";
      box2.addEventListener("click", function (ev) { ev.stopPropagation(); toggleUnsafe(pos, box2.checked); });
      label.appendChild(box2);
      label.appendChild(document.createTextNode(" unsafe"));
      label.addEventListener("click", function (ev) { ev.stopPropagation(); });
      head.appendChild(key);
      head.appendChild(rank);
      head.appendChild(label);
      var text = document.createElement("pre");
      text.className = "text";
      text.textContent = c.text;
      card.appendChild(head);
      card.appendChild(text);
      card.addEventListener("click", function () { choose(pos); });
      box.appendChild(card);
    });
    var n = task.candidates.length;
    $("help").textContent = "Keys: 1–" + Math.min(n, 9) + " pick the best · Shift+number flags unsafe · " +
      "R rank all (numbers in order, Enter sends, Backspace undoes) · X all unacceptable · " +
      "W write the answer you would want (sent with X) · S skip · " +
      "D show differences · U undo the last judgement";
    updateRankUi();
    showDiff(state.diff);
    show("task");
  }

  // Word-level differences: a word is highlighted when it is in no longest common subsequence
  // of its answer with another answer (with two answers: exactly what sets them apart).
  function words(t) { return t.split(/(\s+)/).filter(function (w) { return w.length > 0; }); }

  function commonMask(a, b) {
    var n = a.length, m = b.length, i, j;
    if (n * m > 4000000) { return null; }
    var dp = [];
    for (i = 0; i <= n; i++) { dp.push(new Uint32Array(m + 1)); }
    for (i = n - 1; i >= 0; i--) {
      for (j = m - 1; j >= 0; j--) {
        dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
      }
    }
    var keepA = new Array(n).fill(false), keepB = new Array(m).fill(false);
    i = 0; j = 0;
    while (i < n && j < m) {
      if (a[i] === b[j]) { keepA[i] = true; keepB[j] = true; i++; j++; }
      else if (dp[i + 1][j] >= dp[i][j + 1]) { i++; } else { j++; }
    }
    return [keepA, keepB];
  }

  function paint(pre, tokens, keep) {
    pre.textContent = "";
    tokens.forEach(function (w, k) {
      if (keep[k] || /^\s+$/.test(w)) { pre.appendChild(document.createTextNode(w)); return; }
      var mark = document.createElement("mark");
      mark.className = "diff";
      mark.textContent = w;
      pre.appendChild(mark);
    });
  }

  function showDiff(on) {
    state.diff = on;
    if (!state.task) { return; }
    var all = cards();
    $("diff-toggle").textContent = on ? "Hide differences (D)" : "Show differences (D)";
    all.forEach(function (card, pos) {
      card.querySelector(".text").textContent = state.task.candidates[pos].text;
    });
    if (!on || all.length < 2) { return; }
    var texts = state.task.candidates.map(function (c) { return words(c.text); });
    var keep = texts.map(function (t) { return new Array(t.length).fill(false); });
    for (var p = 0; p < all.length; p++) {
      for (var q = p + 1; q < all.length; q++) {
        var masks = commonMask(texts[p], texts[q]);
        if (!masks) { flash("These answers are too long to compare word by word", true); return; }
        masks[0].forEach(function (k, i) { if (k) { keep[p][i] = true; } });
        masks[1].forEach(function (k, i) { if (k) { keep[q][i] = true; } });
      }
    }
    all.forEach(function (card, pos) { paint(card.querySelector(".text"), texts[pos], keep[pos]); });
  }

  function cards() { return Array.prototype.slice.call(document.querySelectorAll("#candidates .candidate")); }

  function toggleUnsafe(pos, value) {
    if (value === undefined) { value = !state.unsafe[pos]; }
    if (value) { state.unsafe[pos] = true; } else { delete state.unsafe[pos]; }
    var card = cards()[pos];
    card.classList.toggle("flagged", !!value);
    card.querySelector("input.unsafe").checked = !!value;
  }

  function updateRankUi() {
    var n = state.task ? state.task.candidates.length : 0;
    cards().forEach(function (card, pos) {
      var r = state.ranking.indexOf(pos);
      card.classList.toggle("ranked", r >= 0);
      card.querySelector(".rank").textContent = r >= 0 ? "#" + (r + 1) : "";
    });
    $("rank-toggle").textContent = state.rankMode ? "Cancel ranking (R)" : "Rank all (R)";
    $("send-ranking").hidden = !(state.rankMode && state.ranking.length === n);
  }

  function choose(pos) {
    if (!state.task || state.busy) { return; }
    var n = state.task.candidates.length;
    if (pos < 0 || pos >= n) { return; }
    if (!state.rankMode) { sendBest(pos); return; }
    if (state.ranking.indexOf(pos) < 0) { state.ranking.push(pos); }
    if (state.ranking.length === n - 1) {
      for (var i = 0; i < n; i++) { if (state.ranking.indexOf(i) < 0) { state.ranking.push(i); } }
    }
    updateRankUi();
  }

  function unsafeIndexes() {
    return Object.keys(state.unsafe).map(function (p) { return state.task.candidates[Number(p)].index; });
  }

  function sendBest(pos) {
    send({ best: state.task.candidates[pos].index, ranking: null, all_unacceptable: false });
  }

  function sendRanking() {
    var n = state.task.candidates.length;
    if (state.ranking.length !== n) { flash("Rank every answer first (" + state.ranking.length + "/" + n + ")", true); return; }
    var ranking = state.ranking.map(function (p) { return state.task.candidates[p].index; });
    send({ best: ranking[0], ranking: ranking, all_unacceptable: false });
  }

  function sendNone() {
    var written = $("written").value;
    send({ best: null, ranking: null, all_unacceptable: true, written: written.trim() ? written : null });
  }

  function openWriteBox() {
    $("write-box").open = true;
    $("written").focus();
  }

  function send(choice, attempt) {
    if (!state.task || (state.busy && !attempt)) { return; }
    state.busy = true;
    attempt = attempt || 1;
    var body = {
      task_id: state.task.task_id,
      judgement_id: state.judgementId,
      best: choice.best,
      ranking: choice.ranking,
      all_unacceptable: choice.all_unacceptable,
      unsafe: unsafeIndexes()
    };
    if (choice.written) { body.written = choice.written; }
    api("POST", "/api/judgements?next=true", body).then(function (resp) {
      if (resp.status === 201 || resp.status === 200) {
        return resp.json().then(function (rec) {
          if (resp.status === 201) {
            state.done += 1;
            if (state.remaining !== null) { state.remaining -= 1; }
            setProgress();
          }
          state.last = rec.judgement_id;
          state.lastAt = Date.now();
          updateUndo();
          flash(state.undoSeconds > 0 ? "Saved ✓ (U to undo)" : "Saved ✓");
          if (rec.next_task) { render(rec.next_task); } else { state.task = null; show("done"); }
        });
      }
      if (resp.status === 409) {
        return detail(resp).then(function (d) { flash(d, true); return loadNext(); });
      }
      if (resp.status >= 500 && attempt < 4) {
        return new Promise(function (ok) { setTimeout(ok, 400 * attempt); }).then(function () { send(choice, attempt + 1); });
      }
      state.busy = false;
      return detail(resp).then(function (d) { flash(d, true); });
    }).catch(function (err) {
      if (err.message === "unauthorized") { return; }
      if (attempt < 4) {
        setTimeout(function () { send(choice, attempt + 1); }, 400 * attempt);
      } else {
        state.busy = false;
        flash("Not saved (" + err.message + "); press the key again to retry.", true);
      }
    });
  }

  function skip() {
    if (!state.task || state.busy) { return; }
    state.busy = true;
    api("POST", "/api/tasks/" + state.task.task_id + "/skip").then(function (resp) {
      if (!resp.ok && resp.status !== 409) {
        state.busy = false;
        return detail(resp).then(function (d) { flash(d, true); });
      }
      flash("Skipped");
      if (state.remaining !== null) { state.remaining -= 1; setProgress(); }
      return loadNext();
    }).catch(function (err) { state.busy = false; if (err.message !== "unauthorized") { flash(err.message, true); } });
  }

  function toggleRank() {
    if (!state.task) { return; }
    state.rankMode = !state.rankMode;
    state.ranking = [];
    updateRankUi();
  }

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    if (ev.target && (ev.target.tagName === "INPUT" || ev.target.tagName === "TEXTAREA") && ev.target.type !== "checkbox") { return; }
    if ((ev.key || "").toLowerCase() === "u" && $("login").hidden) { ev.preventDefault(); undo(); return; }
    if ($("task").hidden) { return; }
    var digit = /^Digit([1-9])$/.exec(ev.code) || /^Numpad([1-9])$/.exec(ev.code);
    var key = (ev.key || "").toLowerCase();
    if (!digit && /^[1-9]$/.test(ev.key || "")) { digit = [null, ev.key]; }
    if (digit) {
      ev.preventDefault();
      var pos = Number(digit[1]) - 1;
      if (ev.shiftKey) { if (state.task && pos < state.task.candidates.length) { toggleUnsafe(pos); } return; }
      choose(pos);
    } else if (key === "x") {
      ev.preventDefault(); sendNone();
    } else if (key === "w") {
      ev.preventDefault(); openWriteBox();
    } else if (key === "s") {
      ev.preventDefault(); skip();
    } else if (key === "d") {
      ev.preventDefault(); showDiff(!state.diff);
    } else if (key === "r") {
      ev.preventDefault(); toggleRank();
    } else if (key === "enter" && state.rankMode) {
      ev.preventDefault(); sendRanking();
    } else if (key === "backspace" && state.rankMode) {
      ev.preventDefault(); state.ranking.pop(); updateRankUi();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    takeTokenFromUrl();
    $("login-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var t = $("token-input").value.trim();
      if (!t) { return; }
      window.localStorage.setItem(TOKEN_KEY, t);
      $("token-input").value = "";
      start();
    });
    $("signout").addEventListener("click", function () { signOut(); });
    $("rank-toggle").addEventListener("click", toggleRank);
    $("send-ranking").addEventListener("click", sendRanking);
    $("none-ok").addEventListener("click", sendNone);
    $("written").addEventListener("keydown", function (ev) {
      if (ev.key === "Escape") { ev.preventDefault(); $("written").blur(); }
    });
    $("skip").addEventListener("click", skip);
    $("again").addEventListener("click", loadNext);
    $("undo").addEventListener("click", undo);
    $("diff-toggle").addEventListener("click", function () { showDiff(!state.diff); });
    document.addEventListener("keydown", onKey);
    start();
  });
})();
