// The relay's dashboard: plain JS over the relay's own API (cookie session; writes carry the CSRF token).
// Everything shown that came from a device or an edge goes in as text, never as HTML.
"use strict";

const state = { me: null, stream: null, charts: {} };
window.edgetrio = state; // tests and the curious can look at the charts

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (method !== "GET" && state.me && state.me.csrf) headers["x-csrf-token"] = state.me.csrf;
  const reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                    credentials: "same-origin" });
  const data = await reply.json().catch(() => ({}));
  if (reply.status === 401 && path !== "/api/login") { showLogin("Your session ended: log in again."); throw new Error("401"); }
  if (!reply.ok) { const e = new Error(data.error || reply.statusText); e.status = reply.status; throw e; }
  return data;
}

const ago = (ts) => {
  if (!ts) return "never";
  const s = Date.now() / 1000 - ts;
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : new Date(ts * 1000).toLocaleString();
};
const isAdmin = () => state.me && state.me.role === "admin";
const main = () => document.getElementById("main");

function setCrumbs(...parts) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren(...parts.flatMap((p, i) => [i ? " / " : "", p.href ? el("a", { href: p.href }, p.text) : p.text]));
}

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  for (const chart of Object.values(state.charts)) chart.destroy();
  state.charts = {};
}

function showLogin(message) {
  closeStream();
  state.me = null;
  document.getElementById("whoami").textContent = "";
  document.getElementById("logout").hidden = true;
  setCrumbs();
  const error = el("p", { id: "login-error", class: "error" }, message || "");
  const form = el("form", { class: "login" },
    el("h2", {}, "Log in"),
    el("input", { id: "login-name", name: "name", placeholder: "name", autocomplete: "username", required: true }),
    el("input", { id: "login-password", name: "password", type: "password", placeholder: "password",
                  autocomplete: "current-password", required: true }),
    el("button", { id: "login-submit", type: "submit" }, "Log in"), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/api/login", { name: form.name.value, password: form.password.value });
      await start();
    } catch (e) { error.textContent = e.message; }
  });
  main().replaceChildren(form);
}

async function fleet() {
  setCrumbs({ text: "fleet" });
  const [nodes, devices, alerts, rollouts] = await Promise.all([api("GET", "/api/nodes"), api("GET", "/api/devices"),
                                                               api("GET", "/api/alerts"),
                                                               api("GET", "/api/rollouts").catch(() => [])]);  // none on a gateway
  const online = devices.filter((d) => d.online).length;
  main().replaceChildren(
    el("h2", {}, "Alerts"), alertTable(alerts),
    el("div", { class: "panel row", id: "summary" }, el("strong", {}, plural(nodes.length, "node")),
       ` ${nodes.filter((n) => n.online).length} linked · `, el("strong", {}, plural(devices.length, "device")),
       `${online} online`, " · ", `${nodes.reduce((a, n) => a + n.queued, 0)} messages queued for edges`),
    el("h2", {}, "Nodes"),
    el("div", { class: "scroll" }, el("table", { id: "nodes" }, el("tr", {}, ["node", "link", "devices", "queued", "refused", "rejected", "dropped",
                                               "outbox", "last seen"].map((h) => el("th", {}, h))),
       nodes.map((n) => { const c = n.counters || {}; return el("tr", { "data-node": n.name },
         el("td", {}, el("a", { href: `#/node/${encodeURIComponent(n.name)}` }, n.name)),
         el("td", { class: n.online ? "online" : "offline" }, n.online ? "linked" : "offline"),
         el("td", {}, n.devices), el("td", {}, n.queued),
         ["refused", "rejected", "dropped", "outbox_rows"].map((k) => el("td", { class: `count-${k}` }, c[k] ?? "-")),
         el("td", {}, ago(n.last_seen))); }))),
    el("h2", {}, "Devices"), deviceTable(devices),
    devices.length >= 500 ? el("p", { class: "muted", id: "devices-more" },
                               "The first 500 devices; a node's page lists its own.") : "",
    el("h2", {}, "Firmware rollouts"), rolloutTable(rollouts));
  follow({ kinds: "node,device,alert,ota" }, () => route());
}

