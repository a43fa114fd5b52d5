/* The console without reloading: the whole page works without this file; with it,
   - an element with data-live="URL" is refreshed from URL every data-every seconds; the request
     carries If-None-Match, so an unchanged page costs the server one small query and a 304;
   - an element with data-follow="URL" shows the installer log from the server-sent event stream.
   Text from the server goes in with textContent only; fragments (data-live) are server-rendered,
   autoescaped HTML. */
"use strict";

function refreshLive(box) {
  var etag = null;
  var every = (parseInt(box.dataset.every, 10) || 3) * 1000;
  function tick() {
    if (document.hidden) { setTimeout(tick, every); return; }
    var headers = etag ? {"If-None-Match": etag} : {};
    fetch(box.dataset.live, {headers: headers, credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { window.location.reload(); return null; }
      if (r.status === 304 || !r.ok) { return null; }
      etag = r.headers.get("ETag");
      return r.text();
    }).then(function (html) {
      if (html !== null && html !== undefined) { swap(box, html); }
    }).catch(function () { /* the next tick tries again */ }).then(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
}

function swap(box, html) {
  // keep keyboard focus where it was: the same link or button in the new fragment
  var active = document.activeElement;
  var key = active && box.contains(active) ? (active.getAttribute("href") || active.id) : null;
  box.innerHTML = html;
  if (key) {
    var found = Array.prototype.find.call(box.querySelectorAll("a, button, [id]"), function (el) {
      return el.getAttribute("href") === key || el.id === key;
    });
    if (found) { found.focus(); }
  }
  followIfInstalling();
}

var stream = null;

function logLine(list, item) {
  var li = document.createElement("li");
  li.className = "sev-" + (item.severity || "info");
  li.textContent = (item.ts || "").replace("T", " ").slice(0, 19) + "  " + (item.text || "");
  list.appendChild(li);
  while (list.children.length > 2000) { list.removeChild(list.firstChild); }
  list.scrollTop = list.scrollHeight;
}

function setText(id, text) {
  var el = document.getElementById(id);
  if (el) { el.textContent = text; }
}

function follow(list) {
  if (stream) { return; }
  var status = document.getElementById("log-status");
  stream = new EventSource(list.dataset.follow);
  stream.addEventListener("log", function (e) { logLine(list, JSON.parse(e.data)); });
  stream.addEventListener("progress", function (e) {
    var p = JSON.parse(e.data);
    var bar = document.getElementById("progress");
    if (bar && p.percent !== null && p.percent !== undefined) {
      bar.value = p.percent;
      setText("percent", p.percent + "%");
    }
    if (p.stage) { setText("stage", p.stage); }
  });
  stream.addEventListener("state", function (e) {
    var s = JSON.parse(e.data);
    setText("state", s.to);
  });
  stream.addEventListener("end", function (e) {
    var end = JSON.parse(e.data);
    stream.close();
    if (status) {
      status.textContent = end.state === "installed" || end.state === "failed"
        ? "The install ended: " + end.state + "." : "No install running; the log follows when one starts.";
    }
    list.dataset.ended = end.state;
  });
  stream.onerror = function () {
    if (status && stream.readyState === EventSource.CONNECTING) { status.textContent = "Reconnecting…"; }
  };
  stream.onopen = function () { if (status) { status.textContent = "Following the install live."; } };
}

function followIfInstalling() {
  // a stream ends with the install; a new install (queued later) opens a new one
  var list = document.getElementById("log");
  var state = document.getElementById("state");
  if (!list || !state) { return; }
  var live = state.dataset.state === "install_queued" || state.dataset.state === "installing";
  if (stream && stream.readyState === EventSource.CLOSED && live) { stream = null; list.textContent = ""; delete list.dataset.ended; }
  if (!stream && (live || !list.dataset.ended)) { follow(list); }
}

document.addEventListener("DOMContentLoaded", function () {
  Array.prototype.forEach.call(document.querySelectorAll("[data-live]"), refreshLive);
  followIfInstalling();
});
