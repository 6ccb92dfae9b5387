// agentpolicy serve: keeps the approvals list current (polling), without disturbing a vote in progress.
(function () {
  "use strict";
  var list = document.getElementById("pending");
  var status = document.getElementById("status");
  if (!list || !window.fetch) { return; }
  var every = Math.max(1, parseInt(list.getAttribute("data-every"), 10) || 5) * 1000;
  var url = list.getAttribute("data-refresh");
  var waiting = null;

  function busy() {
    // Never replace the list under a person who is voting: focus or text inside a form.
    var active = document.activeElement;
    if (active && list.contains(active) && active.closest("form")) { return true; }
    var fields = list.querySelectorAll("input[type=text]");
    for (var i = 0; i < fields.length; i++) { if (fields[i].value) { return true; } }
    return false;
  }

  function apply(html, summary) {
    if (html === list.innerHTML) { return; }
    if (busy()) {
      waiting = [html, summary];
      status.textContent = "The list changed; it updates when you leave the form.";
      return;
    }
    waiting = null;
    list.innerHTML = html;
    if (summary) { status.textContent = summary; }
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) { status.textContent = "Your session ended: sign in again."; return null; }
        if (!r.ok) { return null; }
        return r.text().then(function (html) { apply(html, r.headers.get("X-Approvals-Summary")); });
      })
      .catch(function () { /* offline for a moment: try again next time */ })
      .then(function () { window.setTimeout(poll, every); });
  }

  list.addEventListener("focusout", function () {
    window.setTimeout(function () { if (waiting && !busy()) { apply(waiting[0], waiting[1]); } }, 0);
  });
  window.setTimeout(poll, every);
})();