// firmware rollouts, newest first (edgetrio cloud rollout create)
function rolloutTable(rollouts) {
  if (!rollouts.length) return el("p", { id: "rollouts", class: "quiet" }, "No rollouts.");
  return el("div", { class: "scroll" }, el("table", { id: "rollouts" },
    el("tr", {}, ["rollout", "state", "bundle", "confirmed", "failed", "wave", "started"].map((h) => el("th", {}, h))),
    rollouts.map((r) => el("tr", { "data-rollout": r.id },
      el("td", {}, el("a", { href: `#/rollout/${encodeURIComponent(r.id)}` }, r.id)),
      el("td", { class: `rollout-${r.state}` }, r.state), el("td", {}, r.bundle.slice(0, 12)),
      el("td", {}, `${r.confirmed} / ${r.total}`), el("td", {}, r.failed),
      el("td", {}, `${r.wave + 1} of ${r.waves.length}`), el("td", {}, ago(r.created))))));
}

// one rollout: its waves and each board's state, live; pause, resume and abort for an admin
async function rollout(id) {
  setCrumbs({ text: "fleet", href: "#/" }, { text: `rollout ${id}` });
  const r = await api("GET", `/api/rollouts/${encodeURIComponent(id)}`);
  const act = (action) => el("button", { class: `rollout-${action}`, onclick: async () => {
    await api("POST", `/api/rollouts/${encodeURIComponent(id)}/${action}`); route(); } }, action);
  const actions = !isAdmin() ? [] : r.state === "running" ? [act("pause"), act("abort")]
    : ["paused", "halted"].includes(r.state) ? [act("resume"), act("abort")] : [];
  main().replaceChildren(
    el("h2", {}, `Rollout ${id}`),
    el("div", { class: "panel row", id: "rollout-summary" },
       el("strong", { class: `rollout-${r.state}` }, r.state), r.reason ? ` (${r.reason})` : "",
       ` · bundle ${r.bundle.slice(0, 12)} · ${r.confirmed} of ${r.total} confirmed, ${r.failed} failed (halts past `,
       `${r.max_failures}) · wave ${r.wave + 1} of ${r.waves.length} (${r.waves.join(", ")})`, ...actions),
    el("div", { class: "scroll" }, el("table", { id: "rollout-boards" },
      el("tr", {}, ["wave", "node", "device", "state", "detail"].map((h) => el("th", {}, h))),
      r.boards.map((b) => el("tr", { "data-device": b.device },
        el("td", {}, b.wave + 1), el("td", {}, b.node),
        el("td", {}, el("a", { href: `#/device/${encodeURIComponent(b.node)}/${encodeURIComponent(b.device)}` }, b.device)),
        el("td", { class: `board-${b.state.replace(" ", "-")}` }, b.state), el("td", {}, b.detail || ""))))));
  follow({ kinds: "ota" }, () => route());
}

// open alerts (and resolved ones not yet acknowledged), newest first
function alertTable(alerts) {
  if (!alerts.length) return el("p", { id: "alerts", class: "quiet" }, "No open alerts.");
  return el("div", { class: "scroll" }, el("table", { id: "alerts" },
    el("tr", {}, ["state", "severity", "rule", "node", "device", "since", "values", ""].map((h) => el("th", {}, h))),
    alerts.map((a) => el("tr", { class: `alert-${a.state} severity-${a.severity}`, "data-alert": `${a.node}/${a.id}` },
      el("td", {}, a.state), el("td", {}, a.severity), el("td", {}, a.rule), el("td", {}, a.node),
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(a.node)}/${encodeURIComponent(a.device)}` }, a.device)),
      el("td", {}, ago(a.fired || a.started)),
      el("td", {}, Object.entries(a.values || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")),
      el("td", {}, a.acked ? `acked by ${a.acked_by}` : isAdmin() ? el("button", { class: "ack", onclick: async () => {
        await api("POST", `/api/nodes/${encodeURIComponent(a.node)}/alerts/${a.id}/ack`); route(); } }, "ack") : "")))));
}

function deviceTable(devices) {
  return el("div", { class: "scroll" }, el("table", { id: "devices" },
    el("tr", {}, ["node", "device", "state", "model", "last seen"].map((h) => el("th", {}, h))),
    devices.map((d) => el("tr", {},
      el("td", {}, d.node),
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.node)}/${encodeURIComponent(d.id)}` }, d.id)),
      el("td", { class: d.online ? "online" : "offline", title: asleep(d) ? `next wake ~${new Date(d.asleep_until * 1000).toLocaleTimeString()}` : undefined },
         d.online ? "online" : asleep(d) ? "asleep" : "offline"),
      el("td", {}, d.model || (d.meta && d.meta.model) || "-"), el("td", {}, ago(d.last_seen))))));
}

