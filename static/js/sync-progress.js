// Keeps every sync progress element (.lh-sync[data-status-url]) live: the LAN dashboard, the node page and the
// node's admin page. It polls the node's status.json quickly while a sync is queued or running and slowly
// otherwise, so a sync started elsewhere (the admin, a re-plan) still shows up.
(function () {
  "use strict";
  var FAST = 1500, SLOW = 15000;

  function text(run) {
    return run.status_label + " — " + (run.current_step || (run.active ? "waiting" : "idle"));
  }

  function update(el, data) {
    var step = el.querySelector(".lh-sync-step");
    var bar = el.querySelector("progress");
    if (step) step.textContent = data.status ? text(data) : "No sync yet";
    if (bar) { bar.value = data.progress || 0; bar.textContent = (data.progress || 0) + "%"; }
    el.dataset.active = data.active ? "true" : "false";
    el.dataset.status = data.status || "";
    var scope = el.closest(".node-card") || document;
    var error = scope.querySelector("[data-last-error]");
    if (error) { error.textContent = data.last_error || ""; error.hidden = !data.last_error; }
    var state = scope.querySelector("[data-node-state]");
    if (state) { state.textContent = data.state_label; state.className = "badge " + data.state; }
  }

  function watch(el) {
    var url = el.getAttribute("data-status-url");
    var wasActive = el.dataset.active === "true";
    function poll() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (data) {
          update(el, data);
          // On the node page a finished run brings new log lines: reload once to show them.
          if (wasActive && !data.active && el.closest("[data-reload-when-done]")) { window.location.reload(); return; }
          wasActive = data.active;
          setTimeout(poll, data.active ? FAST : SLOW);
        })
        .catch(function () { setTimeout(poll, SLOW); });
    }
    poll();
  }

  function start() { document.querySelectorAll(".lh-sync[data-status-url]").forEach(watch); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
