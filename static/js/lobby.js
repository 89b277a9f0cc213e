// The lobby keeps itself current. It listens on a server-sent-events stream: the server sends the rendered list
// of who is online each time it changes (and nothing while it doesn't). Where no stream can be had (the server
// answers 503 when it has none to spare, or the browser lacks EventSource), it asks every couple of seconds
// instead, sending the ETag of the list it shows; the server answers 304 until the list changes. The rows are
// HTML the server escaped, so no data is turned into markup here. They are the same for every viewer, so this
// script marks the viewer's own row. While the tab is hidden it neither listens nor asks; it catches up at once
// when the tab is shown again. docs/lobby.md explains the choice.
(function () {
  "use strict";
  var box = document.getElementById("lobby");
  if (!box) return;
  var url = box.getAttribute("data-live-url");
  var streamUrl = box.getAttribute("data-stream-url");
  var every = (parseFloat(box.getAttribute("data-poll-seconds")) || 2) * 1000;
  var me = box.getAttribute("data-me");
  var status = document.getElementById("live-status");
  var etag = box.getAttribute("data-etag");  // the version of the rows the page was drawn with
  var timer = null;
  var source = null;
  var polling = !streamUrl || typeof EventSource === "undefined";

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

  function show(html) {
    box.innerHTML = html;
    markMe();
  }

  // --- The stream ---------------------------------------------------------------------------------------------
  function listen() {
    if (source || document.hidden) return;
    // The stream sends the rows only once they differ from the version this page holds.
    source = new EventSource(etag ? streamUrl + "?etag=" + encodeURIComponent(etag) : streamUrl,
                             {withCredentials: true});
    source.onopen = function () { say("Live: changes show as they happen.", "ok"); };
    source.onmessage = function (e) {
      etag = e.lastEventId || etag;
      show(e.data);
      say("Live: updated " + new Date().toLocaleTimeString() + ".", "ok");
    };
    source.onerror = function () {
      // The browser reconnects by itself after a dropped stream (readyState CONNECTING). CLOSED means the server
      // said no (503: no stream to spare; 410: revoked): poll instead, which tells the page what happened.
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        polling = true;
        schedule();
      } else {
        say("Can't reach LanHub right now; retrying…", "error");
      }
    };
  }

  function stopListening() {
    if (source) { source.close(); source = null; }
  }

  // --- Polling, where there is no stream --------------------------------------------------------------------
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
        if (html !== null) show(html);
        say("Live: checked " + new Date().toLocaleTimeString() + ".", "ok");
      })
      .catch(function () { say("Can't reach LanHub right now; retrying…", "error"); })
      .then(schedule);
  }

  function schedule() {
    if (!document.hidden && timer === null) timer = setTimeout(refresh, every);
  }

  function start() {
    if (polling) { clearTimeout(timer); timer = null; refresh(); } else { listen(); }
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      clearTimeout(timer); timer = null;
      stopListening();
    } else {
      start();
    }
  });
  markMe();
  if (polling) schedule(); else listen();
})();