// a battery board between its wakes (it said when it wakes next; a minute past that it has missed it)
const asleep = (d) => !d.online && d.asleep_until && Date.now() / 1000 < d.asleep_until + 60;

function plural(count, noun) { return `${count} ${noun}${count === 1 ? "" : "s"}`; }

// one edge: its link and counters, its open alerts, the rule set the cloud applied to it and what the edge did with
// it, and its devices
async function node(name) {
  setCrumbs({ text: "fleet", href: "#/" }, { text: name });
  const path = `/api/nodes/${encodeURIComponent(name)}`;
  const [nodes, devices, alerts, rules] = await Promise.all([api("GET", "/api/nodes"),
    api("GET", `${path}/devices?limit=5000`), api("GET", `/api/alerts?node=${encodeURIComponent(name)}`),
    api("GET", `${path}/rules`)]);
  const n = nodes.find((x) => x.name === name) || {};
  const c = n.counters || {};
  const online = devices.filter((d) => d.online).length;
  main().replaceChildren(
    el("h2", {}, `Node ${name}`),
    el("div", { class: "panel row", id: "node-summary" },
       el("span", { class: n.online ? "online" : "offline" }, n.online ? "linked" : "offline"),
       ` · last seen ${ago(n.last_seen)} · ${n.connects ?? 0} connects · `,
       el("strong", {}, plural(devices.length, "device")), ` ${online} online · ${n.queued ?? 0} messages queued for it`),
    el("div", { class: "panel row", id: "node-counters" }, "since its gateway started: ",
       ["readings", "refused", "rejected", "dropped", "outbox_rows"].map((k) =>
         el("span", { class: `count-${k}` }, `${k.replace("_", " ")}: ${c[k] ?? "-"}`))),
    el("h2", {}, "Alerts"), alertTable(alerts),
    el("h2", {}, "Rules"), ruleSummary(rules),
    el("h2", {}, "Devices"), deviceTable(devices));
  follow({ node: name, kinds: "node,device,alert" }, () => route());
}

function ruleSummary(found) {
  const doc = found.doc || { rule: [], schedule: [] };
  const problems = (found.result && found.result.problems) || {};
  const state = found.applied === found.version ? (Object.keys(problems).length ? "applied in part" : "applied")
    : found.result && found.result.ok === false ? `not applied: ${found.result.error}` : "waiting for the node";
  const version = found.version ? el("p", {}, `Rule set version ${found.version} from the cloud: ${state}.`) : "";
  if (!doc.rule.length && !doc.schedule.length) return el("div", { id: "rules", class: "quiet" }, version, "No rules.");
  return el("div", { id: "rules", class: "panel" }, version, el("ul", {},
    doc.rule.map((r) => el("li", { "data-rule": r.name }, `rule ${r.name}: ${r.when || ""}`,
      problems[r.name] ? el("span", { class: "muted" }, ` (${problems[r.name]})`) : "")),
    doc.schedule.map((x) => el("li", {}, `schedule ${x.name}: ${x.cron || "every " + x.every}`))));
}

// the live stream: one EventSource per page, narrowed to what the page shows
function follow(filter, onChange, onReading) {
  const query = new URLSearchParams(filter).toString();
  const source = new EventSource(`/api/stream${query ? "?" + query : ""}`);
  let pending = null;
  const later = () => { if (!pending) pending = setTimeout(() => { pending = null; onChange(); }, 1000); };
  for (const type of ["node", "device", "twin", "alert", "ota"]) source.addEventListener(type, later);
  source.addEventListener("readings", (event) => { for (const r of JSON.parse(event.data).readings) onReading(r); });
  state.stream = source;
}

