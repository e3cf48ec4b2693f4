// The Taidon dashboard's own script (no build step): every htmx request carries the session's
// CSRF token, action bodies go out as JSON (the admin API's format), answers and refusals show
// in the message area, and the page's panels refresh after each change.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

htmx.defineExtension("json-body", {
  onEvent: function (name, evt) {
    if (name !== "htmx:configRequest") return true;
    const elt = evt.detail.elt;
    const field = elt.getAttribute("data-prompt-field");
    const answer = evt.detail.headers["HX-Prompt"];
    if (field && answer !== undefined) evt.detail.parameters[field] = answer;
    evt.detail.headers["Content-Type"] = "application/json";
    return true;
  },
  encodeParameters: function (xhr, parameters) {
    xhr.overrideMimeType("text/plain");
    const out = {};
    parameters.forEach(function (value, key) { out[key] = value; });
    return JSON.stringify(out);
  },
});

// An action in flight holds the panels still: a refresh would replace its button, and the
// answer would then arrive on an element no longer in the page.
let pending = 0;

document.addEventListener("htmx:configRequest", function (evt) {
  const elt = evt.detail.elt;
  if (elt.id === "panel" && pending > 0) { evt.preventDefault(); return; }
  evt.detail.headers["X-CSRF-Token"] = csrfToken();
});

document.addEventListener("htmx:beforeSend", function (evt) {
  if (evt.detail.elt.hasAttribute("data-action")) pending += 1;
});

// The API's answer: JSON, or NDJSON whose last line is the result or the error.
function lastAnswer(text) {
  const lines = (text || "").trim().split("\n");
  try { return JSON.parse(lines[lines.length - 1]); } catch (e) { return null; }
}

function flash(text, ok) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;
  box.className = ok ? "flash ok" : "flash error";
}

document.addEventListener("htmx:afterRequest", function (evt) {
  const elt = evt.detail.elt;
  if (!elt.hasAttribute || !elt.hasAttribute("data-action")) return;
  pending = Math.max(0, pending - 1);
  const xhr = evt.detail.xhr;
  if (xhr.status === 401) { window.location.assign("/ui/signin?expired=1"); return; }
  const answer = lastAnswer(xhr.responseText);
  if (xhr.status >= 400 || (answer && answer.error)) {
    const err = answer && answer.error;
    flash((err && err.message) || ("the request failed (HTTP " + xhr.status + ")"), false);
  } else {
    flash(elt.getAttribute("data-action") || "done", true);
    const next = elt.getAttribute("data-then");
    if (next) { window.location.assign(next); return; }
  }
  htmx.trigger(document.body, "refresh");
});

document.addEventListener("htmx:sendError", function () {
  flash("the proxy did not answer (stopped or unreachable)", false);
});

// A running job's page follows its events (GET /v1/jobs/{ref}/events as server-sent events)
// and refreshes its panel as they arrive, at most every 300 ms.
function followJob() {
  const marker = document.querySelector("[data-follow]");
  if (!marker || typeof EventSource === "undefined") return;
  const source = new EventSource(marker.getAttribute("data-follow"));
  let queued = false;
  function refresh() {
    if (queued) return;
    queued = true;
    setTimeout(function () { queued = false; htmx.trigger(document.body, "refresh"); }, 300);
  }
  source.onmessage = refresh;
  source.addEventListener("end", function () { source.close(); refresh(); });
  source.onerror = function () { source.close(); };  // the panel's polling goes on
}
document.addEventListener("DOMContentLoaded", followJob);
