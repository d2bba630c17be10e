// mmbatch dashboard: live job progress (polling the dashboard's JSON), the upload form with an
// upload progress bar, cancel buttons, and the review page's keys. Untrusted text only ever goes in through textContent.
(function () {
  "use strict";

  var ACTIVE_POLL_MS = 1000;
  var IDLE_POLL_MS = 5000;

  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function pct(job) { return Math.round(job.progress * 1000) / 10; }

  function bar(job) {
    var p = pct(job);
    var fill = el("div", { className: "fill state-" + job.state });
    fill.style.width = p + "%";
    var wrap = el("div", { className: "bar", role: "progressbar", "aria-valuemin": "0",
                           "aria-valuemax": "100", "aria-valuenow": String(Math.floor(p)) }, [fill]);
    var frag = document.createDocumentFragment();
    frag.appendChild(wrap);
    frag.appendChild(el("span", { className: "pct", text: p + " %" }));
    return frag;
  }

  function rate(job) {
    return job.throughput === null ? "–" : job.throughput.toFixed(1) + " items/s";
  }

  function eta(job) {
    return job.eta_seconds === null ? "–" : Math.round(job.eta_seconds) + " s";
  }

  function stateCell(job) {
    var td = el("td", { className: "state" },
                [el("span", { className: "badge state-" + job.state, text: job.state })]);
    if (job.stage) {
      td.appendChild(document.createTextNode(" "));
      td.appendChild(el("small", { text: job.stage }));
    }
    return td;
  }

  function cancelButton(job, after) {
    var b = el("button", { type: "button", className: "danger", text: "Cancel" });
    b.addEventListener("click", function () {
      b.disabled = true;
      fetch(job.links.cancel, { method: "POST", credentials: "same-origin",
                                headers: { "X-CSRF-Token": csrf() } })
        .then(function () { after(); });
    });
    return b;
  }

  function jobRow(job, refresh) {
    var name = el("td", {}, [el("a", { href: job.links.page, text: job.archive.name }),
                             el("br"), el("code", { text: job.id.slice(0, 8) })]);
    var tr = el("tr", { "data-job-id": job.id, "data-state": job.state }, [
      name, el("td", { text: job.kind }), stateCell(job),
      el("td", { className: "progress" }, [bar(job)]),
      el("td", { className: "done", text: String(job.done) }),
      el("td", { className: "failed", text: String(job.failed) }),
      el("td", { className: "total", text: String(job.total) }),
      el("td", { className: "rate", text: rate(job) }),
      el("td", { className: "eta", text: eta(job) }),
      el("td", {}, [job.terminal ? null : cancelButton(job, refresh)])
    ]);
    return tr;
  }

  // --- the jobs page ------------------------------------------------------------------------

  function jobsPage(table) {
    var timer = null;
    function refresh() {
      clearTimeout(timer);
      fetch(table.dataset.poll, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (body) {
          var tbody = table.tBodies[0];
          var rows = body.jobs.map(function (j) { return jobRow(j, refresh); });
          tbody.replaceChildren.apply(tbody, rows);
          if (!rows.length) {
            tbody.appendChild(el("tr", { className: "empty" },
              [el("td", { colspan: "10", text: "No jobs yet: upload an archive above." })]));
          }
          var active = body.jobs.some(function (j) { return !j.terminal; });
          timer = setTimeout(refresh, active ? ACTIVE_POLL_MS : IDLE_POLL_MS);
        })
        .catch(function () { timer = setTimeout(refresh, IDLE_POLL_MS); });
    }
    refresh();
    return refresh;
  }

  function uploadForm(form, refresh) {
    var status = document.getElementById("upload-status");
    var barNode = document.getElementById("upload-bar");
    var text = document.getElementById("upload-text");
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var xhr = new XMLHttpRequest();
      var button = form.querySelector("button[type=submit]");
      button.disabled = true;
      status.hidden = false;
      status.classList.remove("failed");
      function show(p, message) {
        barNode.setAttribute("aria-valuenow", String(Math.floor(p)));
        barNode.firstElementChild.style.width = p + "%";
        text.textContent = message;
      }
      show(0, "uploading…");
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) {
          var p = Math.round(e.loaded / e.total * 1000) / 10;
          show(p, "uploading " + p + " % (" + (e.loaded / 1048576).toFixed(1) + " of " +
               (e.total / 1048576).toFixed(1) + " MiB)");
        }
      });
      xhr.addEventListener("load", function () {
        button.disabled = false;
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status >= 200 && xhr.status < 300 && body) {
          show(100, "uploaded: job " + body.id.slice(0, 8) + " is " + body.state);
          form.reset();
          refresh();
        } else {
          status.classList.add("failed");
          text.textContent = "upload refused (" + xhr.status + "): " +
            (body && body.error ? body.error.message : xhr.statusText);
        }
      });
      xhr.addEventListener("error", function () {
        button.disabled = false;
        status.classList.add("failed");
        text.textContent = "the upload failed: the connection was lost";
      });
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      xhr.send(new FormData(form));
    });
  }

  // --- a job's page ---------------------------------------------------------------------------

  function jobPage(section) {
    var loadedTerminal = section.dataset.terminal === "yes";
    if (loadedTerminal) return;
    function set(selector, value) {
      var node = section.querySelector(selector);
      if (node) node.textContent = value;
    }
    function poll() {
      fetch(section.dataset.poll, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (job) {
          var progress = section.querySelector("dd.progress");
          progress.replaceChildren(bar(job));
          var state = section.querySelector("dd.state");
          state.replaceChildren.apply(state, Array.prototype.slice.call(stateCell(job).childNodes));
          set(".done", String(job.done));
          set(".failed", String(job.failed));
          set(".total", String(job.total));
          set(".rate", rate(job));
          set(".eta", eta(job));
          section.dataset.state = job.state;
          if (job.terminal) {
            // the results table is rendered on the server: show the finished one
            setTimeout(function () { window.location.reload(); }, 300);
          } else {
            setTimeout(poll, ACTIVE_POLL_MS);
          }
        })
        .catch(function () { setTimeout(poll, IDLE_POLL_MS); });
    }
    poll();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("jobs");
    var refresh = table ? jobsPage(table) : function () {};
    var form = document.getElementById("upload-form");
    if (form) uploadForm(form, refresh);
    var job = document.getElementById("job");
    if (job) jobPage(job);
    if (document.getElementById("review-items")) reviewKeys();
  });

  // The review page: j/k move between items, a accepts the prediction, 1-9 pick a class.
  function reviewKeys() {
    var rows = Array.prototype.slice.call(document.querySelectorAll("#review-items tr.review-row"));
    if (!rows.length) return;
    var at = 0;
    function focus(i) {
      at = Math.max(0, Math.min(rows.length - 1, i));
      rows.forEach(function (r, j) { r.classList.toggle("current", j === at); });
      rows[at].focus();
    }
    focus(0);
    document.addEventListener("keydown", function (ev) {
      if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
      var tag = (ev.target && ev.target.tagName) || "";
      if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
      var row = rows[at];
      var button = null;
      if (ev.key === "j") { focus(at + 1); ev.preventDefault(); return; }
      if (ev.key === "k") { focus(at - 1); ev.preventDefault(); return; }
      if (ev.key === "a") button = row.querySelector("button.accept");
      else if (/^[1-9]$/.test(ev.key)) button = row.querySelector('button.correct[data-key="' + ev.key + '"]');
      if (button) { ev.preventDefault(); button.click(); }
    });
  }
})();