async function device(nodeName, id) {
  setCrumbs({ text: "fleet", href: "#/" }, { text: nodeName, href: `#/node/${encodeURIComponent(nodeName)}` }, { text: id });
  const base = `/api/nodes/${encodeURIComponent(nodeName)}/devices/${encodeURIComponent(id)}`;
  const range = new URLSearchParams(location.hash.split("?")[1] || "").get("range") || "1h";
  const [series, twin, devices] = await Promise.all([
    api("GET", `${base}/series?range=${range}&points=600`), api("GET", `${base}/twin`),
    api("GET", `/api/nodes/${encodeURIComponent(nodeName)}/devices?limit=5000`)]);
  const info = devices.find((d) => d.id === id) || {};
  const ranges = el("div", { class: "row" }, "Range:", ["1h", "24h", "7d"].map((r) =>
    el("button", { class: r === range ? "range active" : "range", "data-range": r,
                   onclick: () => { location.hash = `#/device/${encodeURIComponent(nodeName)}/${encodeURIComponent(id)}?range=${r}`; } }, r)),
    el("a", { id: "csv", href: `${base}/readings?format=csv&since=${range === "1h" ? "1h" : range === "24h" ? "1d" : "7d"}` },
       "Download CSV"));
  const plots = el("div", { class: "plots" });
  const twinPanel = el("div", { class: "panel", id: "twin" });
  const commands = el("div", { class: "panel", id: "commands" });
  const logs = el("div", { class: "panel", id: "logs", hidden: true });
  const states = el("div", { class: "panel row", id: "states", hidden: true });
  main().replaceChildren(
    el("h2", {}, id, " ", el("span", { id: "device-state", class: info.online ? "online" : "offline" },
                             info.online ? "online" : "offline")),
    el("p", { class: "muted" }, `model ${info.model || (info.meta && info.meta.model) || "-"} · firmware `,
       (info.meta && info.meta.firmware) || "-",
       // the bundle it runs, and whether an update is on trial (not yet confirmed) or being received
       info.meta && info.meta.bundle ? ` (${info.meta.bundle}${info.meta.trial ? ", on trial" : ""}`
         + `${info.meta.updating ? ", receiving an update" : ""})` : "",
       ` · last seen ${ago(info.last_seen)}`),
    // a model given by hand that lacks what the board sends: its readings with those are refused (the gateway says)
    ...((info.model_lacks || []).length ? [el("p", { class: "error", id: "model-lacks" },
      `The board sends ${info.model_lacks.join(", ")}, which model ${info.model} lacks: readings with them are refused. `
      + `Reflash it with its board file, or \`edgetrio device set-model ${id} MODEL\`.`)] : []),
    ranges, states, plots, twinPanel, commands, logs);
  // units as the board announced its resources (meta), shown in each plot's title
  const units = Object.fromEntries(((info.meta && info.meta.resources) || []).filter((r) => r && r.unit)
                                   .map((r) => [r.name, r.unit]));
  drawPlots(plots, series, range, units);
  // what reports true or false (a door contact, a float switch): its state now, not a plot
  const contacts = ((info.meta && info.meta.resources) || []).filter((r) => r && r.type === "bool" && r.access !== "rw")
    .map((r) => r.name);
  const now = {};
  const showStates = (values, ts) => {
    for (const name of contacts) if (typeof (values || {})[name] === "boolean") now[name] = [values[name], ts];
    const shown = contacts.filter((name) => name in now);
    states.hidden = !shown.length;
    states.replaceChildren(...shown.map((name) => el("span", { class: `state state-${now[name][0]}`, "data-state": name },
      `${name}: ${now[name][0] ? "on" : "off"} (${ago(now[name][1])})`)));
  };
  if (contacts.length) {
    const last = await api("GET", `${base}/readings?limit=200`).catch(() => []);
    for (const r of last) showStates(r.values, r.ts);
  }
  // what can be set: a board's outputs (rw resources) and the firmware's own settings, as its meta says
  const controls = [...((info.meta && info.meta.resources) || []).filter((r) => r && r.access === "rw"),
                    ...((info.meta && info.meta.controls) || [])].filter((c) => c && typeof c.name === "string");
  showTwin(twinPanel, base, twin, controls);
  showCommands(commands, base, (info.meta && info.meta.commands) || ["ping"]);
  showLogs(logs, base);
  follow({ node: nodeName, device: id }, async () => showTwin(twinPanel, base, await api("GET", `${base}/twin`)),
         (reading) => { appendReading(reading, range); showStates(reading.values, reading.ts); });  // this device's only
}

function drawPlots(container, series, range, units = {}) {
  const keys = Object.keys(series.values);
  if (!keys.length) { container.append(el("p", { class: "muted", id: "no-readings" }, "No readings in this range yet.")); return; }
  for (const key of keys) {
    const box = el("div", { class: "plot", "data-resource": key }, el("h3", {}, units[key] ? `${key} (${units[key]})` : key));
    container.append(box);
    const width = Math.max(240, box.clientWidth - 16);
    // the x axis is the chosen range ending now, whatever the data holds (one old dot once stretched it over years)
    const xRange = () => { const now = Date.now() / 1000; return [now - RANGE_SECONDS[range], now]; };
    const opts = { width, height: 220, scales: { x: { time: true, range: xRange } }, legend: { show: false },
                   series: [{}, { label: key, stroke: "#2563eb", width: 1.5, spanGaps: true }],
                   axes: [{ space: 90 }, { size: 75 }] };  // time labels need room: 60 px ran "9:16pm9:17pm" together
    state.charts[key] = new uPlot(opts, [series.ts.slice(), series.values[key].slice()], box);
  }
  state.range = range;
}

