// The lobby keeps itself current: every couple of seconds it asks for the server-rendered list of who is online,
// sending the ETag of the list it shows; the server answers 304 (nothing new, a few hundred bytes) until the list
// changes, then the new rows, which are swapped in. The rows are HTML the server escaped, so no data is turned
// into markup here. They are the same for every viewer, so this script marks the viewer's own row. Polling pauses
// while the tab is hidden and resumes (at once) when it is shown again. docs/lobby.md explains the choice.
(function () {
  "use strict";
  var box = document.getElementById("lobby");
  if (!box) return;
  var url = box.getAttribute("data-live-url");
  var every = (parseFloat(box.getAttribute("data-poll-seconds")) || 2) * 1000;
  var me = box.getAttribute("data-me");
  var status = document.getElementById("live-status");
  var etag = null;
  var timer = null;

  function say(text, state) {
    if (!status) return;
    status.textContent = text;
    status.setAttribute("data-state", state);
  }

  function markMe() {
    if (!me) return;
    box.querySelectorAll(".lobby-player").forEach(function (row) {
      if (row.getAttribute("data-player") !== me || row.classList.contains("me")) return;
      row.classList.add("me");
      var who = row.querySelector(".who");
      if (who) who.textContent = who.textContent + " (you)";
    });
  }

  function refresh() {
    timer = null;
    var headers = etag ? {"If-None-Match": etag} : {};
    fetch(url, {credentials: "same-origin", cache: "no-store", headers: headers})
      .then(function (r) {
        if (r.status === 304) return null;
        if (!r.ok) throw new Error("HTTP " + r.status);
        etag = r.headers.get("ETag");
        return r.text();
      })
      .then(function (html) {
        if (html !== null) { box.innerHTML = html; markMe(); }
        say("Live: checked " + new Date().toLocaleTimeString() + ".", "ok");
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
  markMe();
  schedule();
})();
