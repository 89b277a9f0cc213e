// Which server is nearest from here? The player's browser times a request to each ready node's TCP port and
// posts the times back; the server re-ranks and returns the list and the chosen server's parts of the page, which
// replace the estimated ones.
//
// A node's TCP port runs OpenVPN, not HTTP: the request fails, but only after the TCP handshake and OpenVPN
// dropping the connection (the first two bytes of "GET" or a TLS hello announce an impossible packet length), so
// the time to the failure is about two round trips. The page's CSP allows connect-src to exactly these origins.
(function () {
  "use strict";
  var box = document.getElementById("ranking");
  if (!box) return;
  var status = document.getElementById("measure-status");
  var again = document.getElementById("measure-again");
  var TRIES = 3, TIMEOUT = 3000;

  function probeOnce(url) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, TIMEOUT);
    var start = performance.now();
    function done() { clearTimeout(timer); return controller.signal.aborted ? null : performance.now() - start; }
    return fetch(url, {mode: "no-cors", cache: "no-store", credentials: "omit", signal: controller.signal})
      .then(done, done);
  }

  // The fastest of a few tries: the first one also pays for DNS and any connection set-up in the browser.
  function probe(hostPort) {
    var url = window.location.protocol + "//" + hostPort + "/lanhub-probe";
    var best = null, i = 0;
    function next() {
      if (i++ >= TRIES) return Promise.resolve(best);
      return probeOnce(url).then(function (ms) {
        if (ms === null) return best;  // timed out: no point in trying again
        best = best === null ? ms : Math.min(best, ms);
        return next();
      });
    }
    return next();
  }

  function setStatus(text) {
    if (!status) return;
    status.firstChild.textContent = text + " ";
  }

  function csrf() {
    var input = document.querySelector("#rtt-form input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // The answer holds every part of the page that names the chosen server (templates/players/_chosen_parts.html):
  // each replaces the element with its id, so the header, the download button, the QR code, the Linux steps and
  // the ranking never disagree about which server is the player's.
  function swapParts(html) {
    var holder = document.createElement("template");
    holder.innerHTML = html;
    Array.prototype.forEach.call(holder.content.querySelectorAll("[data-part]"), function (part) {
      var target = document.getElementById(part.getAttribute("data-part"));
      if (target) target.innerHTML = part.innerHTML;
    });
  }

  function measure() {
    var items = Array.prototype.slice.call(box.querySelectorAll("[data-probe-host]"));
    if (!items.length) { box.setAttribute("data-measure", "done"); return; }
    setStatus("Measuring from your browser…");
    if (again) again.hidden = true;
    var rtts = {};
    // One node at a time, so the probes don't queue behind each other and skew the times.
    var chain = Promise.resolve();
    items.forEach(function (li) {
      chain = chain.then(function () {
        return probe(li.getAttribute("data-probe-host")).then(function (ms) {
          rtts[li.getAttribute("data-node")] = ms === null ? null : Math.round(ms * 10) / 10;
        });
      });
    });
    chain.then(function () {
      var body = new URLSearchParams();
      body.append("rtts", JSON.stringify(rtts));
      return fetch(box.getAttribute("data-rtt-url"), {
        method: "POST", credentials: "same-origin", body: body,
        headers: {"X-CSRFToken": csrf(), "Accept": "text/html"}
      });
    }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (html) {
      swapParts(html);
      setStatus("Measured from this browser.");
    }).catch(function () {
      setStatus("Could not measure from this browser; the order is an estimate.");
    }).then(function () {
      box.setAttribute("data-measure", "done");
      if (again) again.hidden = false;
    });
  }

  if (again) again.addEventListener("click", measure);
  if (box.getAttribute("data-measure") === "auto") measure(); else if (again) again.hidden = false;
})();