const RANGE_SECONDS = { "1h": 3600, "24h": 86400, "7d": 604800 };

function appendReading(reading, range) {
  const ts = reading.ts;
  const span = RANGE_SECONDS[range];
  for (const [key, chart] of Object.entries(state.charts)) {
    const value = reading.values[key];
    if (typeof value !== "number") continue;
    const xs = chart.data[0].slice(), ys = chart.data[1].slice();
    xs.push(ts); ys.push(value);
    while (xs.length && xs[0] < ts - span) { xs.shift(); ys.shift(); } // the window slides
    chart.setData([xs, ys]);
  }
}

// The editor is built once; live updates refresh the shown state only, so an edit in progress is never wiped.
function showTwin(panel, base, twin, controls) {
  panel.twin = twin;
  if (controls) panel.controls = controls;
  if (!panel.dataset.ready) {
    panel.dataset.ready = "1";
    const message = el("p", { id: "twin-message" });
    const send = async (change) => {
      try {
        const updated = await api("PATCH", `${base}/twin`, { desired: change, version: panel.twin.desired.version });
        showTwin(panel, base, updated);
        say(`Desired version ${updated.desired.version} queued for the device.`);
      } catch (e) {
        if (e.status === 409) showTwin(panel, base, await api("GET", `${base}/twin`));
        say(e.status === 409 ? "Conflict: the desired state changed meanwhile; set it again." : e.message, true);
      }
    };
    // a switch for each on/off output, a slider for a bounded level (a dimmer's 0-100 %), a box for other numbers
    const rows = (panel.controls || []).map((c) => {
      const id = `control-${c.name}`;
      let input;
      if (c.type === "bool") {
        input = el("input", { type: "checkbox", id, class: "switch" });
        input.addEventListener("change", () => send({ [c.name]: input.checked }));
      } else if (c.type === "float" || c.type === "int") {
        const slider = c.min != null && c.max != null && c.max - c.min <= 1000;
        input = el("input", { type: slider ? "range" : "number", id, min: c.min ?? "", max: c.max ?? "",
                              step: c.type === "int" ? 1 : slider ? (c.max - c.min) / 100 : "any" });
        input.addEventListener("change", () => { const v = Number(input.value); if (input.value !== "" && Number.isFinite(v)) send({ [c.name]: v }); });
      } else { return null; }
      input.disabled = !isAdmin();
      return el("label", { class: "control row", "data-control": c.name }, el("span", {}, c.name.replace(/_/g, " ")),
                input, el("span", { class: "muted", id: `${id}-value` }, ""), c.unit ? el("span", { class: "muted" }, c.unit) : "");
    }).filter(Boolean);
    const patch = el("textarea", { id: "twin-patch", rows: 3, placeholder: '{"led": true}   (null removes a key)' });
    const apply = el("button", { id: "twin-apply" }, "Set desired");
    const say = (text, error) => { message.textContent = text; message.className = error ? "error" : ""; };
    apply.addEventListener("click", async () => {
      let change;
      try { change = JSON.parse(patch.value); } catch (e) { say(`Not JSON: ${e.message}`, true); return; }
      try {
        const updated = await api("PATCH", `${base}/twin`, { desired: change, version: panel.twin.desired.version });
        showTwin(panel, base, updated);
        patch.value = "";
        say(`Desired version ${updated.desired.version} queued for the device.`);
      } catch (e) {
        if (e.status === 409) {  // someone else changed it meanwhile: show theirs, keep this edit in the editor
          showTwin(panel, base, await api("GET", `${base}/twin`));
          say(`Conflict: desired state changed to version ${panel.twin.desired.version} meanwhile. Check it and set again.`, true);
        } else { say(e.message, true); }
      }
    });
    const shown = (id, title) => el("div", {}, el("strong", { id: `${id}-title` }, title), el("pre", { id }, ""));
    panel.replaceChildren(el("h3", {}, "Twin"), ...(rows.length ? [el("div", { class: "controls" }, rows)] : []),
      shown("twin-desired", "desired"), shown("twin-reported", "reported"),
      shown("twin-delta", "delta"),
      ...(isAdmin() ? [patch, el("div", { class: "row" }, apply)] : [el("p", { class: "muted" }, "Viewers cannot change the twin.")]),
      message);
  }
  const set = (id, text) => { panel.querySelector(`#${id}`).textContent = text; };
  set("twin-desired-title", `desired (version ${twin.desired.version})`);
  set("twin-desired", JSON.stringify(twin.desired.state));
  set("twin-reported-title", `reported (version ${twin.reported.version})`);
  set("twin-reported", JSON.stringify(twin.reported.state));
  set("twin-delta", JSON.stringify(twin.delta));
  for (const c of panel.controls || []) {  // what the board reports it did; an input being used is left alone
    const input = panel.querySelector(`#control-${CSS.escape(c.name)}`);
    const value = c.name in twin.reported.state ? twin.reported.state[c.name] : twin.desired.state[c.name];
    if (!input || value === undefined) continue;
    if (input.type === "checkbox") input.checked = value === true;
    else if (document.activeElement !== input) input.value = value;  // a number being typed is not overwritten
    const shownValue = panel.querySelector(`#control-${CSS.escape(c.name)}-value`);
    if (shownValue) shownValue.textContent = input.type === "checkbox" ? (value ? "on" : "off") : String(value);
  }
}

