// Copy buttons: <button data-copy="text"> or <button data-copy-target="#id"> (an input or any element's text).
// navigator.clipboard needs a secure context (https or localhost); a LAN address over plain http falls back to
// selecting the text and execCommand("copy").
(function () {
  "use strict";

  function fallback(value) {
    var area = document.createElement("textarea");
    area.value = value;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(area);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy failed"));
  }

  function copy(value) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(value).catch(function () { return fallback(value); });
    }
    return fallback(value);
  }

  function flash(button, label) {
    var original = button.dataset.label || button.textContent;
    button.dataset.label = original;
    button.textContent = label;
    setTimeout(function () { button.textContent = original; }, 1500);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy], [data-copy-target]");
    if (!button) return;
    var value = button.getAttribute("data-copy");
    if (value === null) {
      var target = document.querySelector(button.getAttribute("data-copy-target"));
      if (!target) return;
      value = "value" in target && target.value !== undefined ? target.value : target.textContent;
      if (target.select) target.select();
    }
    copy(value.trim()).then(function () { flash(button, "Copied!"); },
                            function () { flash(button, "Press Ctrl+C"); });
  });
})();
