// The lobby refreshes itself: every few seconds it fetches the server-rendered list of who is online and swaps
// it in. The fragment is HTML the server escaped, so no data is turned into markup here. Polling pauses while
// the tab is hidden and resumes (at once) when it is shown again.
(function () {
  "use strict";
  var box = document.getElementById("lobby");
  if (!box) return;
  var url = box.getAttribute("data-live-url");
  var every = (parseInt(box.getAttribute("data-poll-seconds"), 10) || 5) * 1000;
  var status = document.getElementById("live-status");
  var timer = null;

  function say(text, state) {
    if (!status) return;
    status.textContent = text;
    status.setAttribute("data-state", state);
  }

  function refresh() {
    timer = null;
    fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) {
        box.innerHTML = html;
        say("Live: updated " + new Date().toLocaleTimeString() + ".", "ok");
      })
      .catch(function () { say("Can't reach LanHub right now; retrying…", "error"); })
      .then(schedule);
  }

  function schedule() {
    if (!document.hidden && timer === null) timer = setTimeout(refresh, every);
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { clearTimeout(timer); timer = null; } else { clearTimeout(timer); timer = null; refresh(); }
  });
  schedule();
})();