// Commands that restart or reset a board ask first; arguments (`times=3`) go in the field beside the buttons.
const CONFIRM = /^(reboot|restart|reset|factory_reset|erase)$/;

function showCommands(panel, base, names) {
  const result = el("pre", { id: "cmd-result" }, "");
  const args = el("input", { id: "cmd-args", placeholder: "arguments, e.g. times=3", size: 24, disabled: !isAdmin() });
  const parse = () => Object.fromEntries(args.value.split(/\s+/).filter(Boolean).map((pair) => {
    const [key, ...rest] = pair.split("="); const raw = rest.join("=");
    try { return [key, JSON.parse(raw)]; } catch (e) { return [key, raw]; } }));
  panel.replaceChildren(el("h3", {}, "Commands"),
    el("div", { class: "row" }, names.map((name) => el("button", { class: "cmd", "data-name": name, disabled: !isAdmin(),
      onclick: async () => {
        if (CONFIRM.test(name) && !window.confirm(`Run ${name} on this board? It restarts.`)) return;
        result.textContent = `${name}: waiting…`;
        try { const r = await api("POST", `${base}/commands`, { name, args: parse(), timeout: 10 });
              result.textContent = `${name}: ${r.ok ? JSON.stringify(r.value) : "error: " + r.error}`; }
        catch (e) { result.textContent = `${name}: ${e.message}`; }
      } }, name)), args), result);
}

// The gateway keeps a device's log lines and what it refused; the relay does not have them (the panel stays hidden).
async function showLogs(panel, base) {
  let lines, refused;
  try { [lines, refused] = await Promise.all([api("GET", `${base}/logs`), api("GET", `${base}/rejects`)]); }
  catch (e) { return; }
  const when = (ts) => new Date(ts * 1000).toLocaleTimeString();
  const text = (body) => (typeof body === "string" ? body : JSON.stringify(body));
  panel.hidden = false;
  panel.replaceChildren(el("h3", {}, "Log"),
    el("pre", { id: "log-lines" }, lines.length ? lines.slice(-30).map((l) => `${when(l.ts)} ${l.kind} ${text(l.body)}`).join("\n") : "(nothing yet)"),
    el("h3", {}, "Refused"),
    el("pre", { id: "rejects" }, refused.length ? refused.slice(-20).map((r) => `${when(r.received)} ${r.reason}: ${r.detail}`).join("\n") : "(nothing refused)"));
}

async function route() {
  closeStream();
  const [path] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts[0] === "node" && parts[1]) await node(parts[1]);
    else if (parts[0] === "device" && parts[2]) await device(parts[1], parts[2]);
    else if (parts[0] === "rollout" && parts[1]) await rollout(parts[1]);
    else await fleet();
  } catch (e) {
    if (e.message !== "401") main().replaceChildren(el("p", { class: "error", id: "page-error" }, e.message));
  }
}

async function start() {
  try { state.me = await api("GET", "/api/me"); } catch (e) { if (e.message !== "401") showLogin(e.message); return; }
  document.getElementById("whoami").textContent = `${state.me.name} (${state.me.role})`;
  document.getElementById("logout").hidden = false;
  await route();
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("POST", "/api/logout").catch(() => {});
  showLogin("Logged out.");
});
window.addEventListener("hashchange", () => state.me && route());
start();
